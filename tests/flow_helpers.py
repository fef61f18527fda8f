"""Shared by the orchestration tests (flows, DVC, infra, e2e): a tiny real pipeline config,
an isolated Prefect home, and subprocess helpers.

The tiny config runs every real stage in about a minute on 2 cores: 30 images per class,
3 training steps, sampled LUTs with 3 repeats, a 4-subnet search, generous budgets (always
feasible). Nothing here replaces a component: the stages, DVC, Prefect and MLflow are real.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def tiny_device(name: str, kind: str = "torch-cpu", **extra: Any) -> dict[str, Any]:
    dev = {"name": name, "kind": kind, "threads": 1, "warmup": 1, "repeats": 3, "rounds": 1, "estimator": "median",
           "validate_subnets": 10, "lut_mode": "sampled", "sample_subnets": 4, "budgets_ms": [50.0]}
    dev.update(extra)
    return dev


TINY: dict[str, Any] = {
    "data": {"max_per_class": 30},
    "space": {"levels": [3, 6], "tolerance": 0.5},
    "train": {"epochs": 1, "batch_size": 16, "steps_per_epoch": 3, "checkpoint_every": 2, "bn_calib_batches": 1,
              "bank_capacity": 4, "bank_capacity_big": 4,
              "elastic_compressed": {"bank_capacity": 4, "rescore_per_epoch": 1, "rescore_entries": 2}, "log_every": 2, "warmup_epochs": 0,
              "device": "cpu"},
    "devices": [tiny_device("cpu-1t")],
    "baselines": {"models": ["mobilenetv3_small_050"]},
    "search": {"population": 4, "generations": 1, "top_k": 2, "mutations": 2, "crossovers": 2,
               "bn_calib_batches": 1, "eval_batch_size": 64},
    "tracking": {"retries": 1},
    "export": {"formats": ["onnx"]},  # the mobile formats: test_e2e (all formats) and test_mobile_export
}


def tiny(**overrides: Any) -> dict[str, Any]:
    out = copy.deepcopy(TINY)
    out.update(copy.deepcopy(overrides))
    return out


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a subprocess `evit`/`dvc`: this venv first on PATH, no inherited
    tracking/Prefect server unless given, no analytics."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "EVIT_PARAMS", "EVIT_PARENT_RUN_ID")}
    env.update({"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_ENABLE_TELEMETRY": "false",
                "OMP_NUM_THREADS": "1"})
    env.update(extra or {})
    return env


def run(cmd: list[str], cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 600,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=dict(env or clean_env()), text=True, capture_output=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-6000:]}")
    return proc


def evit_pipeline(cwd: Path, *args: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`evit pipeline` in a new process; its JSON summary."""
    proc = run([str(VENV_BIN / "evit"), "pipeline", *args], cwd, env)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"`evit pipeline` printed more than its JSON summary:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}") from None


def dvc(cwd: Path, *args: str, env: Mapping[str, str] | None = None, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    return run([str(VENV_BIN / "dvc"), *args], cwd, env, check=check)


@pytest.fixture(scope="session")
def shared_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite tracking store for the session's flow tests (creating one per project runs
    MLflow's database migrations each time, ~10 s on 2 cores)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def flow_env(prefect_home: Path, shared_mlflow_db: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Ephemeral Prefect in an isolated home, MLflow on the session's sqlite store (for this
    process and the `evit` subprocesses started with `clean_env`)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_mlflow_db)
    return prefect_home


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An isolated PREFECT_HOME for the session (never ~/.prefect), ephemeral mode (no API URL)."""
    home = tmp_path_factory.mktemp("prefect-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(home))
    mp.delenv("PREFECT_API_URL", raising=False)
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.setenv("DVC_NO_ANALYTICS", "1")
    try:
        yield home
    finally:
        _stop_ephemeral_servers()
        mp.undo()


def _stop_ephemeral_servers() -> None:
    """Stop this process's ephemeral Prefect API server now, while pytest still captures its
    log output (at interpreter exit the stream is closed and logging prints errors)."""
    import sys

    server_mod = sys.modules.get("prefect.server.api.server")
    if server_mod is None:
        return
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # send the queued run logs while the server still answers
    for server in list(server_mod.SubprocessASGIServer._instances.values()):
        server.stop()


# --- real servers on 127.0.0.1 ---------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes] | None, timeout: float, log: Path | None = None) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it exits or times out."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"{url} did not become healthy within {timeout}s (exit {proc.poll() if proc else None})"
                         f"\n{tail}")


def stop_process_group(proc: subprocess.Popen[bytes], sig: int = 15, timeout: float = 30) -> int:
    """Signal the process group `proc` leads (started with start_new_session) and reap it."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return int(proc.returncode)


def start_prefect_server(home: Path, log: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """A real `prefect server start` (sqlite under `home`) on a free loopback port; its API URL."""
    port = free_port()
    env = clean_env({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                 str(port), "--analytics-off", "--no-ui"], stdout=fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(f"{url}/health", proc, 240, log)
    except BaseException:
        stop_process_group(proc)
        raise
    return url, proc
