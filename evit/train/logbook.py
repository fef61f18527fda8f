"""Per-step training records: a JSONL file for plots, batched MLflow uploads, and the plots.

Every step appends one JSON line (loss per role, hard-label CE per role, FLOPs per role,
the sampled level, lr, images/s, sampler stats) to `<out_dir>/train-steps.jsonl`. A
resumed run first drops the lines written after its checkpoint, so the file always
describes one uninterrupted run. MLflow receives the same numbers in batches of
`train.log_every` steps (one `log_batch` call each) instead of a request per metric.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evit.io import save_figure_atomic, write_text_atomic

log = logging.getLogger(__name__)

STEP_LOG = "train-steps.jsonl"
_MLFLOW_BATCH = 900  # log_batch accepts at most 1000 metrics per call


class StepLog:
    """Append-only JSONL of step records, truncated to a checkpoint's step on resume."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if int(json.loads(line)["step"]) <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    break  # a torn last line of a killed run
        write_text_atomic(path, "".join(f"{k}\n" for k in kept))
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_step_log(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
    return rows


class MlflowBatcher:
    """Buffers (step, metrics) and sends them with `MlflowClient.log_batch` every `every` steps."""

    def __init__(self, run_id: str, every: int, prefix: str = "") -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        self.run_id = run_id
        self.every = max(1, every)
        self.prefix = prefix
        self._buf: list[Any] = []
        self._steps = 0

    def add(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if v is None or not math.isfinite(float(v)):
                continue
            self._buf.append(Metric(key=f"{self.prefix}{k}", value=float(v), timestamp=ts, step=int(step)))
        self._steps += 1
        if self._steps >= self.every:
            self.flush()

    def flush(self) -> None:
        while self._buf:
            chunk, self._buf = self._buf[:_MLFLOW_BATCH], self._buf[_MLFLOW_BATCH:]
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as exc:  # noqa: BLE001 - tracking must not kill a training run
                log.warning("MLflow log_batch failed (%s); %d metrics dropped", exc, len(chunk))
        self._steps = 0


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc, q = [], 0.0, []
    for v in values:
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def role_label(role: str) -> str:
    """What a subnet role of a training step is, for plot legends: `level<i>` is the i-th
    subnet drawn at the step's FLOPs level (a sample slot, not a FLOPs level itself)."""
    if role.startswith("level") and role[5:].isdigit():
        return f"subnet {int(role[5:]) + 1} drawn at the step's FLOPs level"
    if role.startswith("rand") and role[4:].isdigit():
        return f"uniform random subnet {int(role[4:]) + 1}"
    return {"min": "smallest subnet (of the step's FLOPs level; uniform/flat samplers: of the space)",
            "max": "largest subnet"}.get(role, role)


def plot_losses(rows: Sequence[dict[str, Any]], path: Path, title: str = "supernet training loss") -> Path:
    """Loss per subnet role vs step (moving average), as a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    roles = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("loss/")})
    window = max(1, len(rows) // 50)
    for role in roles:
        pts = [(r["step"], r[f"loss/{role}"]) for r in rows if f"loss/{role}" in r]
        if pts:
            ax.plot([p[0] for p in pts], _smooth([p[1] for p in pts], window), label=role_label(role), lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (moving average over {window} steps)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if roles:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure_atomic(fig, path)


def plot_flops(rows: Sequence[dict[str, Any]], path: Path, levels: Sequence[float] = (),
               tolerance: float = 0.0, title: str = "sampled subnet FLOPs") -> Path:
    """FLOPs of every sampled subnet vs step (one marker per role), level windows shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for lo in levels:
        ax.axhspan(lo, lo + 2 * tolerance, color="grey", alpha=0.12, lw=0,
                   label="FLOPs level windows" if lo == levels[0] else None)
    roles = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("flops/")})
    for role in roles:
        pts = [(r["step"], r[f"flops/{role}"]) for r in rows if f"flops/{role}" in r]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=4, label=role_label(role), alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("MFLOPs (MACs)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if roles or levels:
        ax.legend(fontsize=8, markerscale=3)
    fig.tight_layout()
    return save_figure_atomic(fig, path)
