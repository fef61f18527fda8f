"""How good a latency table is: end-to-end measurements vs predictions, and vs FLOPs.

Metrics follow nn-Meter: RMSE, mean absolute percentage error and the share of subnets
predicted within +-10% of the measured latency. FLOPs are reported as a latency proxy on
the same subnets (scaled to ms by the least-squares ms-per-MFLOP factor on relative
error, fitted on these very points, which flatters FLOPs) with the same +-10% share and
the Spearman rank correlation, so the table's gain over FLOPs is visible.

The optional linear correction is chosen here: `choose_correction` fits `a*raw + b`,
`a*raw + b[resolution]` and a scale per block kind (`per-kind`, with enough subnets) with
K-fold cross-validation and keeps the form with the lowest held-out error, or none if the
raw sum is better. When one is kept, the reported metrics
are its held-out (cross-fitted) predictions, never predictions of points the correction
was fitted on.
"""

from __future__ import annotations

import csv
import io
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from evit.io import save_figure_atomic, write_text_atomic
from evit.latency.predictor import KINDS, Correction, fit_correction, fit_kind_correction

log = logging.getLogger(__name__)

FOLDS = 5
KIND_MIN_POINTS = 20
"""Fewest validation subnets to fit the per-kind correction (up to 5 coefficients) on."""


