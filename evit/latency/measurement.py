"""A latency measurement: the statistics of one module's timed samples, in milliseconds.

Every device kind returns these (`evit.latency.devices`); tables store their dict form
(`to_dict`, without the raw samples) and the validation pools the raw samples of one
module measured at several times (rounds, re-measurements).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from evit.config import DeviceParams


@dataclass(frozen=True)
class Measurement:
    """Latency statistics of one module on one device, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    n: int
    samples: tuple[float, ...] = field(default=(), repr=False, compare=False)
    """The raw samples (ms), so measurements of one module at several times can be pooled."""

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> Measurement:
        a = np.asarray(samples_ms, dtype=np.float64)
        if a.size == 0:
            raise ValueError("no samples")
        return cls(
            median_ms=float(np.median(a)),
            p10_ms=float(np.percentile(a, 10)),
            p90_ms=float(np.percentile(a, 90)),
            mean_ms=float(a.mean()),
            std_ms=float(a.std()),
            n=int(a.size),
            samples=tuple(float(x) for x in a),
        )

    def to_dict(self) -> dict[str, float | int]:
        """The statistics (not the raw samples), rounded to nanoseconds."""
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items() if k != "samples"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        return cls(**{k: d[k] for k in ("median_ms", "p10_ms", "p90_ms", "mean_ms", "std_ms", "n")})


def statistic(dp: DeviceParams) -> str:
    """The Measurement field a device's table, its validation and the final measurements use
    (`DeviceParams.estimator`)."""
    return f"{dp.estimator}_ms"
