"""A new device's table in minutes (issue 24), on the tiny latency space: the device-time
budget, transfer from a prior device's table, and converted files shared through S3."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import pytest
from test_latency_helpers import FAST, TINY, all_archs, device_params

from evit.blocks import Block, arch_blocks
from evit.config import ConfigError, DeviceParams, StorageParams, load_params
from evit.config.devices import DeviceLutParams
from evit.errors import LUTError
from evit.latency.devices import Item, get_device
from evit.latency.devices.shared import SharedStore
from evit.latency.lut import load_lut
from evit.latency.measure import Deadline
from evit.latency.plan import Probe, plan_budget
from evit.latency.predictor import LatencyPredictor, Transfer
from evit.latency.stage import build_lut
from evit.nn.static import block_input_shape, build_block


def _params(tiny_params: Any, *devices: dict[str, Any]) -> Any:
    return load_params(tiny_params({"devices": [{**FAST, **d} for d in devices]}))


def test_planner_fits_the_budget_and_covers_every_kind_first() -> None:
    probe = Probe(c0_ms=1.0, c1_ms=0.5, chain_factor=1.3, call_s=0.01, seconds=0.5)
    dp = device_params(repeats=300, validate_subnets=16)
    plans = {m: plan_budget(TINY, dp.model_copy(update={"lut": DeviceLutParams(device_minutes=m)}), probe,
                            in_context=True) for m in (0.1, 1.0)}
    for minutes, bp in plans.items():
        assert bp.expected_s["total"] <= minutes * 60 and bp.expected_s["probe"] == 0.5
        assert {b.kind for b in bp.plan.blocks} == {"first_conv", "mbconv", "attn", "head"}
        assert len(bp.validation) >= 10 and not set(bp.validation) & set(bp.plan.carriers)
    assert len(plans[0.1].plan.carriers) < len(plans[1.0].plan.carriers)  # all 26 blocks it can reach
    assert len(plans[0.1].validation) < len(plans[1.0].validation) == 16
    with pytest.raises(LUTError, match=r"lut.device_minutes=0.05 cannot cover the block kinds .* 10 validation "
                                       r"subnets .* need about 4.3 s; raise device_minutes to at least 0.08"):
        plan_budget(TINY, dp.model_copy(update={"lut": DeviceLutParams(device_minutes=0.05)}), probe,
                    in_context=True)


def test_budget_table_reports_the_time_spent(tiny_params: Any) -> None:
    params = _params(tiny_params, {"name": "n", "kind": "torch-cpu", "validate_subnets": 12,
                                   "lut": {"device_minutes": 0.2}})
    out = build_lut(params, "n", space=TINY, track=False, progress=False)
    lut = load_lut("luts/n.json")
    assert lut["mode"] == "budget" and out["mode"] == "budget" and lut["fallback"] and out["n"] >= 10
    assert lut["budget"]["expected_seconds"]["total"] <= 0.2 * 60
    assert 0 < out["device_seconds"] <= 1.5 * 0.2 * 60 and out["host_seconds"] >= 0  # 1.5: a shared machine
    metrics = json.loads(Path("metrics/lut-n.json").read_text())
    assert metrics["device_seconds"] == out["device_seconds"] and metrics["table_source"] == "regression"
    assert (LatencyPredictor.load("luts/n.json", TINY).predict_many(all_archs(TINY)) > 0).all()


def test_prior_errors_name_the_device(tiny_params: Any) -> None:
    with pytest.raises(ConfigError, match=r"lut.prior 'p0' is not a declared device \(did you mean 'p'\?\)"):
        _params(tiny_params, {"name": "p", "kind": "torch-cpu"},
                {"name": "n", "kind": "torch-cpu", "lut": {"prior": "p0"}})
    params = _params(tiny_params, {"name": "p", "kind": "torch-cpu"},
                     {"name": "n", "kind": "onnxruntime-cpu", "lut": {"prior": "p", "device_minutes": 1}})
    with pytest.raises(LUTError, match=r"device 'n': lut.prior 'p' has no usable table: .*not found; build it"):
        build_lut(params, "n", space=TINY, track=False, progress=False)
    assert not Path("luts/n.json").exists()


def test_transfer_fits_a_per_kind_size_dependent_map() -> None:
    blocks = [Block("mbconv", 16, c, c, expansion=2, kernel=3, stride=1, se=False) for c in (8, 16, 24, 32, 48, 64)]
    prior = {b.key: 0.01 * (i + 1) for i, b in enumerate(blocks)}
    pairs = [("mbconv", prior[b.key], 3.0 * prior[b.key] ** 0.7) for b in blocks]
    scale = Transfer.fit("p", prior, pairs, "scale")
    power = Transfer.fit("p", prior, pairs, "power")
    assert power.coef["mbconv"] == pytest.approx([math.log(3.0), 0.7])
    assert power.predict(blocks[2]) == pytest.approx(3.0 * 0.03 ** 0.7)
    assert scale.coef["mbconv"][1] == 1.0 and scale.coef["attn"] == scale.coef["mbconv"]  # no attn pairs
    assert Transfer.from_dict(json.loads(json.dumps(power.to_dict()))) == power


def test_prior_table_plus_few_measurements_give_a_table(tiny_params: Any) -> None:
    params = _params(tiny_params, {"name": "p", "kind": "torch-cpu"},
                     {"name": "n", "kind": "onnxruntime-cpu", "validate_subnets": 20,
                      "lut": {"device_minutes": 0.1, "prior": "p"}})
    build_lut(params, "p", space=TINY, track=False, progress=False)
    out = build_lut(params, "n", space=TINY, track=False, progress=False)
    lut = load_lut("luts/n.json")
    sources = lut["table_sources"]
    assert set(sources["cv_mape_pct"]) == {"regression", "prior-scale", "prior-power"} and sources["prior"] == "p"
    assert sources["pairs"] == out["entries"] < 28  # every measured block is a pair
    assert out["table_source"] == sources["chosen"]
    # the prior's costs travel in the table: it predicts without luts/p.json
    Path("luts/p.json").unlink()
    pred = LatencyPredictor.load("luts/n.json", TINY)
    if sources["chosen"] != "regression":
        assert pred.transfer is not None and len(pred.transfer.prior_costs) == 28
    assert (pred.predict_many(all_archs(TINY)) > 0).all()


def _items(arch: Any) -> list[Item]:
    blocks = arch_blocks(arch, TINY)
    return [Item(functools.partial(build_block, b), block_input_shape(b), key=f"{b.key}#{i}", file_key=b.key)
            for i, b in enumerate(blocks)]


def test_second_device_on_another_machine_converts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           moto_server: str, s3_client: Any) -> None:
    """ExecuTorch files converted for one device are fetched from the bucket by a device with
    other settings on a machine with an empty cache, even where its plan groups them differently."""
    s3_client.create_bucket(Bucket="evit-models")
    storage = StorageParams(remote="s3://evit-models/dvc", endpoint_url=moto_server)
    monkeypatch.setenv("EVIT_MODEL_CACHE", str(tmp_path / "machine-a"))
    items = _items(TINY.smallest())[:3]  # first conv, stem, first MBConv: one small file
    first = get_device(DeviceParams(name="et-a", kind="executorch", threads=1, warmup=1, repeats=2, rounds=1))
    first.share(SharedStore("s3://evit-models/dvc/latency-models", storage))
    try:
        first.prepare_ahead([items])
    finally:
        first.close()
    assert first.files_made == 1
    names = {o["Key"] for o in s3_client.list_objects_v2(Bucket="evit-models")["Contents"]}
    assert {Path(n).suffix for n in names} == {".pte", ".json"} and all(n.startswith("dvc/latency-models/")
                                                                       for n in names)

    monkeypatch.setenv("EVIT_MODEL_CACHE", str(tmp_path / "machine-b"))
    second = get_device(DeviceParams(name="et-b", kind="executorch", threads=2, warmup=1, repeats=2, rounds=1))
    second.share(SharedStore("s3://evit-models/dvc/latency-models", storage))
    try:
        second.prepare_ahead([items[:1], items[1:]])  # another plan: other groups, so other file names
        ms = second.measure_chains([items])[0]
    finally:
        second.close()
    assert second.files_made == 0 and second.files_fetched == 1 and second.files_reused == 1
    assert all(m.median_ms > 0 for m in ms)
    assert second.conversion_stats()["shared"] == "s3://evit-models/dvc/latency-models"


def test_deadline_stops_the_table_when_the_load_makes_units_dearer() -> None:
    d = Deadline(10.0, {"carrier|a": 2.0, "carrier|b": 2.0, "carrier|c": 2.0}, validation_s=2.0)
    assert d.fits(0.0, ["carrier|a"], rounds=1, rounds_left=1)  # 2 + 2 <= 10
    d.timed(2.0, 4.0)  # unit a took twice what the probe said
    assert d.inflation() == 2.0
    assert not d.fits(4.0, ["carrier|b"], rounds=1, rounds_left=1) and d.cut  # 4 + (2 + 2) * 2 > 10
    assert not d.fits(0.0, ["carrier|c"], rounds=1, rounds_left=1)  # once cut, the table is done


def test_a_resumed_budget_goes_on_from_the_ratio_of_everything_timed(tmp_path: Path) -> None:
    """The expected-vs-spent ratio lives in the partial table: restarted with each run, the
    first (cold) group after a resume set it alone (3.4x where the table had run at 1.8x)."""
    from evit.latency.lut import PartialLUT

    state = PartialLUT(tmp_path / "t.partial.json", {"device": "d"})
    Deadline(10.0, {}, 1.0, progress=state.budget_progress).timed(2.0, 3.6)
    state.flush()
    resumed = PartialLUT.open(tmp_path / "t.partial.json", {"device": "d"})
    d = Deadline(10.0, {}, 1.0, progress=resumed.budget_progress)
    assert d.inflation() == pytest.approx(1.8)
    d.timed(0.1, 0.34)  # one cold group after the resume moves it a little, not to 3.4x
    assert d.inflation() == pytest.approx(3.94 / 2.1)


def test_whole_subnets_are_split_into_files_by_their_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A converted file holds about BATCH blocks: single blocks split as they always were
    (their cached files keep their names), whole subnets by the blocks they hold, so eight
    paper-space subnets are not lowered as one program four times a block file's size."""
    from evit.latency.devices.converting import BATCH
    from evit.latency.measure import subnet_item

    monkeypatch.setenv("EVIT_MODEL_CACHE", str(tmp_path))
    dev = get_device(DeviceParams(name="e", kind="executorch", threads=1))
    blocks = [Item(_identity, (1, 8, 8, 8), key=f"b{i}") for i in range(100)]
    assert [len(f.names) for f in dev._plan_files(blocks)] == [33, 33, 34]  # keys[i*n//3:(i+1)*n//3]
    arch = all_archs(TINY)[-1]
    assert subnet_item(arch, TINY, 1).blocks == len(arch_blocks(arch, TINY))
    subnets = [Item(_identity, (1, 8, 8, 8), key=f"e2e|{i}", blocks=25) for i in range(8)]  # paper-space sized
    files = dev._plan_files(subnets)
    assert sorted(k for f in files for k in f.names) == sorted(dev._content_key(it) for it in subnets)
    assert [len(f.names) for f in files] == [2, 2, 1, 2, 1]  # 200 blocks in ceil(200/48) = 5 files
    assert all(25 * len(f.names) <= BATCH + 25 for f in files)


def _identity() -> Any:
    import torch

    return torch.nn.Identity()