def error_metrics(pred: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    rel = (pred - measured) / measured
    return {
        "rmse_ms": float(np.sqrt(np.mean((pred - measured) ** 2))),
        "mape_pct": float(np.mean(np.abs(rel)) * 100),
        "within_10pct": float(np.mean(np.abs(rel) <= 0.10)),
        "within_5pct": float(np.mean(np.abs(rel) <= 0.05)),
        "max_abs_pct": float(np.max(np.abs(rel)) * 100),
        "bias_pct": float(np.mean(rel) * 100),
    }


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Rank correlation, or None (JSON null) where it is undefined (fewer than 3 points, ties only)."""
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return None
    return round(float(spearmanr(a, b).statistic), 6)


def _fold_splits(n: int, seed: int, folds: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays of a seeded K-fold split of n points (every form uses the same)."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    for f in range(folds):
        test = np.array(idx[f::folds])
        yield np.setdiff1d(np.arange(n), test), test


def cross_fitted(raw: np.ndarray, measured: np.ndarray, resolutions: np.ndarray | None = None, seed: int = 0,
                 folds: int = FOLDS) -> np.ndarray:
    """Each point predicted by a correction fitted on the other folds (held-out predictions)."""
    out = np.empty_like(raw)
    for train, test in _fold_splits(len(raw), seed, folds):
        c = fit_correction(raw[train], measured[train], None if resolutions is None else resolutions[train])
        out[test] = c.apply_many(raw[test], np.zeros(len(test), dtype=np.int64) if resolutions is None
                                 else resolutions[test])
    return out


def cross_fitted_kinds(kind_costs: np.ndarray, measured: np.ndarray, overhead_ms: float, seed: int = 0,
                       folds: int = FOLDS) -> np.ndarray | None:
    """Held-out predictions of the 'per-kind' correction; None if a fold cannot fit it."""
    out = np.empty_like(measured)
    for train, test in _fold_splits(len(measured), seed, folds):
        c = fit_kind_correction(kind_costs[train], measured[train], overhead_ms)
        if c is None or c.kind_scale is None:
            return None
        scales = np.array([c.kind_scale.get(k, 1.0) for k in KINDS])
        out[test] = overhead_ms + kind_costs[test] @ scales + c.b
    return out


@dataclass(frozen=True)
class Choice:
    correction: Correction
    predicted: np.ndarray
    """What the metrics report: the chosen form's cross-fitted predictions, or raw for 'none'."""
    details: dict[str, Any]


def choose_correction(raw: np.ndarray, measured: np.ndarray, resolutions: np.ndarray | None = None,
                      seed: int = 0, kind_costs: np.ndarray | None = None, overhead_ms: float = 0.0) -> Choice:
    """Pick the correction form with the lowest cross-validated MAPE: none, affine,
    affine+resolution or per-kind.

    The per-resolution form is a candidate only with at least `FOLDS` points per resolution;
    the per-kind form (`kind_costs`: per subnet, the summed block costs of each kind) only
    with at least `KIND_MIN_POINTS` points and positive scales in every fold. Ties go to the
    simpler form.
    """
    raw_err = error_metrics(raw, measured)["mape_pct"]
    if len(raw) < 2 * FOLDS:
        return Choice(Correction(), raw, {"cv_mape_pct": {"none": raw_err}, "reason": "too few points"})
    cands: dict[str, np.ndarray] = {"none": raw, "affine": cross_fitted(raw, measured, None, seed)}
    if resolutions is not None:
        counts = np.unique(resolutions, return_counts=True)[1]
        if len(counts) > 1 and counts.min() >= FOLDS:
            cands["affine+resolution"] = cross_fitted(raw, measured, resolutions, seed)
    if kind_costs is not None and len(raw) >= KIND_MIN_POINTS:
        held_out = cross_fitted_kinds(kind_costs, measured, overhead_ms, seed)
        if held_out is not None and fit_kind_correction(kind_costs, measured, overhead_ms) is not None:
            cands["per-kind"] = held_out
    errs = {k: error_metrics(v, measured)["mape_pct"] for k, v in cands.items()}
    form = min(errs, key=lambda k: (round(errs[k], 9), list(cands).index(k)))
    if form == "none":
        correction = Correction()
    elif form == "per-kind":
        assert kind_costs is not None
        correction = fit_kind_correction(kind_costs, measured, overhead_ms)  # type: ignore[assignment]
    else:
        correction = fit_correction(raw, measured, resolutions if form == "affine+resolution" else None)
    details = {"cv_mape_pct": {k: round(v, 4) for k, v in errs.items()}, "folds": FOLDS,
               "fitted_on": int(len(raw)), "objective": "least squares on relative error"}
    log.info("correction: held-out MAPE %s -> %s", ", ".join(f"{k} {v:.2f}%" for k, v in errs.items()), form)
    return Choice(correction, cands[form], details)


def flops_proxy(flops: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """FLOPs scaled to ms by the factor k minimising sum(((k*f - m)/m)^2)."""
    k = float(np.sum(flops / measured) / np.sum((flops / measured) ** 2))
    return k * flops


def validation_metrics(predicted: np.ndarray, raw: np.ndarray, measured: np.ndarray, flops: np.ndarray,
                       choice: Choice) -> dict[str, Any]:
    proxy = flops_proxy(flops, measured)
    m = error_metrics(predicted, measured)
    fm = error_metrics(proxy, measured)
    rawm = error_metrics(raw, measured)
    out: dict[str, Any] = {"n": int(len(measured)), **{k: round(v, 6) for k, v in m.items()}}
    out["spearman"] = _spearman(predicted, measured)
    out["flops_within_10pct"] = round(fm["within_10pct"], 6)
    out["flops_mape_pct"] = round(fm["mape_pct"], 6)
    out["flops_rmse_ms"] = round(fm["rmse_ms"], 6)
    out["flops_spearman"] = _spearman(flops, measured)
    out.update({f"raw_{k}": round(v, 6) for k, v in rawm.items() if k in ("rmse_ms", "mape_pct", "within_10pct")})
    out["correction_used"] = bool(choice.correction.used)
    out["correction_form"] = choice.correction.form
    out["correction_a"] = round(choice.correction.a, 6)
    out["correction_b_ms"] = round(choice.correction.b, 6)
    out["measured_min_ms"] = round(float(measured.min()), 6)
    out["measured_max_ms"] = round(float(measured.max()), 6)
    return out


def write_points_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """The predicted-vs-measured points, for `dvc plots` (x: measured_ms, y: predicted_ms)."""
    buf = io.StringIO()
    fields = ["measured_ms", "predicted_ms", "flops_m", "flops_proxy_ms", "raw_ms", "level", "arch"]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in fields})
    write_text_atomic(path, buf.getvalue())


def plot_points(path: Path, device: str, measured: np.ndarray, predicted: np.ndarray, proxy: np.ndarray,
                metrics: dict[str, Any]) -> None:
    """Predicted (LUT and FLOPs proxy) vs measured latency, with the +-10% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    lo = float(min(measured.min(), predicted.min(), proxy.min())) * 0.9
    hi = float(max(measured.max(), predicted.max(), proxy.max())) * 1.1
    xs = np.array([lo, hi])
    ax.plot(xs, xs, color="black", lw=1, label="exact")
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="grey", alpha=0.2, label="+-10%")
    ax.scatter(measured, proxy, s=12, alpha=0.6, marker="x", color="tab:orange",
               label=f"FLOPs proxy ({metrics['flops_within_10pct'] * 100:.0f}% within 10%)")
    ax.scatter(measured, predicted, s=14, alpha=0.8, color="tab:blue",
               label=f"LUT ({metrics['within_10pct'] * 100:.0f}% within 10%)")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(f"lut@{device}: n={metrics['n']}, MAPE {metrics['mape_pct']:.1f}%, "
                 f"RMSE {metrics['rmse_ms']:.3g} ms", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save_figure_atomic(fig, path)
