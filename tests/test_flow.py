"""The Prefect flow: caching that agrees with DVC, per-device invalidation, retries policy.

The stages are real (prepare + sampled LUTs of two CPU devices: seconds each); Prefect runs
in ephemeral mode with an isolated PREFECT_HOME; MLflow uses the project's sqlite file.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from evit.errors import DataError, UserError
from evit.retry import is_transient
from flows import dvcrepo
from tests.flow_helpers import dvc, flow_env, prefect_home, shared_mlflow_db, tiny, tiny_device  # noqa: F401

CHEAP = ["prepare", "lut"]


def _lock(root: Path) -> dict[str, Any]:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def _set_device(path: Path, name: str, **changes: Any) -> None:
    doc = yaml.safe_load(path.read_text())
    for dev in doc["devices"]:
        if dev["name"] == name:
            dev.update(changes)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


@pytest.mark.slow
def test_cache_hits_follow_dvc_per_device(tiny_params: Any, flow_env: Path) -> None:
    from flows.pipeline import run_pipeline

    path = tiny_params(tiny(devices=[tiny_device("a"), tiny_device("b")]))
    root = path.parent

    first = run_pipeline(str(path), stages=CHEAP)
    assert first["ran"] == ["lut@a", "lut@b", "prepare"] and first["cached"] == []
    assert all(dvcrepo.stage_state(root, n).up_to_date for n in first["ran"])  # `dvc status` clean for them
    assert (root / ".evit-cache" / "prefect").is_dir()

    # One device's settings changed: only that device's branch reruns. (A second run in a new
    # process is covered by tests/test_e2e.py.)
    _set_device(path, "b", repeats=4)
    second = run_pipeline(str(path), stages=CHEAP)
    assert second["ran"] == ["lut@b"] and second["cached"] == ["lut@a", "prepare"]
    assert _lock(root)["lut@b"]["params"]["params.yaml"]["devices.1.repeats"] == 4

    # A budget change is not a LUT input: the flow and `dvc repro` both keep the table.
    _set_device(path, "b", budgets_ms=[60.0])
    budget = run_pipeline(str(path), stages=CHEAP)
    assert budget["ran"] == [] and budget["cached"] == ["lut@a", "lut@b", "prepare"]
    repro = dvc(root, "repro", "lut@a", "lut@b")
    assert "didn't change" in repro.stdout + repro.stderr and "Running stage" not in repro.stdout, repro.stdout
    with dvcrepo.open_repo(root) as repo:  # ... while search@b does depend on the budgets
        search_b = next(s for s in repo.index.stages if s.addressing == "search@b")
        assert any("devices.1" in dep.params for dep in search_b.deps if hasattr(dep, "params"))

    # An output deleted but still in the DVC cache is restored, not recomputed.
    table = (root / "luts" / "a.json").read_bytes()
    (root / "luts" / "a.json").unlink()
    third = run_pipeline(str(path), stages=CHEAP)
    assert third["ran"] == [] and (root / "luts" / "a.json").read_bytes() == table

    # What `dvc repro` ran is a cache hit for the flow, and the lock entries have one shape.
    _set_device(path, "b", repeats=5)
    dvc(root, "repro", "lut@b")
    fourth = run_pipeline(str(path), stages=CHEAP)
    assert fourth["ran"] == [] and fourth["cached"] == ["lut@a", "lut@b", "prepare"]
    lock = _lock(root)
    by_flow, by_dvc = lock["lut@a"], lock["lut@b"]
    assert by_flow.keys() == by_dvc.keys() == {"cmd", "deps", "params", "outs"}
    assert [o["path"].replace("/a", "/b").replace("-a.", "-b.") for o in by_flow["outs"]] == \
        [o["path"] for o in by_dvc["outs"]]
    assert by_flow["deps"] == by_dvc["deps"]  # the same manifest hash, as DVC computes it
    status = dvc(root, "status", "prepare", "lut@a", "lut@b").stdout
    assert "up to date" in status, status


@pytest.mark.slow
def test_forced_stage_reruns_and_unchanged_output_keeps_later_stages_cached(tiny_params: Any,
                                                                             flow_env: Path) -> None:
    from flows.pipeline import run_pipeline

    path = tiny_params(tiny(devices=[tiny_device("a")]))
    run_pipeline(str(path), stages=CHEAP)
    again = run_pipeline(str(path), stages=CHEAP, force=["prepare"])
    assert again["ran"] == ["prepare"] and again["cached"] == ["lut@a"]  # same data bytes -> LUT still valid


@pytest.mark.slow
def test_mobile_lut_converts_ahead_beside_training_then_only_measures(tiny_params: Any, flow_env: Path,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The default pipeline's ExecuTorch device: its files are lowered by convert-ahead (beside
    training), and lut@et-1t finds them all and only times (a rerun reusing the cache:
    test_mobile_export)."""
    import json

    from flows.pipeline import run_pipeline
    from tests.search_export_helpers import TINY

    monkeypatch.setenv("EVIT_MODEL_CACHE", str(tmp_path / "model-cache"))
    # the table of a 2-stage space (the LUT stage reads its space through space_for): the cpu
    # preset's sampled table is ~4 min of lowering, which is what this saves in the pipeline
    monkeypatch.setattr("evit.latency.stage.space_for", lambda params: TINY)
    path = tiny_params(tiny(devices=[tiny_device("et-1t", kind="executorch", sample_subnets=1, convert_jobs=2)]))
    first = run_pipeline(str(path), stages=["prepare", "train", "lut"])
    assert set(first["ran"]) == {"prepare", "train", "lut@et-1t"} and first["failed"] == []
    lut = json.loads((path.parent / "luts" / "et-1t.json").read_text())
    conversion = lut["measurement"]["conversion"]
    assert conversion["files_made"] == 0 and conversion["files_reused"] >= 2, conversion  # all made ahead
    assert lut["validation"]["n"] == 10 and lut["device"]["delegate"] == "xnnpack"
    assert len(list((tmp_path / "model-cache").glob("*.pte"))) == conversion["files_reused"]


