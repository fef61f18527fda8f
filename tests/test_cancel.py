"""SIGTERM / SIGINT to real `evit pipeline` and `evit train` processes: they stop after the
current step with a checkpoint of it, publish nothing partial, close the runs as KILLED /
Cancelled, leave no process behind, exit 143 / 130, and a re-run resumes (from the previous
checkpoint when the latest one is truncated). A second writer meanwhile fails at once with
`--no-wait`, naming the holder."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, deep_merge
from tests.flow_helpers import (VENV_BIN, clean_env, flow_env, prefect_home, run,  # noqa: F401
                                shared_mlflow_db, stop_process_group, tiny)
from tests.train_helpers import prepare_small_digits, tiny_overrides

pytestmark = pytest.mark.slow
STOP_WITHIN_S = 10.0


def _project(root: Path, overrides: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(deep_merge(base, overrides), sort_keys=False))
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


def _start(cmd: list[str], root: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=err, start_new_session=True)


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> re.Match[str]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        m = re.search(pattern, log.read_text(errors="replace"))
        if m:
            return m
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    stop_process_group(proc, signal.SIGKILL)
    raise AssertionError(f"{pattern!r} never appeared (exit {proc.returncode}):\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen[bytes], sig: int) -> tuple[int, float]:
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        stop_process_group(proc, signal.SIGKILL)
        raise AssertionError(f"{signal.Signals(sig).name} did not stop the process within 60 s") from None
    return rc, time.monotonic() - t0


def _assert_no_leftovers(pgid: int) -> None:
    """Nothing of the process group (ephemeral Prefect server, loader workers, ...) survives."""
    time.sleep(0.5)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return
    ps = subprocess.run(["ps", "-o", "pid,cmd", "-g", str(pgid)], capture_output=True, text=True).stdout
    os.killpg(pgid, signal.SIGKILL)
    raise AssertionError(f"processes left behind:\n{ps}")


def _statuses(tracking_uri: str, experiment: str) -> dict[str, list[str]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    out: dict[str, list[str]] = {}
    for r in runs:
        out.setdefault(r.data.tags.get("mlflow.runName", "?"), []).append(r.info.status)
    return out


def test_pipeline_sigterm_stops_checkpoints_and_resumes(tmp_path: Path, flow_env: Path,  # noqa: F811
                                                        shared_mlflow_db: str) -> None:  # noqa: F811
    experiment = f"cancel-{uuid.uuid4().hex[:8]}"
    root = _project(tmp_path / "proj", tiny(train={**tiny()["train"], "epochs": 10, "checkpoint_every": 4},
                                            tracking={"retries": 1, "experiment": experiment}))
    env = clean_env({"MLFLOW_TRACKING_URI": shared_mlflow_db, "EVIT_LOG_LEVEL": "INFO"})
    log = tmp_path / "pipeline.log"
    proc = _start([str(VENV_BIN / "evit"), "pipeline"], root, env, log)
    _wait_for(log, r"checkpoint models/last.pt at step 4\b", proc)

    # one writer per workspace: a second run fails at once, naming the holder
    second = run([str(VENV_BIN / "evit"), "train", "--no-wait"], root, env, check=False)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"in use by evit pipeline (params.yaml) (pid {proc.pid} on " in second.stderr
    assert "Traceback" not in second.stderr

    rc, seconds = _stop(proc, signal.SIGTERM)
    text = log.read_text()
    assert rc == 143, text[-4000:]
    assert seconds < STOP_WITHIN_S, f"stopped after {seconds:.1f}s"
    _assert_no_leftovers(proc.pid)
    assert "Finished in state Cancelled('cancelled by SIGTERM" in text, text[-3000:]
    assert "Traceback" not in text
    step = int(torch.load(root / "models/last.pt", weights_only=True, map_location="cpu")["step"])
    assert 4 <= step < 30
    assert not (root / "models/supernet.pt").exists(), "a stopped training published a final checkpoint"
    assert not (root / "dvc.lock").exists() or "train" not in yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    statuses = _statuses(shared_mlflow_db, experiment)
    assert statuses["pipeline"] == ["KILLED"] and statuses["train"] == ["KILLED"], statuses

    # the next run resumes from the step reached and finishes
    again = run([str(VENV_BIN / "evit"), "pipeline"], root, env)
    assert f"resuming models/last.pt from step {step}/30" in again.stderr, again.stderr[-3000:]
    assert "prepare: cached" in again.stderr
    assert (root / "models/supernet.pt").is_file()
    statuses = _statuses(shared_mlflow_db, experiment)
    assert statuses["pipeline"] == ["KILLED", "FINISHED"], statuses


def test_train_sigint_checkpoints_then_resumes_from_previous_when_latest_truncated(
        tmp_path: Path, shared_mlflow_db: str) -> None:  # noqa: F811
    prepared = prepare_small_digits(tmp_path / "data")
    experiment = f"cancel-train-{uuid.uuid4().hex[:8]}"
    root = _project(tmp_path / "proj", {**tiny_overrides(prepared, epochs=12, checkpoint_every=4),
                                        "tracking": {"experiment": experiment}})
    env = clean_env({"MLFLOW_TRACKING_URI": shared_mlflow_db, "EVIT_LOG_LEVEL": "INFO"})
    log = tmp_path / "train.log"
    proc = _start([str(VENV_BIN / "evit"), "train"], root, env, log)
    _wait_for(log, r"checkpoint models/last.pt at step 8\b", proc)
    rc, seconds = _stop(proc, signal.SIGINT)
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert seconds < STOP_WITHIN_S
    assert "stopped: cancelled by SIGINT at step" in text and "Traceback" not in text
    _assert_no_leftovers(proc.pid)
    last = torch.load(root / "models/last.pt", weights_only=True, map_location="cpu")["step"]
    prev = torch.load(root / "models/last.prev.pt", weights_only=True, map_location="cpu")["step"]
    assert 8 <= prev < last < 36, (prev, last)
    assert not (root / "models/supernet.pt").exists()
    assert _statuses(shared_mlflow_db, experiment)["train"] == ["KILLED"]

    # a truncated latest checkpoint: reported, and the previous one is resumed
    data = (root / "models/last.pt").read_bytes()
    (root / "models/last.pt").write_bytes(data[: len(data) // 2])
    again = run([str(VENV_BIN / "evit"), "train"], root, env)
    assert "models/last.pt is unusable" in again.stderr and "resuming from the previous checkpoint" in again.stderr
    assert f"resuming models/last.prev.pt from step {prev}/36" in again.stderr, again.stderr[-3000:]
    assert (root / "models/supernet.pt").is_file()
    assert torch.load(root / "models/last.pt", weights_only=True, map_location="cpu")["step"] == 36
    assert _statuses(shared_mlflow_db, experiment)["train"] == ["KILLED", "FINISHED"]


def test_lut_sigterm_keeps_measured_units_and_resumes(tmp_path: Path, shared_mlflow_db: str) -> None:  # noqa: F811
    """A latency table stops within the limit, writes no table, keeps what it measured, and
    the next run resumes from it instead of starting over."""
    prepared = prepare_small_digits(tmp_path / "data")
    dev = {"name": "cpu-1t", "kind": "torch-cpu", "threads": 1, "warmup": 2, "repeats": 10, "rounds": 4,
           "estimator": "p10", "validate_subnets": 10, "budgets_ms": [5.0]}
    root = _project(tmp_path / "proj", {**tiny_overrides(prepared), "devices": [dev],
                                        "tracking": {"experiment": f"cancel-lut-{uuid.uuid4().hex[:8]}"}})
    env = clean_env({"MLFLOW_TRACKING_URI": shared_mlflow_db, "EVIT_LOG_LEVEL": "INFO"})
    log = tmp_path / "lut.log"
    proc = _start([str(VENV_BIN / "evit"), "lut", "-d", "cpu-1t"], root, env, log)
    _wait_for(log, r"lut@cpu-1t: full table", proc)
    partial = root / "luts" / "cpu-1t.partial.json"
    t0 = time.monotonic()
    while not partial.is_file() and proc.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.2)  # the first flush: some units measured
    rc, seconds = _stop(proc, signal.SIGTERM)
    text = log.read_text()
    assert rc == 143, text[-3000:]
    assert seconds < STOP_WITHIN_S, f"stopped after {seconds:.1f}s"
    assert "Traceback" not in text and "cancelled by SIGTERM" in text, text[-3000:]
    _assert_no_leftovers(proc.pid)
    assert partial.is_file() and not (root / "luts" / "cpu-1t.json").exists()
    assert not (root / "metrics" / "lut-cpu-1t.json").exists()

    again = run([str(VENV_BIN / "evit"), "lut", "-d", "cpu-1t"], root, env)
    m = re.search(r"resuming \S*cpu-1t.partial.json: (\d+) units of work done", again.stderr)
    assert m and int(m.group(1)) >= 1, again.stderr[-3000:]
    assert (root / "luts" / "cpu-1t.json").is_file() and not partial.exists()
