"""infra/: the compose stack (structure only: no Docker engine in CI), Kubernetes files,
prefect.yaml, scripts; and the no-Docker local stack started, checked and stopped for real."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.deploy import SCHEDULES
from tests.flow_helpers import REPO, clean_env, free_port

INFRA = REPO / "infra"


def _compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def test_compose_has_the_team_services_wired_together() -> None:
    doc = _compose()
    services = doc["services"]
    assert {"minio", "buckets", "postgres", "mlflow", "prefect-server", "worker", "register"} <= set(services)
    for name in ("minio", "postgres", "mlflow", "prefect-server"):
        assert "test" in services[name]["healthcheck"], name
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri" in mlflow_cmd and "--artifacts-destination s3://evit-mlflow/" in mlflow_cmd
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg")
    worker = services["worker"]
    assert worker["build"] == {"context": "..", "dockerfile": "infra/Dockerfile"}
    assert worker["command"][:5] == ["prefect", "worker", "start", "--pool", "evit-process"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "flows.deploy register --pool evit-process" in " ".join(services["register"]["command"])
    for name, svc in services.items():  # published ports only on the host's loopback, but the TLS proxy's
        for port in svc.get("ports", []):
            assert port.startswith("${PROXY_BIND:-0.0.0.0}:" if name == "proxy" else "127.0.0.1:"), port


def test_compose_team_mode_authenticates_and_terminates_tls() -> None:
    """#26: MLflow through the basic-auth launcher, Prefect with an auth string, clients with
    their credentials, a TLS proxy in front, and the one-shot that creates the roles."""
    services = _compose()["services"]
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "/team/mlflow-server.sh" in mlflow_cmd and "./team:/team:ro" in services["mlflow"]["volumes"]
    assert services["mlflow"]["environment"]["MLFLOW_AUTH_DATABASE_URI"].endswith("/mlflow_auth")
    assert "CREATE DATABASE mlflow_auth;" in (INFRA / "postgres" / "init.sql").read_text()
    assert "/team/prefect-server.sh" in services["prefect-server"]["command"]
    for name in ("worker", "register"):
        env = services[name]["environment"]
        assert env["MLFLOW_TRACKING_USERNAME"] == "pipeline" and "PREFECT_API_AUTH_STRING" in env
    assert services["roles"]["command"][:2] == ["evit", "grant-roles"]
    assert services["roles"]["environment"]["MLFLOW_TRACKING_USERNAME"] == "admin"
    proxy = services["proxy"]
    assert proxy["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    caddy = (INFRA / "team" / "Caddyfile").read_text()
    assert caddy.count("reverse_proxy") == 2 and "/certs}/cert.pem" in caddy
    assert 'mlflow[auth]==' in (INFRA / "mlflow.Dockerfile").read_text()
    ini_keys = (INFRA / "team" / "mlflow-server.sh").read_text()
    assert "default_permission = NO_PERMISSIONS" in ini_keys and "MLFLOW_BASIC_AUTH_FAIL_CLOSED=true" in ini_keys
    assert "admin_password" not in ini_keys  # the password travels in the environment, not the file


def test_compose_secrets_come_from_env_file_only() -> None:
    text = (INFRA / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert used <= set(example), f"not in .env.example: {used - set(example)}"
    assert all(v == "change-me" for k, v in example.items() if "PASSWORD" in k)
    doc = _compose()
    envs = [svc.get("environment", {}) for svc in doc["services"].values()] + [doc["x-s3-client-env"]]
    for env in envs:
        for key, value in env.items():
            if any(word in key for word in ("PASSWORD", "SECRET", "_URI", "_URL")) and "@" in str(value) \
                    or any(word in key for word in ("PASSWORD", "SECRET")):
                assert "${" in str(value), f"{key} holds a literal value, not one from infra/.env"
    ignored = subprocess.run(["git", "check-ignore", "infra/.env"], cwd=REPO, capture_output=True)
    assert ignored.returncode == 0, "infra/.env must be git-ignored"


def test_pipeline_image_installs_the_pinned_lock() -> None:
    text = (INFRA / "Dockerfile").read_text()
    assert "pip install --no-deps -r requirements.lock" in text
    assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in text and "DVC_NO_ANALYTICS=1" in text
    for src in re.findall(r"^COPY (.+) \./?\S*$", text, flags=re.M):
        for part in src.split():
            assert (REPO / part).exists(), f"Dockerfile copies missing {part}"
    mlflow_version = re.search(r"MLFLOW_VERSION=(\S+)", (INFRA / "mlflow.Dockerfile").read_text()).group(1)
    assert f"mlflow=={mlflow_version}\n" in (REPO / "requirements.lock").read_text()


def test_kubernetes_files_describe_a_work_pool() -> None:
    kinds = []
    for f in ("namespace-rbac.yaml", "config.example.yaml", "workspace-pvc.yaml", "worker.yaml"):
        kinds += [d["kind"] for d in yaml.safe_load_all((INFRA / "k8s" / f).read_text()) if d]
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret",
            "PersistentVolumeClaim", "Deployment"} <= set(kinds)
    template = json.loads((INFRA / "k8s" / "base-job-template.json").read_text())
    job = template["job_configuration"]["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == "{{ command }}" and container["image"] == "{{ image }}"
    assert {"configMapRef": {"name": "evit-endpoints"}} in container["envFrom"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "evit-workspace"
    placeholders = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(template["variables"]["properties"]), placeholders - set(template["variables"]["properties"])


def test_prefect_yaml_matches_the_python_deployments() -> None:
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in doc["deployments"]}
    for s in SCHEDULES:
        d = by_name[s.name]
        assert d["entrypoint"] == "flows/pipeline.py:pipeline_flow"
        assert d["schedules"][0]["cron"] == s.cron
        assert {k: v for k, v in d["parameters"].items() if k != "params_path"} == s.parameters


def test_scripts_parse_and_torchrun_command(tmp_path: Path) -> None:
    for script in ("local/up.sh", "local/down.sh", "local/status.sh", "local/common.sh", "torchrun.sh",
                   "dvc-remote.sh", "team/mlflow-server.sh", "team/prefect-server.sh", "team/secrets.sh"):
        subprocess.run(["bash", "-n", str(INFRA / script)], check=True)
    out = subprocess.run([str(INFRA / "torchrun.sh"), "-p", "params.imagenet.yaml"], capture_output=True, text=True,
                         check=True, env={**os.environ, "EVIT_DRY_RUN": "1", "EVIT_NNODES": "2", "EVIT_NODE_RANK": "1",
                                          "EVIT_MASTER_ADDR": "10.0.0.1", "EVIT_NPROC_PER_NODE": "8"}).stdout
    assert "-m torch.distributed.run --nproc-per-node 8 --nnodes 2 --node-rank 1 --master-addr 10.0.0.1" in out
    assert out.strip().endswith("-m evit.cli train -p params.imagenet.yaml")


@pytest.mark.slow
def test_local_stack_up_status_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """infra/local: every service answers its health check on loopback, the S3 endpoint has the
    buckets, MLflow stores artifacts there, the generated credentials stay out of the repo, and
    down stops every process."""
    import boto3

    state = tmp_path / "services"
    env = clean_env({"EVIT_SERVICES_DIR": str(state), "EVIT_S3_PORT": str(free_port()),
                     "EVIT_MLFLOW_PORT": str(free_port()), "EVIT_PREFECT_PORT": str(free_port())})
    for key in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(key, None)

    def sh(script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(INFRA / "local" / script)], env=env, capture_output=True, text=True, timeout=600)
        if check and proc.returncode != 0:
            logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in (state / "logs").glob("*.log"))
            raise AssertionError(f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}{logs}")
        return proc

    pids: list[int] = []
    try:
        sh("up.sh")
        pids = [int((state / f"{s}.pid").read_text()) for s in ("s3", "mlflow", "prefect")]
        status = sh("status.sh")
        assert status.stdout.count(" up ") == 3, status.stdout
        assert oct((state / "credentials").stat().st_mode & 0o777) == "0o600"
        exported = dict(re.findall(r"export (\w+)=(\S+)", (state / "env.sh").read_text()))
        creds = dict(line.split("=", 1) for line in (state / "credentials").read_text().split())
        assert all(v.startswith("http://127.0.0.1:") for k, v in exported.items() if k != "AWS_DEFAULT_REGION")
        s3 = boto3.client("s3", endpoint_url=exported["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])
        assert {"evit-dvc", "evit-mlflow"} <= {b["Name"] for b in s3.list_buckets()["Buckets"]}
        assert "already running" in sh("up.sh").stdout  # idempotent

        # The services work together: a run logged through the MLflow server (nested under a
        # pipeline run) has its artifact proxied into the S3 bucket.
        from mlflow import MlflowClient

        from evit.config import parse_params
        from tests.test_infra_mlflow import log_probe

        monkeypatch.setenv("MLFLOW_TRACKING_URI", exported["MLFLOW_TRACKING_URI"])
        params = parse_params({"tracking": {"experiment": "evit-local-stack"}})
        run_id, parent_id = log_probe(params, tmp_path)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="evit-mlflow").get("Contents", [])]
        assert any(k.endswith(f"{run_id}/artifacts/probe.json") for k in keys), keys
        child = MlflowClient(exported["MLFLOW_TRACKING_URI"]).get_run(run_id)
        assert child.data.tags["mlflow.parentRunId"] == parent_id and child.data.metrics["answer"] == 42.0
    finally:
        down = sh("down.sh", check=False)
    assert down.returncode == 0, down.stderr
    assert sh("status.sh", check=False).returncode == 3
    assert pids and not any(_alive(pid) for pid in pids)
    assert not list(state.glob("*.pid"))


def _alive(pid: int) -> bool:
    """Running (an exited, not yet reaped zombie does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
