"""The int8 files of an exported subnet (ExecuTorch, LiteRT), and the accuracy of the files themselves.

`export.quantize: [fp32, int8]` adds `model.int8.pte` beside `model.pte` and
`model.int8.tflite` beside `model.tflite` (each where `export.formats` has the format). Their activation
scales come from `export.int8_calibration_images` images of the search split (a seeded
subset: the split the search already scores on, never val), through the one quantize
function (`evit.formats.quantize`). What a user ships is the file, so its accuracy is
measured through the runtime (ExecuTorch; the LiteRT interpreter) over the whole val split,
for the int8 file and the fp32 file alike; the drop in points goes on the card, and a drop larger than
`export.int8_max_drop_points` is flagged there and logged as a warning (the file is still
exported: whether a 2-point drop is worth a 2x speed-up is the user's call, made visible).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evit.export.checks import ExportError
from evit.formats import bundle
from evit.formats.pte import PteRunner, export_pte, run_pte
from evit.formats.tflite import TfliteRunner, delegation_report, run_tflite

log = logging.getLogger(__name__)

RUNTIME = "ExecuTorch, int8 (PT2E static, XNNPACK quantizer, per-channel weights), XNNPACK delegate"
RUNTIME_LITERT = ("LiteRT (ai-edge-litert), int8 (PT2E static, litert-torch PT2EQuantizer, per-channel weights, "
                  "float input / output), XNNPACK delegate")
CHECK_TOLERANCE = 0.25
"""Largest max-abs difference of the int8 file's logits from the fp32 file's on a calibration image,
relative to the fp32 logits' scale, before the int8 file is refused as broken (quantization
noise on a trained subnet is a few percent; a wrong scale or a layout bug is O(1))."""


@dataclass(frozen=True)
class Int8Inputs:
    """What an int8 export needs besides the static subnet (built by the export stage)."""

    calibration: torch.Tensor
    """Calibration images (N, 3, r, r), normalised like the eval transform."""
    top1: Callable[[Path], float]
    """Val top-1 in [0, 1] of a .pte / .tflite file, run through its runtime."""
    max_drop_points: float
    split: str = "search"
    """Where the calibration images come from (on the card)."""


def calibration_images(data: Any, resolution: int, n: int, seed: int) -> torch.Tensor:
    """`n` images of the search split at `resolution` (a seeded subset; all when it is smaller)."""
    from evit.evaluate import eval_source, fits_in_memory

    if fits_in_memory(data, "search", resolution):
        x, _ = eval_source(data, "search", resolution, n)  # type: ignore[misc]
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(seed)))[:n]
        return x[idx]
    loader = data.loader("search", resolution=resolution, batch_size=n, train=False, seed=seed)
    return next(iter(loader))[0]


def runtime_top1(module: Any, data: Any, resolution: int, batch_size: int) -> Callable[[Path], float]:
    """Val top-1 of a .pte file (ExecuTorch runtime) or a .tflite file (LiteRT interpreter)
    (`module` only names the compute device and mode evaluate_top1 expects; the logits are
    the runtime's)."""
    from evit.evaluate import eval_source, evaluate_top1

    def top1(path: Path) -> float:
        source = eval_source(data, "val", resolution, batch_size)
        runner = TfliteRunner(path) if Path(path).suffix == ".tflite" else PteRunner(path)
        return float(evaluate_top1(module, source, batch_size=batch_size, forward=runner))

    return top1


def accuracy_verdict(fp32_top1: float, int8_top1: float, max_drop_points: float, where: str,
                     runtime: str = "ExecuTorch") -> dict[str, Any]:
    """The card's int8 accuracy fields; logs a warning when the drop passes the threshold."""
    drop = round(100.0 * (fp32_top1 - int8_top1), 3)
    flagged = drop > max_drop_points
    if flagged:
        log.warning("%s: the int8 file scores %.2f%% val top-1 through %s, %.2f points below the fp32 "
                    "file's %.2f%% (export.int8_max_drop_points %.2f); flagged on the card", where,
                    100 * int8_top1, runtime, drop, 100 * fp32_top1, max_drop_points)
    return {"val_top1_runtime": int8_top1, "fp32_val_top1_runtime": fp32_top1, "drop_points": drop,
            "max_drop_points": max_drop_points, "flagged": flagged}


def _check_and_score(fp32_path: Path, int8_path: Path, run: Callable[[Path, torch.Tensor], torch.Tensor],
                     resolution: int, inputs: Int8Inputs, where: str, runtime: str) -> dict[str, Any]:
    """The int8 file against its fp32 file on one calibration image (refused when broken), then
    both files' val top-1 through the runtime and the verdict. An image, not seeded noise: a
    calibrated int8 file clips what lies outside the ranges images produce (a trained digits
    subnet's logits on standard-normal noise differed by 12.7 at a scale of 19, while its
    val top-1 moved by a point)."""
    x = inputs.calibration[:1].cpu().float()
    ref, got = run(fp32_path, x), run(int8_path, x)
    diff = float((got - ref).abs().max())
    scale = max(1.0, float(ref.abs().max()))
    if not diff <= CHECK_TOLERANCE * scale:
        raise ExportError(f"{int8_path}: the int8 file's logits differ from the fp32 file's by {diff:.3g} "
                          f"(tolerance {CHECK_TOLERANCE * scale:.3g}); not exporting a broken int8 model")
    fp32_top1, int8_top1 = inputs.top1(fp32_path), inputs.top1(int8_path)
    return {"max_abs_diff_vs_fp32": diff, "calibration": {"split": inputs.split, "images": int(inputs.calibration.shape[0])},
            **accuracy_verdict(fp32_top1, int8_top1, inputs.max_drop_points, where, runtime)}


def export_int8_pte(static: Any, resolution: int, folder: Path, inputs: Int8Inputs,
                    where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write `model.int8.pte` into `folder` (which holds `model.pte`); the card sections:
    (fields for the fp32 `pte` section, the `pte_int8` section)."""
    t0 = time.monotonic()
    fp32_path, int8_path = folder / bundle.MOBILE_FILES["pte"], folder / bundle.INT8_FILES["pte"]
    example = torch.zeros(1, 3, resolution, resolution)
    report = export_pte(static, example, int8_path, int8_calibration=[inputs.calibration])
    lower_seconds = time.monotonic() - t0
    scored = _check_and_score(fp32_path, int8_path, run_pte, resolution, inputs, where, "ExecuTorch")
    section = {"runtime": RUNTIME, **report.to_dict(), "lower_seconds": round(lower_seconds, 1), **scored}
    return {"val_top1_runtime": scored["fp32_val_top1_runtime"]}, section


def export_int8_tflite(converter: Any, space: dict[str, Any], resolution: int, folder: Path, inputs: Int8Inputs,
                       where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write `model.int8.tflite` into `folder` (which holds `model.tflite`, arch.json and the
    weights) through the converter venv (`converter`: a running LiteRTConverter); the card
    sections: (fields for the fp32 `tflite` section, the `tflite_int8` section)."""
    t0 = time.monotonic()
    fp32_path, int8_path = folder / bundle.MOBILE_FILES["tflite"], folder / bundle.INT8_FILES["tflite"]
    report = converter.convert_subnet_int8(folder / bundle.ARCH, folder / bundle.WEIGHTS, space,
                                           inputs.calibration.cpu().numpy(), int8_path)
    seconds = time.monotonic() - t0

    def run(path: Path, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(run_tflite(path, x.numpy()))

    scored = _check_and_score(fp32_path, int8_path, run, resolution, inputs, where, "LiteRT")
    section = {"runtime": RUNTIME_LITERT, "quantization": report, **delegation_report(int8_path),
               "convert_seconds": round(seconds, 1), **scored}
    return {"val_top1_runtime": scored["fp32_val_top1_runtime"]}, section


# --- does int8 keep the search's ranking? ----------------------------------------------------

def final_candidates(population: list[dict[str, Any]], budget: dict[str, Any], k: int) -> list[dict[str, Any]]:
    """The `k` best subnets (search top-1) the search evaluated for `budget` that fit it:
    the candidates the search chose among (rows of population.json)."""
    label, kind, value = budget["label"], budget["kind"], float(budget["value"])

    def fits(row: dict[str, Any]) -> bool:
        if kind == "latency":
            return float(row["latency_ms"]) <= value
        return kind != "flops" or float(row["flops_m"]) <= value

    rows = [r for r in population if label in r.get("budgets", []) and fits(r)]
    return sorted(rows, key=lambda r: (-float(r["top1"]), r["key"]))[:k]


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (ties averaged); None when it is undefined (under 3 values,
    or one side constant: every candidate scored the same)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return round(float(spearmanr(a, b).statistic), 4)


def rank_agreement(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How the float and the int8 ranking of the candidates agree. `rows`: per candidate
    `float_val_top1` (the float subnet, BN-calibrated, as the search scores it) and
    `int8_val_top1` (its int8 .pte through the runtime)."""
    f = [r["float_val_top1"] for r in rows]
    q = [r["int8_val_top1"] for r in rows]
    best = (max(range(len(rows)), key=lambda i: f[i]) == max(range(len(rows)), key=lambda i: q[i])) if rows else None
    return {"candidates": len(rows), "spearman": spearman(f, q), "same_best": best, "rows": rows}


def score_candidates(candidates: list[dict[str, Any]], static_of: Callable[[dict[str, Any]], Any],
                     float_top1: Callable[[Any, int], float], calibration_of: Callable[[int], torch.Tensor],
                     top1_of: Callable[[Any, int], Callable[[Path], float]], workdir: Path) -> dict[str, Any]:
    """Score each candidate in float and as an int8 .pte through the runtime; `rank_agreement`.

    `static_of(row)`: the calibrated static subnet; `float_top1(static, resolution)`: its val
    top-1 in float; `calibration_of(resolution)`: int8 calibration images;
    `top1_of(static, resolution)`: val top-1 of a .pte file through the runtime."""
    rows = []
    for i, row in enumerate(candidates):
        static = static_of(row)
        r = int(row["arch"]["resolution"])
        path = workdir / f"candidate-{i}.pte"
        export_pte(static, torch.zeros(1, 3, r, r), path, int8_calibration=[calibration_of(r)])
        rows.append({"key": row["key"], "search_top1": float(row["top1"]), "float_val_top1": float_top1(static, r),
                     "int8_val_top1": top1_of(static, r)(path)})
        path.unlink()
        log.info("int8 ranking: candidate %d/%d %s: float %.4f, int8 %.4f", i + 1, len(candidates), row["key"],
                 rows[-1]["float_val_top1"], rows[-1]["int8_val_top1"])
    return rank_agreement(rows)
