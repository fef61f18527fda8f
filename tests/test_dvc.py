"""dvc.yaml rendering, what DVC parses from it, the remote config, and a real S3 push/pull."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from evit.config import StorageParams, load_params, parse_params
from flows import dvcfile, dvcrepo
from tests.flow_helpers import REPO, clean_env, dvc, tiny_device


def _stages(root: Path) -> dict[str, Any]:
    with dvcrepo.open_repo(root) as repo:
        return {s.addressing: s for s in repo.index.stages}


def _params_keys(stage: Any) -> list[str]:
    return sorted(k for dep in stage.deps if dep.__class__.__name__ == "ParamsDependency" for k in dep.params)


def test_committed_dvc_yaml_is_the_rendering_of_params_yaml() -> None:
    expected = dvcfile.render(load_params(REPO / "params.yaml"), "params.yaml", REPO)
    assert (REPO / "dvc.yaml").read_text() == expected, "run `python -m flows.dvcfile` after editing params.yaml"


def test_dvc_sees_every_stage_and_each_device_depends_on_its_own_entry(tiny_params: Any) -> None:
    edge = {k: v for k, v in tiny_device("edge").items() if k != "warmup"}  # a key left to its default
    devices = [tiny_device("cpu-1t"), tiny_device("ort-1t", kind="onnxruntime-cpu"), edge]
    path = tiny_params({"devices": devices})
    root = path.parent
    dvcrepo.ensure_repo(root)
    assert dvcfile.sync(load_params(path), "params.yaml", root) is True
    assert dvcfile.sync(load_params(path), "params.yaml", root) is False  # idempotent
    stages = _stages(root)
    names = {f"{k}@{d['name']}" for k in ("lut", "search", "export") for d in devices}
    assert set(stages) == {"prepare", "train", "baselines"} | names
    assert stages["lut@ort-1t"].cmd == "evit lut --device ort-1t"
    # A LUT depends on each key of its device's entry but budgets_ms (only search and export read the
    # budgets); a key the entry lacks is not listed (DVC would fail on it).
    lut_keys = {k for k in tiny_device("x") if k != "budgets_ms"}
    assert _params_keys(stages["lut@ort-1t"]) == sorted([f"devices.1.{k}" for k in lut_keys] + ["space"])
    assert sorted(set(_params_keys(stages["lut@edge"]))) == sorted([f"devices.2.{k}" for k in lut_keys - {"warmup"}] + ["space"])
    assert _params_keys(stages["search@edge"]) == ["devices.2", "search", "space"]
    assert _params_keys(stages["train"]) == ["space", "train"]
    search_deps = {d.def_path for d in stages["search@edge"].deps if d.__class__.__name__ != "ParamsDependency"}
    assert search_deps == {"data/prepared", "models/supernet.pt", "luts/edge.json", "results/baselines.json"}
    # the baselines: one stage, every device, its models apart from the train stage's `models/`
    assert _params_keys(stages["baselines"]) == ["baselines", "devices", "space", "train"]
    assert {o.def_path for o in stages["baselines"].outs} == {
        "baselines", "results/baselines.json", "metrics/baselines.json",
        *(f"plots/baselines-{d['name']}.csv" for d in devices)}
    assert {o.def_path for o in stages["export@cpu-1t"].outs} == {"exports/cpu-1t", "metrics/export-cpu-1t.json"}
    # Plots are images only (no Vega charts that load their library from a CDN); the CSV is an output.
    assert {o.def_path for o in stages["search@cpu-1t"].outs if o.plot} == {"plots/search-cpu-1t.png"}
    assert "plots/search-cpu-1t.csv" in {o.def_path for o in stages["search@cpu-1t"].outs}
    assert [o.def_path for o in stages["train"].outs if o.persist] == ["models"]


def test_other_params_file_and_partial_sections(tmp_path: Path) -> None:
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({"train": {"epochs": 2}, "devices": [tiny_device("x")]}))
    params = load_params(tmp_path / "exp.yaml")
    text = dvcfile.render(params, "exp.yaml", tmp_path)
    doc = yaml.safe_load(text)
    assert doc["stages"]["train"]["cmd"] == "evit train --params exp.yaml"
    assert doc["stages"]["train"]["params"] == [{"exp.yaml": ["train"]}]  # `space` is absent from exp.yaml
    assert "params" not in doc["stages"]["prepare"]
    lut_params = doc["stages"]["lut"]["do"]["params"][0]["exp.yaml"]
    assert "${item.name}" in lut_params and "${item.budgets_ms}" not in lut_params
    assert doc["stages"]["lut"]["foreach"]["x"]["threads"] == "devices.0.threads"
    assert doc["stages"]["search"]["do"]["params"] == [{"exp.yaml": ["devices.${item}"]}]
    assert doc["stages"]["search"]["foreach"] == {"x": 0}
    # baselines: [] turns the stage (and the search's dependency on its result) off
    off = dvcfile.render(params.model_copy(update={"baselines": params.baselines.model_copy(update={"models": []})}),
                         "exp.yaml", tmp_path)
    assert "baselines" not in yaml.safe_load(off)["stages"] and "results/baselines.json" not in off


def test_local_source_directory_is_a_dependency(tmp_path: Path) -> None:
    (tmp_path / "images" / "train").mkdir(parents=True)
    params = parse_params({"data": {"source": "images"}})
    doc = yaml.safe_load(dvcfile.render(params, "params.yaml", tmp_path))
    assert doc["stages"]["prepare"]["deps"] == ["images"]
    assert "deps" not in yaml.safe_load(dvcfile.render(parse_params({}), "params.yaml", tmp_path))["stages"]["prepare"]


def test_remote_config_local_and_s3(tmp_path: Path) -> None:
    dvcrepo.ensure_repo(tmp_path)
    assert dvcrepo.sync_remote(StorageParams(), tmp_path) is True
    assert dvcrepo.sync_remote(StorageParams(), tmp_path) is False
    config = (tmp_path / ".dvc" / "config").read_text()
    assert "url = ../.dvc-remote" in config and "remote = evit" in config and "analytics = False" in config
    s3 = StorageParams(remote="s3://team-bucket/evit", endpoint_url="http://127.0.0.1:9000", region="eu-west-1")
    assert dvcrepo.sync_remote(s3, tmp_path) is True
    with dvcrepo.open_repo(tmp_path) as repo:
        remote = repo.config["remote"]["evit"]
    assert (remote["url"], remote["endpointurl"], remote["region"]) == ("s3://team-bucket/evit",
                                                                       "http://127.0.0.1:9000", "eu-west-1")
    assert "secret" not in (tmp_path / ".dvc" / "config").read_text().lower()


def test_bad_remote_is_a_config_error() -> None:
    from evit.config import ConfigError

    with pytest.raises(ConfigError, match="storage.remote"):
        parse_params({"storage": {"remote": "gs://bucket/x"}})


@pytest.mark.slow
def test_push_pull_round_trip_through_s3(tiny_params: Any, moto_server: str, s3_client: Any,
                                        tmp_path_factory: pytest.TempPathFactory,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A recorded stage goes to a real S3 endpoint (moto_server) and comes back into a fresh
    checkout with `dvc pull`, byte for byte, leaving `dvc status` clean."""
    from evit import stages

    path = tiny_params({"data": {"max_per_class": 12}, "devices": [tiny_device("cpu-1t")],
                        "storage": {"remote": "s3://evit-dvc-test/store", "endpoint_url": moto_server}})
    root = path.parent
    s3_client.create_bucket(Bucket="evit-dvc-test")
    params = load_params(path)
    dvcrepo.ensure_repo(root)
    dvcfile.sync(params, "params.yaml", root)
    dvcrepo.sync_remote(params.storage, root)
    stages.prepare(params)
    dvcrepo.commit(root, "prepare")
    manifest = (root / "data/prepared/manifest.json").read_bytes()

    assert dvcrepo.push(root) > 0
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket="evit-dvc-test", Prefix="store/").get("Contents", [])]
    assert any(k.startswith("store/files/md5/") for k in keys)

    clone = tmp_path_factory.mktemp("clone")
    for name in ("params.yaml", "dvc.yaml", "dvc.lock", ".dvcignore"):
        shutil.copy2(root / name, clone / name)
    (clone / ".dvc").mkdir()
    shutil.copy2(root / ".dvc" / "config", clone / ".dvc" / "config")
    env = clean_env()
    dvc(clone, "pull", "prepare", env=env)
    assert (clone / "data/prepared/manifest.json").read_bytes() == manifest
    out = dvc(clone, "status", "prepare", env=env).stdout
    assert "up to date" in out, out

    # AWS_ENDPOINT_URL wins over the endpoint of .dvc/config for evit's own pushes.
    dvcrepo.sync_remote(StorageParams(remote="s3://evit-dvc-test/store", endpoint_url="http://127.0.0.1:9"), root)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    assert dvcrepo.push(root) == 0  # everything is there already; the endpoint answered
