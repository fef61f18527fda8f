"""Kind `cuda`: an NVIDIA GPU, timed with CUDA events, module and input in the device's dtype."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evit.errors import DeviceError
from evit.formats.inputs import seeded_input
from evit.formats.torchscript import trace_and_freeze
from evit.latency.devices.base import Device, Item, Prepared


class CudaDevice(Device):
    """A CUDA GPU: CUDA-event timing, module and input in `dtype`, synchronised per sample."""

    def check_available(self) -> None:
        if not torch.cuda.is_available():
            built = torch.version.cuda or "none (CPU-only build)"
            raise DeviceError(
                f"device '{self.name}' (kind cuda) needs an NVIDIA GPU, but none is present: "
                f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build {built}, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). "
                "Run this device's stage on a GPU machine, or remove it from params.yaml `devices:`."
            )
        if self.params.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise DeviceError(f"device '{self.name}': dtype bfloat16 is not supported on "
                              f"{torch.cuda.get_device_name(0)}; accepted here: float32, float16")

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            d["gpu"] = props.name
            d["gpu_capability"] = f"{props.major}.{props.minor}"
            d["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            d["cudnn"] = torch.backends.cudnn.version()
        return d

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with torch.inference_mode():
            yield

    def _prepare(self, module: nn.Module, item: Item, workdir: Path) -> Prepared:
        dev = torch.device("cuda", 0)
        dtype = getattr(torch, self.params.dtype)
        x = seeded_input(item.input_shape).to(dev, dtype)
        module = module.to(dev, dtype)
        if self.params.runtime == "torchscript":
            module = trace_and_freeze(module, x)
        return Prepared(module, x)

    def _time_loop(self, p: Prepared, k: int) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()  # nothing queued before the start event
        start.record()
        for _ in range(k):
            p.step(p.x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def _time_chain(self, chain: Sequence[Prepared]) -> list[float]:
        """Events between consecutive modules; one synchronisation per pass, not per module."""
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(chain) + 1)]
        torch.cuda.synchronize()
        x = chain[0].x
        events[0].record()
        for p, ev in zip(chain, events[1:]):
            x = p.step(x)
            ev.record()
        events[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]
