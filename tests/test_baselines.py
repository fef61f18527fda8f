"""`evit baselines`: standalone timm models, same recipe, timed on every device; the comparison table."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from evit.baselines.compare import comparison_markdown, comparison_rows
from evit.config import ConfigError, load_params
from evit.io import read_json
from train_helpers import prepare_small_digits, tiny_overrides

DEVICE = {"name": "cpu-1t", "kind": "torch-cpu", "threads": 1, "warmup": 1, "repeats": 3, "rounds": 1,
          "estimator": "p10", "validate_subnets": 10, "budgets_ms": [3.0]}


def _budget(label: str, kind: str, value: float, top1: float, ms: float) -> dict:
    return {"label": label, "budget": {"kind": kind, "value": value}, "feasible": True, "val_top1": top1,
            "measured_latency_ms": ms, "flops_m": 5.0}


def test_comparison_takes_the_best_baseline_that_fits_each_budget() -> None:
    doc = {"models": [
        {"model": "small", "macs_m": 2.0, "val_top1": 0.60, "latency_ms": {"d": 1.0}},
        {"model": "mid", "macs_m": 8.0, "val_top1": 0.70, "latency_ms": {"d": 2.5}},
        {"model": "big", "macs_m": 20.0, "val_top1": 0.80, "latency_ms": {"d": 6.0}},
    ]}
    budgets = [_budget("3ms", "latency", 3.0, 0.75, 2.9), _budget("0_5ms", "latency", 0.5, 0.5, 0.45),
               _budget("10mflops", "flops", 10.0, 0.65, 2.0),
               {"label": "0_1ms", "budget": {"kind": "latency", "value": 0.1}, "feasible": False}]
    rows = {r["budget"]: r for r in comparison_rows("d", budgets, doc)}
    assert set(rows) == {"3ms", "0_5ms", "10mflops"}  # infeasible budgets have no subnet to compare
    assert rows["3ms"]["baseline"] == "mid" and rows["3ms"]["delta_top1"] == pytest.approx(0.05)
    assert rows["0_5ms"]["baseline"] is None and rows["0_5ms"]["delta_top1"] is None
    assert rows["10mflops"]["baseline"] == "mid" and rows["10mflops"]["delta_top1"] == pytest.approx(-0.05)
    md = comparison_markdown("d", list(rows.values()))
    assert "| 3ms | 75.0 | 2.900 | mid | 70.0 | 2.500 | +5.0 |" in md and "none fits" in md
    over = comparison_rows("d", [_budget("2ms", "latency", 2.0, 0.7, 2.2)], doc)
    assert not over[0]["searched_within_budget"] and "2.200 (over budget)" in comparison_markdown("d", over)


def test_unknown_model_is_one_clear_error_before_any_work(tiny_params, tmp_path: Path) -> None:
    from evit.baselines.stage import run_baselines

    params = load_params(tiny_params({"data": {"out_dir": str(tmp_path / "absent")},
                                      "baselines": {"models": ["mobilenetv3_small_050", "no_such_net"]}}))
    with pytest.raises(ConfigError, match=r"baselines.models: unknown timm model\(s\) \['no_such_net'\]"):
        run_baselines(params, track=False)


@pytest.mark.slow
def test_baselines_stage_on_tiny_data(tiny_params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real timm model, real training, real device timing, real MLflow store; reruns reuse the model."""
    from mlflow import MlflowClient

    from evit.baselines.stage import run_baselines
    from evit.search.pareto import plot_search

    data = prepare_small_digits(tmp_path / "prepared")
    overrides = tiny_overrides(data, epochs=1)
    overrides.update(devices=[DEVICE], baselines={"models": ["mobilenetv3_small_050"]},
                     tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    params = load_params(tiny_params(overrides))
    out = run_baselines(params)
    doc = read_json("results/baselines.json")
    (row,) = doc["models"]
    assert row["model"] == "mobilenetv3_small_050" and row["steps"] == 3 and not row["reused"]
    assert 0.0 <= row["val_top1"] <= 1.0 and row["latency_ms"]["cpu-1t"] > 0
    assert 1.0 < row["macs_m"] < 3.0 and doc["resolution"] == 48 and doc["epochs"] == 1
    assert doc["devices"]["cpu-1t"]["estimator"] == "p10_ms"
    assert out["val_top1"] == {"mobilenetv3_small_050": round(row["val_top1"], 4)}
    assert Path("baselines/mobilenetv3_small_050.pt").is_file()
    assert not Path("baselines/mobilenetv3_small_050.last.pt").exists()
    metrics = read_json("metrics/baselines.json")
    assert metrics["models"]["mobilenetv3_small_050"]["val_top1"] == pytest.approx(row["val_top1"], abs=1e-6)
    with open("plots/baselines-cpu-1t.csv") as fh:
        (line,) = list(csv.DictReader(fh))
    assert line["model"] == "mobilenetv3_small_050" and float(line["latency_ms"]) > 0
    client = MlflowClient(params.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("evit").experiment_id])
    assert run.data.tags["evit.stage"] == "baselines"
    assert run.data.metrics["mobilenetv3_small_050.val_top1"] == pytest.approx(row["val_top1"], abs=1e-6)

    again = run_baselines(params, track=False)  # same settings: the trained model is reused, not retrained
    assert read_json("results/baselines.json")["models"][0]["reused"] and again["val_top1"] == out["val_top1"]

    # the second series of the search plot
    plot_search(Path("plots/search-test.png"), [{"latency_ms": 1.0, "top1": 0.5}], [{"latency_ms": 1.0, "top1": 0.5}],
                [], title="t", baselines=[{"label": "m", "latency_ms": 2.0, "top1": 0.6}])
    assert Path("plots/search-test.png").stat().st_size > 1000
