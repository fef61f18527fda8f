"""Cooperative cancellation: SIGTERM / SIGINT stop the work after the current step.

Why cooperative: a signal handler that raises in the main thread cannot stop work running
in other threads (Prefect runs tasks in worker threads), and killing a training step half
way loses everything since the last periodic checkpoint. So the handler only records the
request; the long loops (training steps, LUT measurements, search generations, exports)
call `check()` between steps, which raises `Cancelled` after any cleanup they do first
(the trainer writes a checkpoint of the step reached).

    evit train      SIGTERM -> checkpoint of the step reached -> exit 143 (SIGINT: 130)

A second signal while stopping gives up on the graceful path and exits at once (the
atomic writes leave no half-written output either way). Kubernetes, systemd and Prefect
workers all stop work with SIGTERM and wait a grace period (30 s by default) before
SIGKILL; the step granularity keeps the stop well inside it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterable

log = logging.getLogger(__name__)

_EVENT = threading.Event()
_SIGNUM: int | None = None
HANDLED = (signal.SIGTERM, signal.SIGINT)


class Cancelled(Exception):  # noqa: N818 - reads as "the stage was cancelled"
    """The work stopped on a SIGTERM/SIGINT request; `signum` says which (exit 128 + signum).

    An `Exception` (not `BaseException`) so Prefect records the task's reason; it is never
    retried (`evit.retry`) and the CLI turns it into exit code 130 / 143.
    """

    def __init__(self, signum: int, what: str = "") -> None:
        self.signum = int(signum)
        self.what = what
        name = signal.Signals(self.signum).name
        super().__init__(f"cancelled by {name}" + (f" {what}" if what else ""))

    def __reduce__(self) -> tuple[type, tuple[int, str]]:  # picklable despite the custom signature
        return (type(self), (self.signum, self.what))

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


def exit_code(signum: int) -> int:
    """The shell convention for a process stopped by a signal: 128 + signal number."""
    return 128 + int(signum)


def request(signum: int = signal.SIGTERM) -> None:
    """Ask every cooperating loop in this process to stop (what the signal handler does)."""
    global _SIGNUM
    if _SIGNUM is None:
        _SIGNUM = int(signum)
    _EVENT.set()


def requested() -> int | None:
    """The signal number of a pending cancellation request, else None."""
    return _SIGNUM if _EVENT.is_set() else None


def check(what: str = "") -> None:
    """Raise `Cancelled` if a stop was requested (call between units of work)."""
    signum = requested()
    if signum is not None:
        raise Cancelled(signum, what)


def reset() -> None:
    """Forget a request (tests, or a long-lived process starting new work)."""
    global _SIGNUM
    _SIGNUM = None
    _EVENT.clear()


def _handler(signum: int, frame: object) -> None:
    if _EVENT.is_set():
        log.warning("second %s: stopping now without waiting for the current step", signal.Signals(signum).name)
        os._exit(exit_code(_SIGNUM or signum))
    log.warning("%s received: stopping after the current step (send it again to stop at once)",
                signal.Signals(signum).name)
    request(signum)


def install(signals: Iterable[int] = HANDLED) -> None:
    """Route SIGTERM / SIGINT to `request` (main thread only; the CLI calls this once)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in signals:
        signal.signal(s, _handler)
