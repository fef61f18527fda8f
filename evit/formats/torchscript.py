"""TorchScript: a static subnet as a traced (or scripted) archive, and traced+frozen for timing.

A static subnet has no data-dependent control flow, so a trace of the eval-mode module is
the whole program. Files are written through a temporary file and renamed.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from evit.formats.onnx import example_input
from evit.io import atomic_path

log = logging.getLogger(__name__)


def export_torchscript(module: nn.Module, resolution: int, path: str | os.PathLike[str],
                       batch_size: int = 1) -> Path:
    """Write `module` (eval mode) as a traced TorchScript archive, loadable with `torch.jit.load`."""
    path = Path(path)
    example = example_input(module, resolution, batch_size)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch 2.x marks TorchScript deprecated (FutureWarning); it is still a deployment
            # format next to ONNX, and it still loads in C++ libtorch.
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(module, (example,), check_trace=False)
            with atomic_path(path) as tmp:
                torch.jit.save(traced, str(tmp))
    finally:
        module.train(was_training)
    log.info("exported TorchScript to %s", path)
    return path


def trace_and_freeze(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """Trace and freeze (folds BN into convs, as a TorchScript deployment would): what a
    `runtime: torchscript` latency device times."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (x,))
        return torch.jit.freeze(traced)
