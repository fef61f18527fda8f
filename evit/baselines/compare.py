"""Searched subnet per budget vs the best standalone baseline under the same budget.

One row per feasible search budget of a device: the searched subnet's val top-1 and
measured latency, the baseline with the highest val top-1 whose latency *measured on the
same device with the same estimator* fits the budget (for FLOPs budgets: whose MACs fit),
and the difference. Latency budgets compare measured against measured, not the LUT's
prediction, so the predictor's error cannot favour either side; a searched subnet whose
measured latency lands over the budget (the search constrains the prediction) is flagged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def comparison_rows(device: str, budgets: Sequence[dict[str, Any]], baselines: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for s in budgets:
        if not s.get("feasible"):
            continue
        kind, value = s["budget"]["kind"], float(s["budget"]["value"])
        if kind == "flops":
            fits = [m for m in baselines["models"] if m["macs_m"] <= value]
        else:
            fits = [m for m in baselines["models"] if device in m["latency_ms"] and m["latency_ms"][device] <= value]
        best = max(fits, key=lambda m: m["val_top1"], default=None)
        rows.append({
            "budget": s["label"], "kind": kind, "value": value,
            "searched_val_top1": s["val_top1"], "searched_latency_ms": s["measured_latency_ms"],
            "searched_flops_m": s.get("flops_m"),
            # the search constrains the LUT's prediction; the measurement may land over the budget
            "searched_within_budget": (s["measured_latency_ms"] <= value if kind == "latency"
                                       else float(s.get("flops_m") or 0.0) <= value),
            "baseline": best["model"] if best else None,
            "baseline_val_top1": best["val_top1"] if best else None,
            "baseline_latency_ms": best["latency_ms"].get(device) if best else None,
            "baseline_macs_m": best["macs_m"] if best else None,
            "delta_top1": (s["val_top1"] - best["val_top1"]) if best else None,
        })
    return rows


def comparison_markdown(device: str, rows: Sequence[dict[str, Any]]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [f"| {device} budget | searched top-1 % | searched ms | best baseline within budget | baseline top-1 % "
             "| baseline ms | delta (pts) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "-" if r["delta_top1"] is None else f"{100 * r['delta_top1']:+.1f}"
        over = "" if r.get("searched_within_budget", True) else " (over budget)"
        lines.append(f"| {r['budget']} | {pct(r['searched_val_top1'])} | {ms(r['searched_latency_ms'])}{over} | "
                     f"{r['baseline'] or 'none fits'} | {pct(r['baseline_val_top1'])} | {ms(r['baseline_latency_ms'])} "
                     f"| {delta} |")
    return "\n".join(lines)
