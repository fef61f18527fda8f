"""The accuracy-vs-latency Pareto front of everything a search evaluated, as data and plot.

A point is on the front when no other point is at least as fast and at least as accurate
while strictly better in one of the two. The CSV (one row per front point, sorted by
latency) is what `dvc plots` draws; the PNG is for people and MLflow.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evit.io import save_figure_atomic, write_text_atomic


def pareto_front(points: Sequence[dict[str, Any]], x: str = "latency_ms", y: str = "top1") -> list[dict[str, Any]]:
    """Non-dominated points (minimise `x`, maximise `y`), sorted by `x` ascending."""
    ordered = sorted(points, key=lambda p: (p[x], -p[y], p.get("key", "")))
    front: list[dict[str, Any]] = []
    best_y = float("-inf")
    for p in ordered:
        if p[y] > best_y:
            front.append(p)
            best_y = p[y]
    return front


def write_front_csv(path: Path, front: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in front:
        writer.writerow({c: (round(row[c], 6) if isinstance(row[c], float) else row[c]) for c in columns})
    write_text_atomic(path, buf.getvalue())


def plot_search(
    path: Path,
    points: Sequence[dict[str, Any]],
    front: Sequence[dict[str, Any]],
    chosen: Sequence[dict[str, Any]],
    *,
    title: str,
    latency_budgets: Sequence[float] = (),
    baselines: Sequence[dict[str, Any]] = (),
) -> None:
    """Scatter of evaluated subnets, the front as a step line, budgets and chosen subnets.

    `baselines` ({label, latency_ms, top1}): standalone models as a second series, at their
    measured latency on the same device (see evit.baselines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    try:
        ax.scatter([p["latency_ms"] for p in points], [100 * p["top1"] for p in points], s=10, alpha=0.35,
                   color="tab:gray", label=f"evaluated ({len(points)})")
        ax.step([p["latency_ms"] for p in front], [100 * p["top1"] for p in front], where="post",
                color="tab:blue", marker="o", ms=3, label="Pareto front")
        for b in latency_budgets:
            ax.axvline(b, color="tab:red", ls="--", lw=0.8)
        for c in chosen:
            ax.scatter([c["latency_ms"]], [100 * c["top1"]], s=70, marker="*", color="tab:red", zorder=5)
            ax.annotate(c["label"], (c["latency_ms"], 100 * c["top1"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=8)
        if baselines:
            ax.scatter([b["latency_ms"] for b in baselines], [100 * b["top1"] for b in baselines], s=40,
                       marker="s", color="tab:green", zorder=4, label="standalone timm models (measured ms)")
            for b in baselines:
                ax.annotate(b["label"], (b["latency_ms"], 100 * b["top1"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color="tab:green")
        ax.set_xlabel("predicted latency (ms; baselines: measured)")
        ax.set_ylabel("top-1 on the search split (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        save_figure_atomic(fig, path)
    finally:
        plt.close(fig)
