"""Kind `torch-cpu`: PyTorch on this machine's CPU, eager or traced+frozen TorchScript."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from evit.formats.inputs import seeded_input
from evit.formats.torchscript import trace_and_freeze
from evit.latency.devices.base import Device, Item, Prepared, torch_threads

log = logging.getLogger(__name__)


class TorchCPUDevice(Device):
    """PyTorch on the CPU, eager or traced+frozen TorchScript, with pinned intra-op threads."""

    def check_available(self) -> None:
        cores = os.cpu_count() or 1
        if self.params.threads > cores:
            log.warning("device '%s': threads=%d but this machine has %d CPUs; timings will be oversubscribed",
                        self.name, self.params.threads, cores)

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with torch_threads(self.params.threads), torch.inference_mode():
            yield

    def _prepare(self, module: nn.Module, item: Item, workdir: Path) -> Prepared:
        x = seeded_input(item.input_shape)
        if self.params.runtime == "torchscript":
            module = trace_and_freeze(module, x)
        return Prepared(module, x)
