"""Timing under load: the part of the timing discipline that is about the machine, not the runtime.

Every device kind measures through `Device.measure_many` / `measure_chains` (warm-up,
inner repeats, interleaved rounds, the thread clock for single-threaded CPU kinds, a low
percentile as the estimator). On a shared machine that is not enough on its own: another
job can hold the core (or its caches) through a whole round of a few subnets. So a table
build also

- records the host's load average over the measurement (`LoadWatch`), in the table and its
  metrics, beside the estimator, so a table measured on a busy machine says so;
- re-measures what the table and its validation disagree on by more than the validation
  tolerance (`outliers`), instead of trusting one disturbed run: a subnet measured slower
  than predicted is measured again; a subnet measured faster than predicted points at table
  entries timed during a burst, so the table units (carriers) holding its blocks are timed
  again. A re-measurement replaces a recorded value only when it is lower (`keep_lower`):
  other processes can only add time to a run, never remove it, so the lower of two
  estimates of the same module is the less disturbed one. The share within tolerance
  before any re-measurement is recorded too (`within_10pct_first_pass`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

OUTLIER_TOLERANCE = 0.10
"""A validation subnet is re-measured when |predicted - measured| > 10% of measured."""
REMEASURE_PASSES = 2
"""At most this many re-measurement passes over the remaining outliers."""


def load_average() -> tuple[float, float, float] | None:
    """The host's 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


class LoadWatch:
    """Samples the 1-minute load average while a table is measured (call `sample()` often)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.sample()

    def sample(self) -> None:
        la = load_average()
        if la is not None:
            self.samples.append(float(la[0]))

    def summary(self) -> dict[str, Any]:
        """cpu_count and the 1-minute load average at start, end, mean and max (None if unknown)."""
        self.sample()
        s = self.samples
        r = (lambda v: round(float(v), 2)) if s else (lambda v: None)
        return {"cpu_count": os.cpu_count(), "load_1m_start": r(s[0]) if s else None,
                "load_1m_end": r(s[-1]) if s else None, "load_1m_mean": r(np.mean(s)) if s else None,
                "load_1m_max": r(max(s)) if s else None}


def outliers(predicted: Sequence[float], measured: Sequence[float], tolerance: float = OUTLIER_TOLERANCE) -> list[int]:
    """Indices whose prediction is off by more than `tolerance` of the measurement."""
    p = np.asarray(predicted, dtype=np.float64)
    m = np.asarray(measured, dtype=np.float64)
    return [int(i) for i in np.flatnonzero(np.abs(p - m) > tolerance * m)]


def keep_lower(old: float, new: float) -> float:
    """The estimate to keep from two measurements of one module (see the module docstring)."""
    return min(float(old), float(new))
