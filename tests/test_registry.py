"""The MLflow registry: registration, idempotency, alias rules, retries + rollback, fetch.

Against a real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts) and
against the default local store (`sqlite:///mlflow.db` in the project folder).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from fixtures_servers import MlflowServer, closed_port_url, mlflow_server, start_mlflow_server, stop_server  # noqa: F401
from mlflow import MlflowClient
from mlflow.entities import ViewType
from search_export_helpers import make_export, registry_params

from evit import registry
from evit.errors import RegistryError
from evit.formats import bundle
from evit.io import read_json, sha256_file
from evit.search.budgets import Budget


@pytest.fixture(autouse=True)
def _isolated_mlflow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test talks only to the store it names; nothing lands in the repository."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "EVIT_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_TELEMETRY", "false")
    monkeypatch.chdir(tmp_path)


def _versions(client: MlflowClient, name: str) -> list[int]:
    return sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))


def _alias(client: MlflowClient, name: str, alias: str) -> int:
    return int(client.get_model_version_by_alias(name, alias).version)


# --- no server needed ----------------------------------------------------------------------

def test_alias_labels_follow_mlflow_rules() -> None:
    assert Budget("latency", 1.5).label == "1_5ms"
    assert Budget("latency", 3.0).label == "3ms"
    assert Budget("flops", 12.0).label == "12mflops"
    assert Budget("latency", 0.25).label == "0_25ms"
    assert registry.sanitize_alias("1.5ms") == "1_5ms"
    assert registry.sanitize_alias("v3") == "budget-v3"
    assert registry.sanitize_alias("latest") == "budget-latest"
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved

    for label in (Budget("latency", 1.5).label, Budget("flops", 7.25).label, registry.CHAMPION):
        _validate_model_alias_name(label)
        _validate_model_alias_name_reserved(label)


def test_parse_ref() -> None:
    assert registry.parse_ref("evit-cpu-1t@champion") == registry.ModelRef("evit-cpu-1t", alias="champion")
    assert registry.parse_ref("models:/evit-cpu-1t/3") == registry.ModelRef("evit-cpu-1t", version="3")
    for bad in ("evit-cpu-1t", "evit@", "a/b/c", "x@y@z"):
        with pytest.raises(RegistryError, match="accepted: NAME@ALIAS"):
            registry.parse_ref(bad)


def test_unreachable_registry_retries_then_clear_error(tmp_path: Path) -> None:
    folder, _ = make_export(tmp_path / "exp")
    dead = closed_port_url()
    params = registry_params(f"sqlite:///{tmp_path / 'track.db'}", registry_uri=dead, retries=2)
    t0 = time.monotonic()
    with pytest.raises(RegistryError) as info:
        registry.register_export(params, folder)
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert dead in msg and "3 attempt(s)" in msg and "tracking.retries = 2" in msg
    assert elapsed >= 0.5 + 1.0  # backoff 0.5 s, 1 s between the three attempts
    # nothing half-registered: the tracking store holds no run and no logged model
    client = MlflowClient(f"sqlite:///{tmp_path / 'track.db'}")
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    assert not client.search_runs(ids, run_view_type=ViewType.ALL)
    assert not list(client.search_logged_models(ids))


def test_fetch_unreachable_registry_is_a_registry_error(tmp_path: Path) -> None:
    params = registry_params(closed_port_url(), retries=0)
    with pytest.raises(RegistryError, match="did not answer after 1 attempt"):
        registry.fetch_model(params, "evit-dev@champion", "onnx", tmp_path / "out")


# --- a real mlflow server --------------------------------------------------------------------

@pytest.mark.slow
def test_register_is_idempotent_and_fetch_verifies(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    params = registry_params(mlflow_server.url)
    folder, static = make_export(tmp_path / "exp", seed=1, val_top1=0.6)
    first = registry.register_export(params, folder)
    name = first["name"]
    assert first["created"] and first["version"] == "1"
    assert sorted(first["aliases"]) == ["1_5ms", "champion"]

    again = registry.register_export(params, folder)
    assert again == {**first, "created": False}
    client = MlflowClient(mlflow_server.url)
    assert _versions(client, name) == [1]

    mv = client.get_model_version(name, "1")
    card = read_json(folder / "card.json")
    assert mv.tags["evit.val_top1"] == repr(0.6)
    assert json.loads(mv.tags["evit.arch"]) == card["arch"]
    assert mv.tags["evit.data_version"] == "data-v1"
    for f in bundle.CORE_FILES:
        assert mv.tags[f"evit.sha256.{f}"] == sha256_file(folder / f)
    assert mv.tags[registry.HASH_TAG] == registry.content_hash(card)

    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        want = static(x)

    # fetch each format; files verified against the tags
    out = registry.fetch_model(params, f"{name}@champion", "torchscript", tmp_path / "ts")
    assert out["version"] == "1" and out["card"]["arch_key"] == card["arch_key"]
    ts = torch.jit.load(out["files"]["model.torchscript.pt"])
    torch.testing.assert_close(ts(x), want, rtol=1e-5, atol=1e-5)

    out = registry.fetch_model(params, f"{name}/1", "onnx", tmp_path / "onnx")
    import onnxruntime as ort

    sess = ort.InferenceSession(out["files"]["model.onnx"], providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)

    out = registry.fetch_model(params, f"{name}@1_5ms", "pytorch", tmp_path / "pt")
    rebuilt = bundle.load_static(tmp_path / "pt")
    torch.testing.assert_close(rebuilt(x), want)
    assert (tmp_path / "pt" / "model.pt2").is_file()

    # the plain MLflow way, as the README shows it
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_registry_uri(mlflow_server.url)
    loaded = mlflow.pytorch.load_model(f"models:/{name}@champion")
    torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    np.testing.assert_allclose(pyfunc.predict(x.numpy()), want.numpy(), rtol=1e-4, atol=1e-4)

    # a tampered artifact store is refused: the pt2 graph MLflow wrote, and our own files
    pt2 = [p for p in mlflow_server.artifacts.rglob("data/model.pt2") if sha256_file(p) == mv.tags[registry.PT2_TAG]]
    assert len(pt2) == 1
    pt2[0].write_bytes(pt2[0].read_bytes() + b"\0")
    with pytest.raises(RegistryError, match="data/model.pt2 has sha256"):
        registry.fetch_model(params, f"{name}@champion", "pytorch", tmp_path / "tampered-pt2")
    stored = list(mlflow_server.artifacts.rglob("extra_files/model.onnx"))
    target = [p for p in stored if sha256_file(p) == mv.tags["evit.sha256.model.onnx"]]
    assert len(target) == 1
    target[0].write_bytes(target[0].read_bytes() + b"\0")
    with pytest.raises(RegistryError, match="model.onnx has sha256 .* was recorded"):
        registry.fetch_model(params, f"{name}@champion", "onnx", tmp_path / "tampered")

    with pytest.raises(RegistryError, match="has aliases \\['1_5ms', 'champion'\\] and versions \\[1\\]"):
        registry.fetch_model(params, f"{name}@3ms", "onnx", tmp_path / "none")
    with pytest.raises(RegistryError, match="'coreml' is not supported; accepted: onnx, torchscript, pytorch, tflite, pte"):
        registry.fetch_model(params, f"{name}@champion", "coreml", tmp_path / "none")


@pytest.mark.slow
def test_aliases_move_only_to_at_least_as_accurate(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    params = registry_params(mlflow_server.url)
    fast, slow = Budget("latency", 1.5), Budget("latency", 3.0)
    client = MlflowClient(mlflow_server.url)

    r1 = registry.register_export(params, make_export(tmp_path, seed=1, val_top1=0.6, budget=fast)[0])
    name = r1["name"]
    # worse for the same budget: a new version, but neither alias moves
    r2 = registry.register_export(params, make_export(tmp_path, seed=2, val_top1=0.5, budget=fast)[0])
    assert (r2["version"], r2["created"], r2["aliases"]) == ("2", True, [])
    assert _alias(client, name, "1_5ms") == 1 and _alias(client, name, "champion") == 1
    # as accurate: ties go to the newer version
    r3 = registry.register_export(params, make_export(tmp_path, seed=3, val_top1=0.6, budget=fast)[0])
    assert sorted(r3["aliases"]) == ["1_5ms", "champion"]
    assert _alias(client, name, "1_5ms") == 3 and _alias(client, name, "champion") == 3
    # another budget, less accurate than the champion: gets its own alias only
    r4 = registry.register_export(params, make_export(tmp_path, seed=4, val_top1=0.55, budget=slow)[0])
    assert r4["aliases"] == ["3ms"]
    assert _alias(client, name, "3ms") == 4 and _alias(client, name, "champion") == 3
    # more accurate at the larger budget: becomes champion; the 1.5 ms alias stays
    r5 = registry.register_export(params, make_export(tmp_path, seed=5, val_top1=0.7, budget=slow)[0])
    assert sorted(r5["aliases"]) == ["3ms", "champion"]
    assert _alias(client, name, "1_5ms") == 3 and _alias(client, name, "champion") == 5
    assert _versions(client, name) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_registry_dying_mid_registration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server dies after the model was logged, before the version exists: retries, then
    a RegistryError naming what could not be cleaned up; no version exists, and the next
    registration of the same model (server back) removes the orphaned run + logged model."""
    root = tmp_path / "server"
    folder, _ = make_export(tmp_path, seed=2, val_top1=0.9)
    srv = start_mlflow_server(root)
    try:
        params = registry_params(srv.url, retries=1)

        def kill_server(step: str) -> None:
            if step == "logged-model":
                stop_server(srv)

        with pytest.raises(RegistryError, match="did not answer after 2 attempt") as info:
            registry.register_export(params, folder, on_step=kill_server)
        assert "Could not clean up" in str(info.value) and "logged model m-" in str(info.value)
    finally:
        stop_server(srv)
    name = params.export.model_name.format(device="dev")
    store = MlflowClient(tracking_uri=srv.backend_uri, registry_uri=srv.backend_uri)
    assert _versions(store, name) == []
    exp = store.get_experiment_by_name("evit-tests")
    orphans = store.search_runs([exp.experiment_id])
    assert len(orphans) == 1

    srv = start_mlflow_server(root)  # same store, new port
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which evit.tracking lets win over params
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    try:
        params = registry_params(srv.url, model_name=params.export.model_name, retries=1)
        out = registry.register_export(params, folder)
        assert (out["version"], out["created"]) == ("1", True)
        client = MlflowClient(srv.url)
        assert _versions(client, name) == [1]
        runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
        stages = {r.info.run_id: r.info.lifecycle_stage for r in runs}
        assert stages[orphans[0].info.run_id] == "deleted"
        assert sorted(stages.values()) == ["active", "deleted"]
        models = list(client.search_logged_models([exp.experiment_id]))
        assert [f"models:/{m.model_id}" for m in models] == [client.get_model_version(name, "1").source]
    finally:
        stop_server(srv)


