"""The latency table on disk: its JSON format, the resumable partial file, and load checks.

A finished table (`luts/<device>.json`) looks like::

    {"format": 1, "complete": true, "device": {...describe()...}, "versions": {...},
     "created": "2026-11-29T00:30:00+00:00", "space": {...structure_dict()...},
     "num_classes": 10, "mode": "full", "method": "in-context", "overhead_ms": 0.004,
     "entries": {"mbconv|h16|i16|o24|e3|k5|s2|se0": {"median_ms": 0.051, "p10_ms": ..., "n": 60,
                                                    "carriers": 2}, ...},
     "correction": {"used": true, "a": 1.02, "b": -0.01, ...}, "fallback": null, ...}

Keys are `Block.key` strings, so a person can read which configuration an entry times.

While a table is being built, measurements go to `luts/<device>.partial.json` (flushed
atomically every few seconds); an interrupted build resumes from it when the device
settings, host, library versions and space still match (its `fingerprint`), and starts
over otherwise. The partial file always says `"complete": false`, and `load_lut` refuses
anything that is not complete: a partial table is never used as if it were whole.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from evit.errors import LUTError
from evit.io import write_json_atomic
from evit.latency.measurement import Measurement
from evit.space import SearchSpace

log = logging.getLogger(__name__)

FORMAT = 1
FLUSH_SECONDS = 10.0
FLUSH_ENTRIES = 32


def partial_path(lut_path: Path) -> Path:
    return lut_path.with_name(f"{lut_path.stem}.partial.json")


class PartialLUT:
    """Measurements of an unfinished build, flushed atomically so a kill loses seconds, not hours.

    `samples` maps a block key to all its raw samples (ms) so far, pooled over the carrier
    subnets it was timed in and over the measurement rounds; `validation` does the same for
    whole subnets (arch key). `done` names the finished units of work ("<unit>@<round>").
    """

    def __init__(self, path: Path, fingerprint: dict[str, Any]) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.samples: dict[str, list[float]] = {}
        self.validation: dict[str, list[float]] = {}
        self.done: set[str] = set()
        self.measure_seconds = 0.0
        self.device_seconds = 0.0
        """Of `measure_seconds` (+ a budget's probe), the time the device spent timing
        (preparation left out)."""
        self.probe: dict[str, float] | None = None
        """A budgeted build's timing probe (`evit.latency.plan.Probe`): kept, so a resumed or
        re-budgeted build plans from the same estimates and re-times nothing it has."""
        self.budget_progress: dict[str, float] = {"expected": 0.0, "spent": 0.0}
        """A budgeted build's table units so far: device seconds expected, and spent
        (`evit.latency.measure.Deadline`)."""
        self._dirty = 0
        self._last_flush = time.monotonic()

    @classmethod
    def open(cls, path: Path, fingerprint: dict[str, Any]) -> PartialLUT:
        """Resume `path` if it was written for the same fingerprint, else start empty."""
        state = cls(path, fingerprint)
        if not path.is_file():
            return state
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("ignoring unreadable partial LUT %s (%s); starting over", path, exc)
            return state
        if data.get("format") != FORMAT or data.get("fingerprint") != fingerprint:
            log.warning("partial LUT %s was measured with other settings (device, host, versions or space); "
                        "starting over", path)
            return state
        state.samples = {k: list(v) for k, v in data.get("samples", {}).items()}
        state.validation = {k: list(v) for k, v in data.get("validation", {}).items()}
        state.done = set(data.get("done", []))
        state.measure_seconds = float(data.get("measure_seconds", 0.0))
        state.device_seconds = float(data.get("device_seconds", 0.0))
        state.probe = data.get("probe")
        state.budget_progress.update({k: float(v) for k, v in data.get("budget_progress", {}).items()})
        log.info("resuming %s: %d units of work done (%d blocks, %d validation subnets measured so far)", path,
                 len(state.done), len(state.samples), len(state.validation))
        return state

    def add(self, unit: str, measured: dict[str, Measurement], *, validation: bool = False) -> None:
        """Record one finished unit of work: the samples of every key it timed."""
        target = self.validation if validation else self.samples
        for key, m in measured.items():
            target.setdefault(key, []).extend(round(x, 6) for x in m.samples)
        self.done.add(unit)
        self._dirty += 1

    def maybe_flush(self) -> None:
        if self._dirty >= FLUSH_ENTRIES or (self._dirty and time.monotonic() - self._last_flush >= FLUSH_SECONDS):
            self.flush()

    def flush(self) -> None:
        write_json_atomic(self.path, {
            "format": FORMAT,
            "complete": False,
            "fingerprint": self.fingerprint,
            "done": sorted(self.done),
            "samples": self.samples,
            "validation": self.validation,
            "measure_seconds": round(self.measure_seconds, 3),
            "device_seconds": round(self.device_seconds, 3),
            **({"probe": self.probe} if self.probe else {}),
            "budget_progress": {k: round(v, 3) for k, v in self.budget_progress.items()},
        }, indent=None)
        self._dirty = 0
        self._last_flush = time.monotonic()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def load_lut(path: str | Path) -> dict[str, Any]:
    """Read a finished LUT; LUTError if it is missing, unreadable, of another format or partial."""
    path = Path(path)
    if not path.is_file():
        hint = " (an interrupted build left a partial one next to it; re-run `evit lut` to finish it)" \
            if partial_path(path).is_file() else ""
        raise LUTError(f"latency table {str(path)!r} not found{hint}; build it with `evit lut --device NAME`")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LUTError(f"latency table {str(path)!r} is not valid JSON ({exc}); rebuild it with `evit lut`") \
            from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise LUTError(f"latency table {str(path)!r} has format {got!r}; this version reads format {FORMAT}. "
                       "Rebuild it with `evit lut`")
    if data.get("complete") is not True:
        raise LUTError(f"latency table {str(path)!r} is partial ({len(data.get('entries', {}))} entries measured, "
                       "build not finished); it is never used as complete. Finish it with `evit lut`")
    if not isinstance(data.get("entries"), dict) or not data["entries"]:
        raise LUTError(f"latency table {str(path)!r} has no entries; rebuild it with `evit lut`")
    return data


def check_space(lut: dict[str, Any], space: SearchSpace, where: str) -> None:
    """LUTError unless the table was built for `space` (same structure and number of classes)."""
    want = space.structure_dict()
    got = lut.get("space")
    if not isinstance(got, dict):
        raise LUTError(f"latency table {where} records no search space; rebuild it with `evit lut`")
    if got == want:
        return
    if {k: v for k, v in got.items() if k != "num_classes"} == {k: v for k, v in want.items() if k != "num_classes"}:
        raise LUTError(f"latency table {where} was built for {got.get('num_classes')} classes, but the search "
                       f"space here has {want['num_classes']} (the head differs); rebuild it with `evit lut` "
                       "after `evit prepare`")
    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    raise LUTError(f"latency table {where} was built for search space '{got.get('name')}', not for this "
                   f"'{want['name']}' space (differs in: {', '.join(diff)}); rebuild it with `evit lut`")
