"""Export static subnets (or single static blocks) to ONNX and TorchScript.

ONNX uses torch's TorchScript-based exporter (`dynamo=False`): it runs offline, keeps
the graph to plain ops (Conv, Gemm/MatMul, Softmax, HardSwish, AveragePool with ceil
mode, Gather for the relative-position bias) and supports a dynamic batch axis, which
is all a static subnet needs. TorchScript uses `torch.jit.trace` on an eval-mode module:
a static subnet has no data-dependent control flow, so the trace is the whole program.
Both write through a temporary file and rename, so a crash never leaves a partial file.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from evit.io import atomic_path

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def _example(module: nn.Module, resolution: int, batch_size: int) -> torch.Tensor:
    ref = next(module.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.float32
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, 3, resolution, resolution, generator=gen).to(device=device, dtype=dtype)


def export_onnx(module: nn.Module, resolution: int, path: str | os.PathLike[str], opset: int = 17,
                batch_size: int = 1) -> Path:
    """Write `module` (eval mode) as ONNX with input `image` (B,3,R,R; B dynamic) -> output `logits`.

    `resolution` is the input side; for a single block pass its input side and note that
    blocks take C channels, not 3 (use `export_onnx_input` then).
    """
    example = _example(module, resolution, batch_size)
    return export_onnx_input(module, example, path, opset)


def export_onnx_input(module: nn.Module, example: torch.Tensor, path: str | os.PathLike[str],
                      opset: int = 17) -> Path:
    """ONNX export for any NCHW-input module given an example input (e.g. one LUT block)."""
    path = Path(path)
    was_training = module.training
    module.eval()
    try:
        with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            # the legacy exporter's deprecation notice and tracer notes on shape arithmetic
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (example,), str(tmp), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    finally:
        module.train(was_training)
    log.info("exported ONNX (opset %d) to %s", opset, path)
    return path


def export_torchscript(module: nn.Module, resolution: int, path: str | os.PathLike[str],
                       batch_size: int = 1) -> Path:
    """Write `module` (eval mode) as a traced TorchScript archive, loadable with `torch.jit.load`."""
    path = Path(path)
    example = _example(module, resolution, batch_size)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch 2.x marks TorchScript deprecated (FutureWarning); the issue asks for it
            # as a deployment format next to ONNX, and it still loads in C++ libtorch.
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(module, (example,), check_trace=False)
            with atomic_path(path) as tmp:
                torch.jit.save(traced, str(tmp))
    finally:
        module.train(was_training)
    log.info("exported TorchScript to %s", path)
    return path