# --- the default local store -----------------------------------------------------------------

@pytest.mark.slow
def test_default_local_sqlite_store(tmp_path: Path) -> None:
    """The default store: a sqlite file in the project folder, artifacts in ./mlruns.

    The URI is made absolute here (the default is `sqlite:///mlflow.db`): MLflow caches one
    store per URI string per process, so a relative one would still point at the folder of
    whichever earlier test used it first.
    """
    from evit.config import parse_params

    assert parse_params({}).tracking.uri == "sqlite:///mlflow.db"
    params = parse_params({"export": {"model_name": "evit-{device}"},
                           "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    folder, static = make_export(tmp_path / "exp", seed=7, val_top1=0.4, device="cpu-1t")
    out = registry.register_export(params, folder)
    assert (out["name"], out["version"], out["created"]) == ("evit-cpu-1t", "1", True)
    assert (tmp_path / "mlflow.db").is_file()
    assert registry.register_export(params, folder)["created"] is False

    fetched = registry.fetch_model(params, "evit-cpu-1t@champion", "onnx", tmp_path / "onnx")
    assert sha256_file(fetched["files"]["model.onnx"]) == sha256_file(folder / "model.onnx")
    assert fetched["card"]["metrics"]["val_top1"] == 0.4

    mlflow.set_tracking_uri(params.tracking.uri)
    loaded = mlflow.pytorch.load_model("models:/evit-cpu-1t@champion")
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), static(x), rtol=1e-5, atol=1e-5)

    # tamper with the stored safetensors: fetch refuses, in every format
    stored = [p for p in Path("mlruns").rglob("extra_files/model.safetensors")]
    assert len(stored) == 1
    stored[0].write_bytes(stored[0].read_bytes()[:-1] + b"\1")
    for fmt in ("pytorch", "torchscript", "onnx"):
        with pytest.raises(RegistryError, match="model.safetensors has sha256"):
            registry.fetch_model(params, "evit-cpu-1t/1", fmt, tmp_path / f"bad-{fmt}")


