"""Team mode (#26), against real servers started by infra/team's launchers on 127.0.0.1:
MLflow with its basic-auth app (NO_PERMISSIONS by default, fail-closed) served over TLS by
uvicorn with a certificate from infra/team/make_cert.py (the CA-bundle path of the clients,
without a proxy binary), and Prefect with an API auth string.

One server of each for the module. The tests run in order: the routes refuse a stranger;
`evit grant-roles` makes the two accounts; the `pipeline` account runs the tiny pipeline end
to end through the authenticated Prefect API and registers; the `reader` fetches but may not
register or move an alias; a Prefect worker with the auth string runs a deployment; and no
secret shows up in anything the run wrote, logged, tracked or printed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.flow_helpers import REPO, VENV_BIN, clean_env, free_port, run, stop_process_group, tiny

TEAM = REPO / "infra" / "team"
pytestmark = pytest.mark.slow


@dataclass
class Team:
    root: Path
    mlflow: str
    prefect: str
    ca: Path
    secrets: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    """Everything the commands of the tests printed (for the secrets grep)."""

    def env(self, user: str | None = None, prefect_auth: bool = True, **extra: str) -> dict[str, str]:
        """A client's environment: the servers, the CA bundle, `user`'s login (none: no login)."""
        env = clean_env({"MLFLOW_TRACKING_URI": self.mlflow, "MLFLOW_TRACKING_SERVER_CERT_PATH": str(self.ca),
                         "PREFECT_API_URL": self.prefect, "PREFECT_HOME": str(self.root / "prefect-client"),
                         "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING",
                    "EVIT_PIPELINE_PASSWORD", "EVIT_READER_PASSWORD"):
            env.pop(key, None)
        if user:
            env.update({"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": self.secrets[user]})
        if prefect_auth:
            env["PREFECT_API_AUTH_STRING"] = self.secrets["prefect"]
        env.update(extra)
        return env

    def cli(self, args: list[str], cwd: Path, env: dict[str, str], check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
        proc = run([str(VENV_BIN / "evit"), *args], cwd, env, check=check, timeout=timeout)
        self.outputs += [proc.stdout, proc.stderr]
        return proc


def _make_cert(out: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_cert", TEAM / "make_cert.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make(out, ["127.0.0.1", "localhost"])


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path, context: ssl.SSLContext | None = None,
          timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not healthy in {timeout}s\n{log.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    root = tmp_path_factory.mktemp("team")
    keys = {"admin": f"adm-{secrets.token_hex(16)}", "pipeline": f"pip-{secrets.token_hex(16)}",
            "reader": f"rdr-{secrets.token_hex(16)}", "secret_key": secrets.token_hex(24),
            "prefect": f"evit:{secrets.token_hex(16)}"}
    _make_cert(root / "tls")
    ca = root / "tls" / "ca.pem"
    mport, pport = free_port(), free_port()
    base = clean_env()
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME"):
        base.pop(key, None)
    mlog, plog = root / "mlflow.log", root / "prefect.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(mlog, "wb") as fh:
            procs.append(subprocess.Popen(
                [str(TEAM / "mlflow-server.sh"), str(root / "mlflow-state"), "--host", "127.0.0.1", "--port",
                 str(mport), "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                 "--artifacts-destination", str(root / "mlflow-artifacts"),
                 "--uvicorn-opts", f"--ssl-keyfile {root / 'tls' / 'key.pem'} --ssl-certfile {root / 'tls' / 'cert.pem'}"],
                env={**base, "MLFLOW_ADMIN_PASSWORD": keys["admin"], "MLFLOW_SECRET_KEY": keys["secret_key"]},
                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=root))
        with open(plog, "wb") as fh:
            procs.append(subprocess.Popen(
                [str(TEAM / "prefect-server.sh"), "--host", "127.0.0.1", "--port", str(pport), "--no-ui"],
                env={**base, "PREFECT_AUTH_STRING": keys["prefect"], "PREFECT_HOME": str(root / "prefect-server")},
                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=root))
        mlflow, prefect = f"https://127.0.0.1:{mport}", f"http://127.0.0.1:{pport}/api"
        _wait(f"{mlflow}/health", procs[0], mlog, ssl.create_default_context(cafile=str(ca)))
        _wait(f"{prefect}/health", procs[1], plog)
        yield Team(root, mlflow, prefect, ca, keys, procs)
    finally:
        for proc in procs:
            stop_process_group(proc, timeout=5)  # SIGKILL after 5 s: nothing to save here


def _status(url: str, method: str = "GET", headers: dict[str, str] | None = None, ca: Path | None = None) -> int:
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    data = b"{}" if method in ("POST", "PATCH", "PUT") else None
    req = urllib.request.Request(url, method=method, data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


# The REST routes evit's client uses (tracking, registry, artifacts, logged models), the UI's
# ajax twins, the trace routes of MLflow 3 (/v1/traces, /api/3.0/...), GraphQL and the auth
# app's own admin routes. Every Flask rule of the server is checked too (below).
CLIENT_ROUTES = [
    ("GET", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=evit"), ("POST", "/api/2.0/mlflow/experiments/create"),
    ("GET", "/api/2.0/mlflow/experiments/search?max_results=1"), ("POST", "/api/2.0/mlflow/runs/create"),
    ("POST", "/api/2.0/mlflow/runs/log-batch"), ("POST", "/api/2.0/mlflow/runs/update"),
    ("POST", "/api/2.0/mlflow/runs/search"), ("POST", "/api/2.0/mlflow/runs/delete"),
    ("GET", "/api/2.0/mlflow/registered-models/get?name=evit-cpu-1t"),
    ("POST", "/api/2.0/mlflow/registered-models/create"), ("GET", "/api/2.0/mlflow/registered-models/search"),
    ("POST", "/api/2.0/mlflow/registered-models/alias"), ("DELETE", "/api/2.0/mlflow/registered-models/alias"),
    ("GET", "/api/2.0/mlflow/registered-models/alias?name=evit-cpu-1t&alias=champion"),
    ("DELETE", "/api/2.0/mlflow/registered-models/delete"), ("POST", "/api/2.0/mlflow/model-versions/create"),
    ("GET", "/api/2.0/mlflow/model-versions/search"), ("DELETE", "/api/2.0/mlflow/model-versions/delete"),
    ("GET", "/api/2.0/mlflow/model-versions/get-download-uri?name=evit-cpu-1t&version=1"),
    ("POST", "/api/2.0/mlflow/model-versions/set-tag"), ("POST", "/api/2.0/mlflow/logged-models"),
    ("POST", "/api/2.0/mlflow/logged-models/search"), ("GET", "/api/2.0/mlflow/logged-models/m-0"),
    ("GET", "/api/2.0/mlflow-artifacts/artifacts/1/x"), ("PUT", "/api/2.0/mlflow-artifacts/artifacts/1/x"),
    ("GET", "/ajax-api/2.0/mlflow/experiments/search"), ("POST", "/ajax-api/2.0/mlflow/runs/search"),
    ("GET", "/ajax-api/2.0/mlflow/registered-models/search"), ("GET", "/ajax-api/2.0/mlflow/users/current"),
    ("POST", "/v1/traces"), ("GET", "/api/3.0/mlflow/traces/tr-0"), ("POST", "/api/3.0/mlflow/traces"),
    ("GET", "/ajax-api/3.0/mlflow/traces/tr-0"), ("POST", "/api/3.0/mlflow/traces/search"),
    ("POST", "/graphql"), ("GET", "/graphql"), ("GET", "/"), ("GET", "/signup"), ("GET", "/get-artifact?path=x&run_uuid=y"),
    ("GET", "/model-versions/get-artifact?path=x&name=a&version=1"), ("POST", "/api/2.0/mlflow/users/create"),
    ("PATCH", "/api/2.0/mlflow/users/update-admin"), ("POST", "/api/2.0/mlflow/permissions/grant"),
]
OPEN_PREFIXES = ("/static", "/favicon.ico", "/health")  # MLflow's own list; /health is the probe


def _flask_rules() -> list[tuple[str, str]]:
    """Every (method, path) of MLflow's Flask app, placeholders filled in."""
    import re

    from mlflow.server import app

    out = []
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", "x", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            out.append((method, path))
    return out


