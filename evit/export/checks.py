"""Each exported file is run in its own runtime and checked against eager PyTorch before it ships.

The same seeded input goes through PyTorch and through onnxruntime / the LiteRT
interpreter / the ExecuTorch runtime (`evit.formats`); a file whose output differs by more
than `ONNX_TOLERANCE` (relative to the logits' scale) is an `ExportError`, so a wrong
model is never exported, let alone registered. The max abs difference goes on the card.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evit.errors import UserError
from evit.formats.inputs import seeded_input
from evit.formats.onnx import run_onnx
from evit.formats.pte import run_pte
from evit.formats.tflite import run_tflite

ONNX_TOLERANCE = 1e-3


class ExportError(UserError):
    """The search result to export is missing, or an exported file fails its check."""


def check_outputs(what: str, path: Path, got: np.ndarray, ref: np.ndarray) -> float:
    """Max abs difference of a runtime's output from PyTorch's (ExportError past the tolerance)."""
    diff = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - ref)))
    scale = max(1.0, float(np.max(np.abs(ref))))
    if not diff <= ONNX_TOLERANCE * scale:
        raise ExportError(f"{path}: {what} output differs from PyTorch by {diff:.3g} "
                          f"(tolerance {ONNX_TOLERANCE * scale:.3g}); not exporting a wrong model")
    return diff


def _check(what: str, path: Path, module: Any, resolution: int, seed: int,
           run: Callable[[Path, torch.Tensor], np.ndarray]) -> float:
    x = seeded_input((1, 3, resolution, resolution), seed)
    with torch.no_grad():
        ref = module(x).numpy()
    return check_outputs(what, path, run(path, x), ref)


def check_onnx(path: Path, module: Any, resolution: int, seed: int = 0) -> float:
    """Max abs difference between onnxruntime and PyTorch on a seeded input (raises past tolerance)."""
    return _check("onnxruntime", path, module, resolution, seed, lambda p, x: run_onnx(p, x.numpy()))


def check_tflite(path: Path, module: Any, resolution: int, seed: int = 0) -> float:
    """Max abs difference between the LiteRT interpreter (XNNPACK) and PyTorch on a seeded input."""
    return _check("LiteRT", path, module, resolution, seed, lambda p, x: run_tflite(p, x.numpy()))


def check_pte(path: Path, module: Any, resolution: int, seed: int = 0) -> float:
    """Max abs difference between the ExecuTorch runtime (XNNPACK) and PyTorch on a seeded input."""
    return _check("ExecuTorch", path, module, resolution, seed, lambda p, x: run_pte(p, x).numpy())
