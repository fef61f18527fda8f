"""The whole pipeline on a tiny config, against real local servers: moto_server as the S3
DVC remote, an MLflow tracking/registry server (sqlite). Then: the artifacts, dvc.lock and
`dvc status` / `dvc repro` having nothing to do, DVC metrics and plots (offline), the
registry and the cards, the MLflow run tree, the Prefect artifact, the S3 remote, a second
run in a new process that is all cache hits, a move to a second MLflow server (the cached
exports register again), and the "move to a team setup" steps of docs/operations.md
followed literally: commit, `git clone`, `dvc pull`, every stage up to date.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures_servers import MlflowServer, mlflow_server, start_mlflow_server, stop_server  # noqa: F401
from tests.flow_helpers import (REPO, VENV_BIN, clean_env, dvc, evit_pipeline, prefect_home, run,  # noqa: F401
                                tiny, tiny_device)


def git(cwd: Path, *args: str) -> str:
    return run(["git", "-c", "user.name=e2e", "-c", "user.email=e2e@example.invalid", *args], cwd).stdout

DEVICES = ["cpu-1t", "ort-1t"]
STAGES = {"prepare", "train", "baselines"} | {f"{k}@{d}" for k in ("lut", "search", "export") for d in DEVICES}


@pytest.mark.slow
def test_pipeline_end_to_end(tiny_params: Any, moto_server: str, s3_client: Any, mlflow_server: MlflowServer,
                             prefect_home: Path, monkeypatch: pytest.MonkeyPatch,
                             tmp_path_factory: pytest.TempPathFactory) -> None:
    from mlflow import MlflowClient

    from flows.pipeline import ARTIFACT_KEY, run_pipeline

    bucket = f"e2e-{uuid.uuid4().hex[:8]}"
    s3_client.create_bucket(Bucket=bucket)
    model = f"e2e-{uuid.uuid4().hex[:6]}-{{device}}"
    path = tiny_params(tiny(
        devices=[tiny_device("cpu-1t"), tiny_device("ort-1t", kind="onnxruntime-cpu", budgets_ms=[20.0])],
        export={"model_name": model},
        storage={"remote": f"s3://{bucket}/dvc", "endpoint_url": moto_server, "push": True},
        tracking={"experiment": f"e2e-{bucket}", "retries": 1}))
    root = path.parent
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    # The project as a user has it: a git checkout with .dvc/ committed (as evit's own repo).
    from flows import dvcrepo

    shutil.copy2(REPO / ".gitignore", root / ".gitignore")
    git(root, "init", "-q")
    dvcrepo.ensure_repo(root)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "the project")

    # --- first run: every stage runs ----------------------------------------------------------
    t0 = time.perf_counter()
    first = run_pipeline(str(path))
    first_s = time.perf_counter() - t0
    assert set(first["ran"]) == STAGES and first["cached"] == [] and first["failed"] == []
    assert first["pushed"] > 0
    # The S3 remote it configured is not committed yet: the run says so (see docs/operations.md).
    assert {".dvc/config", "dvc.lock"} <= set(first["uncommitted"])

    # --- artifacts on disk ----------------------------------------------------------------------
    for d in DEVICES:
        assert json.loads((root / "luts" / f"{d}.json").read_text())["complete"] is True
        result = json.loads((root / "results" / f"search-{d}" / "result.json").read_text())
        feasible = [b for b in result["budgets"] if b["feasible"]]
        assert feasible, result["budgets"]
        for b in feasible:
            folder = root / "exports" / d / b["label"]
            assert (folder / "model.onnx").stat().st_size > 0
            card = json.loads((folder / "card.json").read_text())
            assert card["arch_key"] == b["key"]
            # class names in logit order and the input spec, for whoever fetches the model
            assert card["classes"] == [str(i) for i in range(10)]
            assert card["input"]["resolution"] == card["arch"]["resolution"] and card["input"]["mean"]
    assert (root / "models" / "supernet.pt").is_file() and (root / "plots" / "train-loss.png").is_file()

    # --- DVC: the flow left nothing to do --------------------------------------------------------
    lock_before = (root / "dvc.lock").read_bytes()
    lock = yaml.safe_load(lock_before)["stages"]
    assert set(lock) == STAGES
    assert lock["search@ort-1t"]["params"]["params.yaml"]["devices.1"]["name"] == "ort-1t"
    env = clean_env({"MLFLOW_TRACKING_URI": mlflow_server.url})
    assert "up to date" in dvc(root, "status", env=env).stdout
    repro = dvc(root, "repro", env=env)
    assert "Data and pipelines are up to date" in repro.stdout + repro.stderr, repro.stdout
    assert (root / "dvc.lock").read_bytes() == lock_before
    metrics = json.loads(dvc(root, "metrics", "show", "--json", env=env).stdout)
    shown = json.dumps(metrics)
    assert "metrics/train.json" in shown and "metrics/search-ort-1t.json" in shown
    plots = dvc(root, "plots", "show", "--json", env=env).stdout
    assert "plots/search-cpu-1t.png" in plots and "plots/lut-ort-1t.png" in plots
    dvc(root, "plots", "show", env=env)
    html = (root / "dvc_plots" / "index.html").read_text()
    assert html.count("<img") == 6 and "https://" not in html  # renders offline: images, no CDN scripts
    table = dvc(root, "metrics", "show", env=env).stdout
    header = table.splitlines()[0].split()
    print(f"\ndvc metrics show: {len(table.splitlines())} lines, {len(header)} columns")
    assert len(header) < 60, table

    # --- the S3 remote holds the outputs ----------------------------------------------------------
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="dvc/").get("Contents", [])]
    assert len(keys) >= first["pushed"]

    # --- MLflow: run tree and registry --------------------------------------------------------------
    client = MlflowClient(mlflow_server.url)
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["stages_ran"] == len(STAGES)
    exp = parent.info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert STAGES <= {r.data.tags.get("evit.stage") for r in children}
    assert "cpu-1t" in Path(client.download_artifacts(parent.info.run_id, "subnets.md",
                                                      str(tmp_path_factory.mktemp("md")))).read_text()
    for d in DEVICES:
        name = model.format(device=d)
        versions = client.search_model_versions(f"name='{name}'")
        assert versions, name
        champion = client.get_model_version_by_alias(name, "champion")
        assert float(champion.tags["evit.val_top1"]) >= 0.0 and champion.tags["evit.arch"]
        assert json.loads(champion.tags["evit.classes"]) == [str(i) for i in range(10)]
        assert json.loads(champion.tags["evit.input"])["std"]

    # --- Prefect: the markdown artifact ---------------------------------------------------------------
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as pclient:  # newest first: earlier tests' flows share the Prefect home
        artifacts = pclient.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ARTIFACT_KEY])),
                                           sort=ArtifactSort.CREATED_DESC)
    table = artifacts[0].data
    assert all(f"| {d} |" in table for d in DEVICES) and model.format(device="ort-1t") in table

    # --- second run, new process: all cache hits -------------------------------------------------------
    t0 = time.perf_counter()
    second = evit_pipeline(root, env=env)
    second_s = time.perf_counter() - t0
    assert set(second["cached"]) == STAGES and second["ran"] == [], second
    assert second["registered_again"] == {}  # the registry holds every exported version
    assert (root / "dvc.lock").read_bytes() == lock_before
    print(f"\ne2e: first run {first_s:.1f}s (flow {first['seconds']}s), second run {second_s:.1f}s wall "
          f"(flow {second['seconds']}s, all cached)")
    assert {r["device"] for r in second["subnets"]} == set(DEVICES)
    assert all(r["fetch"] for r in second["subnets"] if r["feasible"])

    # --- a move to another MLflow server: the cached exports register again, nothing re-exported ------
    other = start_mlflow_server(tmp_path_factory.mktemp("mlflow-team"))
    try:
        team_env = clean_env({"MLFLOW_TRACKING_URI": other.url})
        exports_before = {p: p.read_bytes() for p in (root / "exports").rglob("*") if p.is_file()}
        third = evit_pipeline(root, env=team_env)
        assert set(third["cached"]) == STAGES and third["ran"] == [], third
        assert set(third["registered_again"]) == set(DEVICES), third["registered_again"]
        assert {p: p.read_bytes() for p in (root / "exports").rglob("*") if p.is_file()} == exports_before
        name = model.format(device="cpu-1t")
        fetched = run([str(VENV_BIN / "evit"), "fetch", f"{name}@champion", "--out", str(root / "fetched")], root,
                      team_env)
        assert f"{name} version 1" in fetched.stdout and "classes:    10: 0, 1, 2" in fetched.stdout, fetched.stdout
        assert len(fetched.stdout.splitlines()) < 12
        from evit.config import load_params
        from evit.registry import missing_registrations

        monkeypatch.setenv("MLFLOW_TRACKING_URI", other.url)
        assert missing_registrations(load_params(path), "ort-1t") == []
    finally:
        stop_server(other)

    # --- move to a team setup, as docs/operations.md says: commit, push, clone, pull ---------------------
    assert (root / "dvc.lock").read_bytes() == lock_before
    git(root, "add", "params.yaml", "dvc.yaml", "dvc.lock", ".dvc/config")
    git(root, "commit", "-qm", "pipeline record and remote")
    assert dvcrepo.uncommitted(root) == []
    dvc(root, "push", env=env)
    clone = tmp_path_factory.mktemp("clone") / "evit"
    git(root.parent, "clone", "-q", str(root), str(clone))
    dvc(clone, "pull", env=env)
    assert "up to date" in dvc(clone, "status", env=env).stdout  # every stage cached on the other machine
    assert (clone / "exports" / "ort-1t").is_dir() and (clone / "models" / "supernet.pt").is_file()
