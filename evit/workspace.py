"""One writer per workspace: a stage or pipeline run holds a lock on the project it writes.

Why: two runs in one project (two `evit pipeline`, a nightly and a weekly deployment that
overlap, `dvc repro` next to a running flow) write the same files (`models/last.pt`,
`dvc.lock`, the LUTs) and one silently resumes from the other's checkpoint. So every
command that writes outputs takes `.evit-cache/workspace.lock` (a `filelock` lock: an
OS-level `flock`, released by the kernel when the holder dies, so the lock of a killed run
is taken over without any cleanup) and records who holds it in
`.evit-cache/workspace.lock.json` (pid, host, command, since when). A second run waits,
saying which run it waits for, or fails at once with `--no-wait`.

Processes the holder starts itself (torchrun ranks of the train task) inherit
`EVIT_WORKSPACE_LOCK` and do not queue behind their own parent. Under a torchrun started
by hand the ranks are one job: rank 0 holds the lock for it, and the other ranks (which
write nothing into the workspace) do not take it, or they would wait on rank 0 while rank
0 waits for them in the process-group rendezvous.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from evit import cancel
from evit.errors import UserError
from evit.io import write_json_atomic

log = logging.getLogger(__name__)

LOCK_FILE = Path(".evit-cache") / "workspace.lock"
HELD_ENV = "EVIT_WORKSPACE_LOCK"
"""Set while held to "<workspace>:<pid>" so the holder's own child processes skip the lock."""
WAIT_LOG_S = 60.0


class WorkspaceBusy(UserError):
    """Another run holds the workspace and `--no-wait` was given."""


def _info_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".json")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(root: str | os.PathLike[str] = ".") -> dict[str, Any] | None:
    """Who holds (or last held) the workspace lock, as recorded next to it."""
    path = _info_path(Path(root) / LOCK_FILE)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (no holder recorded)"
    return (f"{info.get('what', '?')} (pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}: "
            f"{info.get('command', '?')})")


@contextlib.contextmanager
def workspace_lock(root: str | os.PathLike[str] = ".", what: str = "evit", *, wait: bool = True,
                   poll_s: float = 1.0) -> Iterator[None]:
    """Hold the workspace `root` for the block (see the module docstring).

    wait=False: raise `WorkspaceBusy` at once, naming the holder. While waiting, a
    SIGTERM/SIGINT (`evit.cancel`) stops the wait.
    """
    root_path = Path(root).resolve()
    if os.environ.get("RANK", "0") != "0":  # a torchrun rank > 0: rank 0 holds it for the job
        yield
        return
    token = os.environ.get(HELD_ENV, "")
    if token.rpartition(":")[0] == str(root_path):
        info = holder(root_path)
        if info is not None and str(info.get("pid")) == token.rpartition(":")[2]:
            yield  # our parent holds it for us
            return
    lock_path = root_path / LOCK_FILE
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        info = holder(root_path)
        if not wait:
            raise WorkspaceBusy(f"the workspace {root_path} is in use by {describe(info)}; wait for it to finish, "
                                "or run again without --no-wait to queue behind it") from None
        log.warning("waiting for the workspace %s: in use by %s", root_path, describe(info))
        last_log = time.monotonic()
        while True:
            cancel.check("while waiting for the workspace")
            try:
                lock.acquire(timeout=poll_s)
                break
            except Timeout:
                if time.monotonic() - last_log >= WAIT_LOG_S:
                    log.info("still waiting for the workspace: in use by %s", describe(holder(root_path)))
                    last_log = time.monotonic()
    previous = holder(root_path)
    if previous and previous.get("host") == socket.gethostname() and isinstance(previous.get("pid"), int) \
            and previous["pid"] != os.getpid() and _pid_alive(previous["pid"]) is False:
        log.warning("took over the workspace lock left by %s (that process is gone)", describe(previous))
    info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
    old_env = os.environ.get(HELD_ENV)
    try:
        write_json_atomic(_info_path(lock_path), info)
        os.environ[HELD_ENV] = f"{root_path}:{os.getpid()}"
        yield
    finally:
        if old_env is None:
            os.environ.pop(HELD_ENV, None)
        else:
            os.environ[HELD_ENV] = old_env
        with contextlib.suppress(OSError):
            _info_path(lock_path).unlink()
        lock.release()
