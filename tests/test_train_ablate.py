"""`evit ablate` on a tiny budget: same subnets per level for every sampler, conflict numbers, outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evit.config import load_params
from evit.io import read_json
from train_helpers import prepare_small_digits, tiny_overrides

pytestmark = pytest.mark.slow


def test_run_ablation_tiny(tiny_params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evit.train.ablate import run_ablation
    from evit.train.conflict import masked_cosine

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = prepare_small_digits(tmp_path / "prepared")
    overrides = tiny_overrides(data, steps_per_epoch=2)
    overrides["ablate"] = {"samplers": ["uniform", "complexity", "elastic"], "seeds": [0], "epochs": 1,
                           "subnets_per_level": 1, "conflict_steps": 2}
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