@pytest.mark.slow
def test_user_error_fails_once_with_its_message(tiny_params: Any, flow_env: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.pipeline import pipeline_flow

    missing = tmp_path / "no-such-images"
    path = tiny_params(tiny(data={"source": str(missing)}))
    t0 = time.perf_counter()
    state = pipeline_flow(params_path=str(path), stages=["prepare"], return_state=True)
    assert state.is_failed()
    with pytest.raises(DataError, match="no-such-images"):
        state.result()
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_task_runs() if r.flow_run_id == state.state_details.flow_run_id]
    assert [(r.name, r.run_count) for r in runs] == [("prepare", 1)]  # not retried
    assert time.perf_counter() - t0 < 60


def test_unknown_stage_or_device_is_a_user_error() -> None:
    from flows.pipeline import select

    with pytest.raises(UserError, match=r"unknown devices \['gpu'\]; accepted: \['a'\]"):
        select(["gpu"], ["a"], "devices")


def test_transient_failures_are_told_from_user_errors() -> None:
    import botocore.exceptions
    from mlflow.exceptions import MlflowException
    from requests.exceptions import ConnectionError as RequestsConnectionError

    assert is_transient(botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    throttled = botocore.exceptions.ClientError({"Error": {"Code": "SlowDown"}}, "PutObject")
    denied = botocore.exceptions.ClientError({"Error": {"Code": "AccessDenied"}}, "PutObject")
    assert is_transient(throttled) and not is_transient(denied)
    assert is_transient(RequestsConnectionError("connection refused"))
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    assert is_transient(MlflowException("API request failed", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_transient(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))
    assert is_transient(OSError(errno.ECONNRESET, "reset"))
    assert not is_transient(FileNotFoundError(errno.ENOENT, "gone"))
    assert not is_transient(ValueError("a bug"))
    try:  # a user error caused by a network error is still the user's to fix: no retry
        try:
            raise ConnectionRefusedError("endpoint down")
        except ConnectionRefusedError as exc:
            raise DataError("s3://bucket: cannot reach endpoint") from exc
    except DataError as err:
        assert not is_transient(err)


def test_tasks_retry_transient_failures_with_backoff() -> None:
    from flows.tasks import TASKS, retry_condition

    for t in TASKS.values():
        assert t.retries >= 1 and t.retry_condition_fn is retry_condition
        assert t.retry_delay_seconds[:2] == [10.0, 20.0]
        assert t.persist_result is True and t.cache_expiration is None


def test_final_table_names_what_to_fetch() -> None:
    from flows.report import subnets_table

    rows = [{"device": "cpu-1t", "budget": "4ms", "feasible": True, "val_top1": 0.94521, "predicted_ms": 3.8,
             "measured_ms": 3.7612, "fetch": "evit-cpu-1t/2", "aliases": ["4ms"]},
            {"device": "ort-1t", "budget": "0_1ms", "feasible": False}]
    lines = subnets_table(rows).splitlines()
    assert lines[0].split() == ["device", "budget", "val", "top-1", "predicted", "ms", "measured", "ms", "fetch", "with"]
    assert lines[2].split() == ["cpu-1t", "4ms", "0.9452", "3.800", "3.761", "(-1%)", "evit", "fetch", "evit-cpu-1t/2"]
    assert lines[3].split() == ["ort-1t", "0_1ms", "infeasible"]
    assert "no subnets" in subnets_table([])