def test_every_mlflow_route_answers_401_without_credentials(team: Team) -> None:
    assert _status(f"{team.mlflow}/health", ca=team.ca) == 200
    routes = CLIENT_ROUTES + [r for r in _flask_rules() if not r[1].startswith(OPEN_PREFIXES)
                              and not r[1].endswith("/server-info")]
    wrong = {f"{m} {p}": s for m, p in dict.fromkeys(routes)
             if (s := _status(f"{team.mlflow}{p}", m, ca=team.ca)) != 401}
    assert not wrong, f"answered without credentials: {wrong}"
    bad_login = {"Authorization": "Basic " + __import__("base64").b64encode(b"admin:password1234").decode()}
    assert _status(f"{team.mlflow}/api/2.0/mlflow/experiments/search?max_results=1", headers=bad_login,
                   ca=team.ca) == 401  # MLflow's old default admin password does not open it
    print(f"\n{len(dict.fromkeys(routes))} MLflow routes answered 401 without credentials")


def test_launchers_refuse_default_secrets(tmp_path: Path) -> None:
    env = clean_env({"MLFLOW_ADMIN_PASSWORD": "password1234", "MLFLOW_SECRET_KEY": secrets.token_hex(24)})
    out = subprocess.run([str(TEAM / "mlflow-server.sh"), str(tmp_path)], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "MLFLOW_ADMIN_PASSWORD is a default" in out.stderr and "password1234" not in out.stderr
    env = clean_env({"PREFECT_AUTH_STRING": "evit:change-me"})
    out = subprocess.run([str(TEAM / "prefect-server.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "PREFECT_AUTH_STRING" in out.stderr and "change-me" not in out.stderr
    env.pop("PREFECT_AUTH_STRING")
    out = subprocess.run([str(TEAM / "prefect-server.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: PREFECT_AUTH_STRING is not set")


@pytest.fixture(scope="module")
def project(team: Team, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import yaml

    from tests.conftest import deep_merge

    root = tmp_path_factory.mktemp("team-project")
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(deep_merge(base, tiny(
        tracking={"experiment": "evit", "retries": 0}, baselines={"models": []})), sort_keys=False))
    return root


def test_grant_roles_then_pipeline_runs_end_to_end_as_pipeline(team: Team, project: Path) -> None:
    # without credentials: one line naming the variables, before any work
    refused = team.cli(["pipeline"], project, team.env(), check=False)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: the MLflow server at") and \
        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in refused.stderr
    admin = team.env("admin", EVIT_PIPELINE_PASSWORD=team.secrets["pipeline"], EVIT_READER_PASSWORD=team.secrets["reader"])
    first = json.loads(team.cli(["grant-roles"], project, admin).stdout)
    assert first["users_created"] == ["pipeline", "reader"] and first["models_created"] == ["evit-cpu-1t"]
    again = json.loads(team.cli(["grant-roles"], project, admin).stdout)  # idempotent
    assert again["users_created"] == [] and again["models"] == ["evit-cpu-1t"]
    assert again["grants"] == {"pipeline": "EDIT", "reader": "READ"}
    no_prefect = team.cli(["pipeline"], project, team.env("pipeline", prefect_auth=False), check=False)
    assert no_prefect.returncode == 2 and no_prefect.stderr.strip().splitlines()[-1] == (
        f"error: the Prefect API at {team.prefect} requires an auth string: PREFECT_API_AUTH_STRING is not set "
        "(USER:PASSWORD, the server's PREFECT_SERVER_API_AUTH_STRING; HTTP 401)"), no_prefect.stderr

    summary = json.loads(team.cli(["pipeline"], project, team.env("pipeline")).stdout)
    assert summary["failed"] == [] and "export@cpu-1t" in summary["ran"], summary
    from mlflow import MlflowClient

    os.environ.update({k: v for k, v in team.env("reader").items() if k.startswith("MLFLOW_TRACKING_")
                       or k == "MLFLOW_TRACKING_SERVER_CERT_PATH"})
    try:
        champion = MlflowClient(team.mlflow).get_model_version_by_alias("evit-cpu-1t", "champion")
        assert champion.tags["evit.arch"]
    finally:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_SERVER_CERT_PATH"):
            os.environ.pop(key, None)


def test_reader_fetches_but_may_not_register_or_move_an_alias(team: Team, project: Path) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    fetched = team.cli(["fetch", "evit-cpu-1t@champion", "--out", str(project / "fetched")], project,
                       team.env("reader", prefect_auth=False))
    assert "evit-cpu-1t version 1" in fetched.stdout
    nobody = team.cli(["fetch", "evit-cpu-1t@champion", "--out", str(project / "f2")], project,
                      team.env(prefect_auth=False, MLFLOW_TRACKING_USERNAME="reader"), check=False)
    assert nobody.returncode == 2 and nobody.stderr.strip() == (
        f"error: the MLflow server at {team.mlflow} requires a login: set MLFLOW_TRACKING_PASSWORD "
        "(the account's name and password; HTTP 401)"), nobody.stderr
    untrusted = team.cli(["fetch", "evit-cpu-1t@champion", "--out", str(project / "f3")], project,
                         team.env("reader", prefect_auth=False, MLFLOW_TRACKING_SERVER_CERT_PATH=""), check=False)
    assert untrusted.returncode == 2 and "MLFLOW_TRACKING_SERVER_CERT_PATH" in untrusted.stderr, untrusted.stderr
    denied = team.cli(["export", "-d", "cpu-1t", "--register-only"], project, team.env("reader", prefect_auth=False),
                      check=False)  # nothing missing: passes. Registering by hand as the reader:
    assert denied.returncode == 0, denied.stderr

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                            "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                            "MLFLOW_TRACKING_URI")}
    os.environ.update({"MLFLOW_TRACKING_URI": team.mlflow, "MLFLOW_TRACKING_USERNAME": "reader", "MLFLOW_TRACKING_PASSWORD": team.secrets["reader"],
                       "MLFLOW_TRACKING_SERVER_CERT_PATH": str(team.ca), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    try:
        client = MlflowClient(team.mlflow)
        champion = client.get_model_version_by_alias("evit-cpu-1t", "champion")
        for attempt in (lambda: client.create_model_version("evit-cpu-1t", source=champion.source),
                        lambda: client.set_registered_model_alias("evit-cpu-1t", "champion", champion.version),
                        lambda: client.delete_registered_model_alias("evit-cpu-1t", "champion"),
                        lambda: client.delete_model_version("evit-cpu-1t", champion.version)):
            with pytest.raises(MlflowException) as info:
                attempt()
            assert info.value.error_code == "PERMISSION_DENIED", info.value
        from evit.config import parse_params
        from evit.errors import RegistryError
        from evit.registry.connection import mlflow_client, retrying

        params = parse_params({"tracking": {"retries": 0}})
        with pytest.raises(RegistryError) as err:
            retrying("moving champion", lambda: mlflow_client(params).set_registered_model_alias(
                "evit-cpu-1t", "champion", champion.version), 0, team.mlflow)
        assert str(err.value) == (f"the MLflow server at {team.mlflow} denied 'reader' permission (moving champion) "
                                  "(HTTP 403); an MLflow admin grants it with `evit grant-roles` "
                                  "(docs/operations.md#team-mode)")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_prefect_api_refuses_without_the_auth_string_and_a_worker_with_it_runs_a_deployment(
        team: Team, project: Path) -> None:
    assert _status(f"{team.prefect}/health") == 200
    for method, path in (("GET", "/admin/version"), ("POST", "/flows/filter"), ("POST", "/deployments/filter"),
                         ("POST", "/work_pools/"), ("POST", "/flow_runs/")):
        assert _status(f"{team.prefect}{path}", method) == 401, path
    wrong = "Basic " + __import__("base64").b64encode(b"evit:wrong").decode()
    assert _status(f"{team.prefect}/admin/version", headers={"Authorization": wrong}) == 401

    env = team.env("pipeline")
    code = f"""
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments import run_deployment
from flows.deploy import register
with get_client(sync_client=True) as c:
    c.create_work_pool(WorkPoolCreate(name="evit-team", type="process"))
ids = register({str(project / 'params.yaml')!r}, pool="evit-team")
run = run_deployment("evit-pipeline/weekly-retrain", parameters={{"stages": ["prepare"], "force": ["prepare"]}},
                     timeout=0)
print(json.dumps({{"run": str(run.id)}}))
"""
    made = run([str(VENV_BIN / "python"), "-c", code], REPO, env)
    team.outputs += [made.stdout, made.stderr]
    run_id = json.loads(made.stdout.strip().splitlines()[-1])["run"]
    log = team.root / "worker.log"
    with open(log, "wb") as fh:
        worker = subprocess.Popen([str(VENV_BIN / "prefect"), "worker", "start", "--pool", "evit-team", "--type",
                                   "process", "--limit", "1"], env=env, cwd=REPO, stdout=fh,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    state = None
    try:
        probe = f"""
import sys, time
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    for _ in range(600):
        s = c.read_flow_run({run_id!r}).state
        if s is not None and s.is_final():
            print(s.type.value); sys.exit(0)
        time.sleep(0.5)
print("TIMEOUT")
"""
        state = run([str(VENV_BIN / "python"), "-c", probe], REPO, env, timeout=360).stdout.strip()
    finally:
        stop_process_group(worker, signal.SIGINT, timeout=30)
        team.outputs.append(log.read_text(errors="replace"))
    assert state == "COMPLETED", (state, log.read_text(errors="replace")[-5000:])


def test_no_secret_in_anything_the_team_run_wrote(team: Team, project: Path) -> None:
    """Grep every output for every secret: what the commands printed, the project (dvc.lock,
    cards, results, logs), MLflow's stores (runs' params and tags, artifacts, model versions:
    the sqlite file and the artifact folder), Prefect's (flow runs, parameters, logs, the
    server's sqlite), the client's Prefect home and the servers' logs."""
    values = [v for k, v in team.secrets.items()]
    values.append(team.secrets["prefect"].split(":", 1)[1])
    import base64

    values.append(base64.b64encode(team.secrets["prefect"].encode()).decode())  # the header form
    for user in ("admin", "pipeline", "reader"):
        values.append(base64.b64encode(f"{user}:{team.secrets[user]}".encode()).decode())
    found: list[str] = []
    scanned = 0
    for i, text in enumerate(team.outputs):
        found += [f"command output #{i}" for v in values if v in text]
    for folder in (project, team.root):
        for path in folder.rglob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
            scanned += 1
            found += [f"{path} holds a secret" for v in values if v.encode() in data]
    assert (project / "dvc.lock").is_file() and list(project.rglob("card.json"))
    assert scanned > 50 and not found, found
    print(f"\nsecrets grep: {scanned} files and {len(team.outputs)} command outputs, nothing found")
