"""Operations: one writer per workspace (`evit.workspace`), with real concurrent processes: a second
writer waits naming the holder, or fails at once with --no-wait; the lock of a killed
holder is taken over. (A real `evit pipeline` against `evit train --no-wait`:
tests/test_cancel.py.) A bad `-d` fails before Prefect starts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from evit.workspace import LOCK_FILE, WorkspaceBusy, holder, workspace_lock
from tests.flow_helpers import VENV_BIN, clean_env

HOLD = textwrap.dedent("""
    import sys, time
    from evit.workspace import workspace_lock
    with workspace_lock(sys.argv[1], "holder-test"):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _holder(root: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(seconds)], stdout=subprocess.PIPE, text=True,
                            env=clean_env())
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_no_wait_names_the_holder_and_cli_exits_2(tmp_path: Path) -> None:
    proc = _holder(tmp_path, 60)
    try:
        with pytest.raises(WorkspaceBusy, match=rf"holder-test \(pid {proc.pid} on .+, since .+\)"):
            with workspace_lock(tmp_path, "second", wait=False):
                pass
        (tmp_path / "params.yaml").write_text("{}\n")
        t0 = time.monotonic()
        cli = subprocess.run([str(VENV_BIN / "evit"), "prepare", "--no-wait"], cwd=tmp_path, env=clean_env(),
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 2, cli.stderr
        assert f"in use by holder-test (pid {proc.pid}" in cli.stderr and "Traceback" not in cli.stderr
        assert time.monotonic() - t0 < 60
        assert not (tmp_path / "data").exists(), "the refused run wrote outputs"
    finally:
        proc.kill()
        proc.wait()


def test_second_writer_waits_then_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    proc = _holder(tmp_path, 2.0)
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="evit.workspace"):
        with workspace_lock(tmp_path, "waiter", poll_s=0.2):
            waited = time.monotonic() - t0
            assert holder(tmp_path)["what"] == "waiter"
    proc.wait(timeout=10)
    assert waited > 1.0, "the second writer did not wait for the first"
    assert f"in use by holder-test (pid {proc.pid}" in caplog.text
    assert holder(tmp_path) is None, "the holder record outlived the lock"


def test_lock_of_a_killed_holder_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    proc = _holder(tmp_path, 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stale = json.loads((tmp_path / f"{LOCK_FILE}.json").read_text())
    assert stale["pid"] == proc.pid  # left behind by the killed process
    with caplog.at_level("WARNING", logger="evit.workspace"):
        with workspace_lock(tmp_path, "next", wait=False):
            pass
    assert f"took over the workspace lock left by holder-test (pid {proc.pid}" in caplog.text


def test_holder_children_do_not_queue_behind_it(tmp_path: Path) -> None:
    """torchrun ranks started by the train task run under their parent's lock."""
    with workspace_lock(tmp_path, "parent"):
        child = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path), "0"], capture_output=True, text=True,
                               timeout=60, env={**clean_env(), **_held_env()})
    assert child.returncode == 0 and child.stdout.strip() == "held", child.stderr


def _held_env() -> dict[str, str]:
    import os

    from evit.workspace import HELD_ENV

    return {HELD_ENV: os.environ[HELD_ENV]}


def test_pipeline_unknown_device_fails_before_any_server(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("{}\n")
    home = tmp_path / "prefect-home"
    proc = subprocess.run([str(VENV_BIN / "evit"), "pipeline", "-d", "nosuch"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=clean_env({"PREFECT_HOME": str(home)}))
    assert proc.returncode == 2, proc.stderr
    assert "unknown devices ['nosuch']; accepted: ['cpu-1t']" in proc.stderr
    assert "Traceback" not in proc.stderr and "server" not in proc.stderr.lower()
    assert not list(home.glob("*.db")), "Prefect's server database was created"
