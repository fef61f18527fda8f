"""ONNX: export a static subnet (or a single static block), and run it with onnxruntime.

Export uses torch's TorchScript-based exporter (`dynamo=False`): it runs offline, keeps
the graph to plain ops (Conv, Gemm/MatMul, Softmax, HardSwish, AveragePool with ceil
mode, Gather for the relative-position bias) and supports a dynamic batch axis, which is
all a static subnet needs. Files are written through a temporary file and renamed, so a
crash never leaves a partial file. The latency devices time blocks and subnets from
exactly the files `evit export` ships: same exporter, opset and options.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evit.io import atomic_path

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def example_input(module: nn.Module, resolution: int, batch_size: int) -> torch.Tensor:
    """A seeded NCHW input on the module's device and dtype."""
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
    example = example_input(module, resolution, batch_size)
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


def session(path: str | os.PathLike[str], threads: int = 1, *, timing: bool = False) -> Any:
    """An onnxruntime CPU session on `path` with `threads` intra-op threads.

    `timing=True`: the benchmark settings (one inter-op thread, sequential execution, every
    graph optimisation, quiet), as a latency device runs it.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if timing:
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def run_onnx(path: str | os.PathLike[str], x: np.ndarray, threads: int = 1) -> np.ndarray:
    """One inference of the file's model on `x` (its first input and output)."""
    sess = session(path, threads)
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x)})[0])
