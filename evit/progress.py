"""Progress of long stages: a live bar (rate, ETA) on a terminal, plain log lines elsewhere.

One helper for every stage (training steps, LUT measurements, search generations, exports)
so they all behave the same:

- stderr is a terminal: a tqdm bar with rate and ETA, redrawn in place (inside Prefect tasks
  too: the bar writes to the process's real stderr, whatever the task's stdout is);
- stderr is not a terminal (Prefect workers, CI, `dvc repro` logs, files): no control
  characters, but an INFO log line at every tenth of the work (at most one per
  `min_interval_s`) and at the end, with done/total, rate and ETA, so a log still shows how
  far a stage is and how long it has left.

`EVIT_PROGRESS=bar|log|off` overrides the detection (e.g. `log` under a terminal multiplexer
that eats redraws).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from typing import Any, TextIO

MODE_ENV = "EVIT_PROGRESS"


def fmt_seconds(seconds: float) -> str:
    """ETA text: 45s, 3m05s, 2h04m."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def mode(stream: TextIO | None = None) -> str:
    """'bar' on a terminal, else 'log' (or what EVIT_PROGRESS says)."""
    forced = os.environ.get(MODE_ENV, "").strip().lower()
    if forced in ("bar", "log", "off"):
        return forced
    stream = stream if stream is not None else sys.__stderr__
    try:
        return "bar" if stream is not None and stream.isatty() else "log"
    except (AttributeError, ValueError):
        return "log"


class Progress:
    """Count units of work towards `total`; see the module docstring for how it shows."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", initial: int = 0,
                 logger: logging.Logger | None = None, min_interval_s: float = 10.0,
                 enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = max(0, int(total))
        self.n = int(initial)
        self.desc = desc
        self.unit = unit
        self.log = logger or logging.getLogger("evit.progress")
        self.min_interval_s = min_interval_s
        self.mode = mode(stream) if enabled else "off"
        self._t0 = time.monotonic()
        self._n0 = self.n
        self._last_log = -float("inf")
        self._next_tenth = self._tenth(self.n) + 1
        self._postfix: dict[str, Any] = {}
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            # a terminal that reports 0 columns (a pty without a size: some CI, `script`, containers)
            # would get an empty bar; give it a fixed width instead
            sized = shutil.get_terminal_size((0, 0)).columns > 0
            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, dynamic_ncols=sized,
                             ncols=None if sized else 100, nrows=None if sized else 20, mininterval=0.5,
                             file=stream if stream is not None else sys.__stderr__, leave=True)

    def _tenth(self, n: int) -> int:
        return 10 * n // self.total if self.total else 10

    def rate(self) -> float:
        """Units per second since this object was created (resumed work excluded)."""
        dt = time.monotonic() - self._t0
        return (self.n - self._n0) / dt if dt > 0 else 0.0

    def eta_s(self) -> float | None:
        r = self.rate()
        return (self.total - self.n) / r if r > 0 else None

    def line(self) -> str:
        """The plain-text progress line (what the log mode prints)."""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = self.eta_s()
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {self.rate():.2f} {self.unit}/s"
        if self.n < self.total:
            text += f", ETA {fmt_seconds(eta)}" if eta is not None else ", ETA ?"
        else:
            text += f", done in {fmt_seconds(time.monotonic() - self._t0)}"
        if self._postfix:
            text += ", " + " ".join(f"{k}={v}" for k, v in self._postfix.items())
        return text

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if postfix:
            self._postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self._postfix, refresh=False)
            self._bar.update(n)
        elif self.mode == "log":
            now = time.monotonic()
            tenth = self._tenth(self.n)
            if tenth >= self._next_tenth and (now - self._last_log >= self.min_interval_s or self.n >= self.total):
                self._next_tenth = tenth + 1
                self._last_log = now
                self.log.info("%s", self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
