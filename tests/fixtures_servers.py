"""A real MLflow tracking + registry server for tests (register with `pytest_plugins`).

`mlflow_server` (session): one `mlflow server` process on 127.0.0.1 with a sqlite backend
and a local artifact destination (artifacts are proxied through the server, as on a team
setup), started once with a free port and a health wait. State persists for the session,
so each test uses its own registered-model names.

`start_mlflow_server(root)` starts an extra one a test can kill (a registry that goes away
in the middle of a registration); `stop_server` ends it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 90.0


@dataclass
class MlflowServer:
    url: str
    backend_uri: str
    """The server's own sqlite store: lets a test inspect state after killing the server."""
    artifacts: Path
    log: Path
    proc: subprocess.Popen[bytes]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (the port was just free)."""
    return f"http://127.0.0.1:{_free_port()}"


def start_mlflow_server(root: Path) -> MlflowServer:
    root.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    db = root / "mlflow.db"
    artifacts = root / "artifacts"
    log = root / "server.log"
    env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(artifacts)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=root, env=env,
                                start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", f"sqlite:///{db}", artifacts, log, proc)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=1) as r:
                if r.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    stop_server(server)
    raise RuntimeError(f"mlflow server did not answer /health within {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


def stop_server(server: MlflowServer) -> None:
    """Terminate the server's process group (uvicorn workers included) and wait for it."""
    if server.proc.poll() is not None:
        return
    try:
        os.killpg(server.proc.pid, 15)
    except ProcessLookupError:
        return
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, 9)
        server.proc.wait(timeout=5)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        stop_server(server)
