"""`evit ablate` on a tiny budget: same subnets per level for every sampler, conflict numbers, outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import prepare_small_digits, tiny_overrides

from evit.config import load_params
from evit.io import read_json

pytestmark = pytest.mark.slow


def test_run_ablation_tiny(tiny_params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evit.train.ablate import run_ablation
    from evit.train.conflict import masked_cosine

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = prepare_small_digits(tmp_path / "prepared")
    overrides = tiny_overrides(data, steps_per_epoch=2)
    overrides["ablate"] = {"samplers": ["uniform", "complexity", "elastic"], "seeds": [0], "epochs": 1,
                           "subnets_per_level": 1, "conflict_steps": 2, "pick_candidates": 3, "bank_top": 2}
    params = load_params(tiny_params(overrides))
    out = run_ablation(params)
    report = read_json(tmp_path / "results/ablation.json")
    assert (tmp_path / "results/ablation.png").stat().st_size > 1000
    assert set(report["samplers"]) == {"uniform", "complexity", "elastic"}
    assert set(report["archs"]) == {"0", "1"} and set(report["archs"]["0"]) == {"min", "draw0"}
    for s, res in report["samplers"].items():
        assert set(res["levels"]) == {"0", "1"}
        for lv in res["levels"].values():
            assert len(lv["per_seed"]) == 1 and 0.0 <= lv["top1_mean"] <= 1.0 and lv["top1_std"] == 0.0
            assert set(lv["per_subnet"]) == {"min", "draw0"}
        for key in ("as_trained", "shared_weights"):
            for kind in ("same_step", "adjacent_step"):
                v = res["conflict"][key][kind]["mean"]
                assert v is not None and -1.0 <= v <= 1.0
    assert out["top1"].keys() == report["samplers"].keys()
    # what search would pick: the same candidates for every sampler, the best on `search`, reported on `val`
    from evit.resolve import space_from_params
    from evit.train.ablate import pick_candidates

    cands = pick_candidates(space_from_params(params.space, 10), 3)
    for s, res in report["samplers"].items():
        picked = res["picked"]
        assert len(picked["mean_per_seed"]) == 1 and set(picked["levels"]) == {"0", "1"}
        for lv, info in picked["levels"].items():
            assert info["arch"][0] in {a.key for a in cands[int(lv)]}
            assert 0.0 <= info["val_top1"][0] <= 1.0 and 0.0 <= info["search_top1"][0] <= 1.0
        # the elastic banks' best entries, evaluated on every supernet
        assert list(res["bank_subnets"]) == ["elastic"] and 0.0 <= res["bank_subnets"]["elastic"][0] <= 1.0
    assert set(report["conflict_vs_accuracy"]) == {f"{k}/{m}{x}" for k in ("as_trained", "shared_weights")
                                                   for m in ("random", "picked") for x in ("", "/no_uniform")}
    assert report["conflict_vs_accuracy"]["as_trained/random"]["n"] == 3
    assert report["conflict_vs_accuracy"]["as_trained/random/no_uniform"]["n"] == 2
    # every run's checkpoints live apart from the main training's
    for s in ("uniform", "complexity", "elastic"):
        assert (tmp_path / f"models/ablate/{s}-seed0/supernet.pt").is_file()
    assert not (tmp_path / "models/supernet.pt").exists() and not (tmp_path / "metrics/train.json").exists()
    # a second run reuses the finished supernets (no retraining) and reproduces the numbers
    again = run_ablation(params)
    assert again["top1"] == out["top1"] and again["conflict"] == out["conflict"]
    # the cosine ignores the weights only one subnet touches
    a = torch.tensor([1.0, 2.0, 0.0, 3.0])
    b = torch.tensor([2.0, 4.0, 5.0, 0.0])
    assert masked_cosine(a, b) == pytest.approx(1.0)
    assert masked_cosine(a, torch.tensor([0.0, 0.0, 1.0, 0.0])) is None
