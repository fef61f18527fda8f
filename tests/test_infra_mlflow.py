"""MLflow wiring: which URI wins, and run artifacts written by the client straight to an
experiment whose artifact_location is on S3 (a real moto_server). Artifacts proxied by a real
`mlflow server --artifacts-destination s3://...` are checked in tests/test_infra.py on the
local stack (infra/local/up.sh)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from evit import tracking
from evit.config import parse_params


def test_environment_uri_wins_over_params(monkeypatch: pytest.MonkeyPatch) -> None:
    params = parse_params({"tracking": {"uri": "sqlite:///from-params.db"}})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    # relative sqlite paths are pinned to the working directory (MLflow caches stores per URI)
    expected = f"sqlite:///{Path.cwd() / 'from-params.db'}"
    assert tracking.tracking_uri(params) == expected == tracking.registry_uri(params)
    assert tracking.tracking_uri(parse_params({})) == f"sqlite:///{Path.cwd() / 'mlflow.db'}"  # embedded default
    assert tracking.tracking_uri(parse_params({"tracking": {"uri": "sqlite:////abs/x.db"}})) == "sqlite:////abs/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(params) == "http://127.0.0.1:5000" == tracking.registry_uri(params)


def _objects(s3_client: Any, bucket: str, prefix: str) -> list[str]:
    return [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


def log_probe(params: Any, tmp_path: Path) -> tuple[str, str]:
    """A stage run nested under a pipeline run, with one artifact; (child run id, parent run id)."""
    probe = tmp_path / "probe.json"
    probe.write_text('{"ok": true}\n')
    with tracking.pipeline_run(params) as parent, tracking.parent_run(parent.run_id):
        with tracking.stage_run(params, "probe", log_sections=("tracking",)) as run:
            run.log_metrics({"answer": 42.0})
            run.log_artifact(probe)
    return run.run_id, parent.run_id


@pytest.mark.slow
def test_client_writes_artifacts_to_an_s3_artifact_location(moto_server: str, s3_client: Any, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    s3_client.create_bucket(Bucket="evit-mlflow-direct")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_server)
    monkeypatch.chdir(tmp_path)
    params = parse_params({"tracking": {"experiment": "evit-s3-direct",
                                        "artifact_location": "s3://evit-mlflow-direct/runs"}})
    run_id, _ = log_probe(params, tmp_path)
    assert (tmp_path / "mlflow.db").is_file()  # the default sqlite store, in the project root
    keys = _objects(s3_client, "evit-mlflow-direct", "runs/")
    assert any(k.endswith(f"{run_id}/artifacts/probe.json") for k in keys), keys
    assert not os.path.exists(tmp_path / "mlruns")
