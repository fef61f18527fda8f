"""Fitness of subnets, cached per architecture and persisted between runs.

Evaluating a subnet (BN recalibration + a pass over the `search` split) is the cost of
the whole search, so no arch is evaluated twice: not within a budget, not across the
budgets of a device, and not across a re-run or a resumed run (the cache file lives in
the device's search folder and is flushed every few evaluations).

A fitness value is only valid for the exact supernet weights, data version, split and
evaluation settings it was measured with. Those go into the cache's `context`; a cache
file with another context is ignored (and overwritten), never mixed in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evit.arch import Arch
from evit.io import read_json, write_json_atomic

log = logging.getLogger(__name__)

CACHE_VERSION = 1


class FitnessCache:
    """arch key -> fitness, tied to one evaluation context; `evaluate` is the only entry."""

    def __init__(self, path: Path | None, context: dict[str, Any], *, flush_every: int = 8) -> None:
        self.path = path
        self.context = context
        self.flush_every = flush_every
        self.values: dict[str, float] = {}
        self.hits = 0
        self.misses = 0
        self.seconds = 0.0
        self._dirty = 0
        if path is not None and path.is_file():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            data = read_json(path)
        except (OSError, ValueError) as exc:
            log.warning("fitness cache %s is unreadable (%s); starting empty", path, exc)
            return
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("context") != self.context:
            log.info("fitness cache %s was made for another supernet/data/settings; starting empty", path)
            return
        values = data.get("values", {})
        self.values = {str(k): float(v) for k, v in values.items()}
        log.info("fitness cache: %d subnets already evaluated (%s)", len(self.values), path)

    def get(self, arch: Arch) -> float | None:
        return self.values.get(arch.key)

    def __contains__(self, arch: Arch) -> bool:
        return arch.key in self.values

    def __len__(self) -> int:
        return len(self.values)

    def evaluate(self, arch: Arch, fn: Callable[[Arch], float]) -> float:
        """The cached fitness of `arch`, computing (and recording) it with `fn` on a miss."""
        cached = self.values.get(arch.key)
        if cached is not None:
            self.hits += 1
            return cached
        t0 = time.perf_counter()
        value = float(fn(arch))
        self.seconds += time.perf_counter() - t0
        self.misses += 1
        self.values[arch.key] = value
        self._dirty += 1
        if self._dirty >= self.flush_every:
            self.flush()
        return value

    def flush(self) -> None:
        if self.path is None or not self._dirty:
            return
        write_json_atomic(self.path, {"version": CACHE_VERSION, "context": self.context, "values": self.values},
                          indent=None)
        self._dirty = 0

    def stats(self) -> dict[str, float | int]:
        return {"cached": len(self.values), "hits": self.hits, "evaluated": self.misses,
                "eval_seconds": round(self.seconds, 3)}