@pytest.mark.slow
def test_a_new_server_gets_the_exported_versions_again(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    """The registry is an output of export: against a second, empty server the exported
    folders are registered again from their files; where they exist, nothing is done."""
    params = registry_params(mlflow_server.url)
    folder, _static = make_export(tmp_path / "exports" / "dev", seed=4, val_top1=0.7)
    index = tmp_path / "exports" / "dev" / "index.json"
    index.write_text(json.dumps({"device": "dev", "subnets": [{"label": "1_5ms", "folder": str(folder)}]}))
    name = registry.register_export(params, folder)["name"]
    assert registry.missing_registrations(params, "dev") == []
    assert registry.restore_registrations(params, "dev") == []

    other = start_mlflow_server(tmp_path / "team-server")
    try:
        team = params.model_copy(update={"tracking": params.tracking.model_copy(
            update={"uri": other.url, "registry_uri": other.url})})
        before = {p: p.read_bytes() for p in folder.iterdir()}
        assert registry.missing_registrations(team, "dev") == [folder]
        again = registry.restore_registrations(team, "dev")
        assert [(r["name"], r["version"], r["created"]) for r in again] == [(name, "1", True)]
        assert {p: p.read_bytes() for p in folder.iterdir()} == before  # registered from the files as they are
        mv = MlflowClient(other.url).get_model_version_by_alias(name, "champion")
        card = read_json(folder / "card.json")
        assert json.loads(mv.tags["evit.classes"]) == card["classes"] == [f"class-{i}" for i in range(card["num_classes"])]
        assert json.loads(mv.tags["evit.input"])["resolution"] == card["arch"]["resolution"]
        assert registry.restore_registrations(team, "dev") == []
    finally:
        stop_server(other)


@pytest.mark.slow
def test_a_reexport_with_int8_adds_the_file_to_the_same_version(tmp_path: Path) -> None:
    """First exported fp32 only, then again (same model) with an int8 file: the existing
    version gets the file and the new card, hashed and verified; fetch --precision int8 works.
    (The registry does not read the file: a stand-in for model.int8.pte keeps this cheap.)"""
    from evit.config import parse_params
    from evit.io import write_json_atomic

    params = parse_params({"export": {"model_name": "evit-{device}"},
                           "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    folder, _ = make_export(tmp_path / "exp", seed=8, val_top1=0.5, device="cpu-1t")
    first = registry.register_export(params, folder)
    with pytest.raises(RegistryError, match="has no model.int8.pte"):
        registry.fetch_model(params, "evit-cpu-1t@champion", "pte", tmp_path / "none", precision="int8")

    int8 = bundle.INT8_FILES["pte"]
    (folder / int8).write_bytes(b"int8 program stand-in")
    card = read_json(folder / "card.json")
    card["files"][int8] = sha256_file(folder / int8)
    write_json_atomic(folder / "card.json", card)
    again = registry.register_export(params, folder)
    assert (again["version"], again["created"]) == (first["version"], False)
    assert again["added"] == sorted(["card.json", int8])
    mv = MlflowClient(params.tracking.uri).get_model_version("evit-cpu-1t", first["version"])
    assert mv.tags[f"evit.sha256.{int8}"] == sha256_file(folder / int8)
    assert mv.tags["evit.sha256.card.json"] == sha256_file(folder / "card.json")

    got = registry.fetch_model(params, "evit-cpu-1t@champion", "pte", tmp_path / "int8", precision="int8")
    assert (tmp_path / "int8" / int8).read_bytes() == b"int8 program stand-in"
    assert int8 in got["card"]["files"]
    assert registry.register_export(params, folder)["added"] == []  # nothing new: nothing uploaded
    onnx = registry.fetch_model(params, "evit-cpu-1t/1", "onnx", tmp_path / "onnx")  # the rest still verifies
    assert sha256_file(onnx["files"]["model.onnx"]) == sha256_file(folder / "model.onnx")
