"""The results page: merging per-seed ablation reports, the gain decomposition, the skip without data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from evit.results_page import ablation_markdown, decomposition_markdown, merge_ablation

REPO = Path(__file__).resolve().parents[1]


def _report(seed: int, top1: dict[str, float]) -> dict:
    conflict = {k: {kind: {"mean": 0.1, "std": 0.0, "per_seed": [0.1]} for kind in ("same_step", "adjacent_step")}
                for k in ("as_trained", "shared_weights")}
    return {"split": "val", "epochs": 2, "seeds": [seed], "subnets_per_level": 1, "conflict_steps": 2,
            "archs": {"0": {"min": {"arch": "a", "flops_m": 2.0}}},
            "samplers": {s: {"levels": {"0": {"top1_mean": v, "top1_std": 0.0, "per_seed": [v], "flops_m": 2.0}},
                             "top1_mean": v, "top1_mean_per_seed": [v], "conflict": conflict}
                         for s, v in top1.items()}}


def test_per_seed_reports_merge_and_the_gain_is_split_into_losses_sampling_banks() -> None:
    merged = merge_ablation([_report(0, {"uniform": 0.40, "flat": 0.50, "complexity": 0.55, "elastic": 0.56}),
                             _report(1, {"uniform": 0.44, "flat": 0.52, "complexity": 0.55, "elastic": 0.60})])
    assert merged["seeds"] == [0, 1]
    lv = merged["samplers"]["uniform"]["levels"]["0"]
    assert lv["per_seed"] == [0.40, 0.44] and lv["top1_mean"] == pytest.approx(0.42) and lv["top1_std"] == pytest.approx(0.02)
    table = ablation_markdown(merged)
    assert "| 0 | 2.0 | 42.0 ± 2.0 | 51.0 ± 1.0 | 55.0 ± 0.0 | 58.0 ± 2.0 |" in table
    dec = decomposition_markdown(merged)
    assert "| uniform -> flat | +9.0 ± 1.0 | +10.0, +8.0 |" in dec
    assert "| flat -> complexity | +4.0 ± 1.0 |" in dec and "| uniform -> elastic | +16.0 ± 0.0 |" in dec
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_ablation([_report(0, {"uniform": 0.4}), {**_report(1, {"uniform": 0.4}), "epochs": 3}])


def test_photos_benchmark_is_skipped_with_a_message_without_the_data(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "photos.py"), "--data", str(tmp_path / "absent"),
                          "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("skipped: ") and "absent" in out.stdout
    assert not (tmp_path / "w").exists()


def test_photos_profile_is_valid_and_names_real_timm_models() -> None:
    from evit.baselines.models import check_model_names
    from evit.config import load_params

    p = load_params(REPO / "params.photos.yaml")
    check_model_names(p.baselines.models)
    assert p.train.epochs == p.ablate.epochs and len(p.ablate.seeds) >= 3 and "flat" in p.ablate.samplers


def test_comparison_over_seeds_groups_budgets_and_reports_the_spread() -> None:
    from evit.results_page import baselines_over_seeds_markdown, seed_comparison, seed_comparison_markdown

    def run(searched: float, small: float, big: float) -> tuple[dict, dict]:
        doc = {"devices": ["d"], "models": [
            {"model": "small", "macs_m": 1.0, "params_m": 0.1, "val_top1": small, "latency_ms": {"d": 1.0}},
            {"model": "big", "macs_m": 9.0, "params_m": 1.0, "val_top1": big, "latency_ms": {"d": 9.0}}]}
        res = {"budgets": [{"label": "2ms", "feasible": True, "budget": {"kind": "latency", "value": 2.0},
                            "val_top1": searched, "measured_latency_ms": 1.5, "flops_m": 3.0},
                           {"label": "0_5ms", "feasible": True, "budget": {"kind": "latency", "value": 0.5},
                            "val_top1": searched - 0.1, "measured_latency_ms": 0.6, "flops_m": 1.0}]}
        return doc, {"d": res}

    rows = seed_comparison({0: run(0.60, 0.40, 0.70), 1: run(0.64, 0.44, 0.72)})
    by = {r["budget"]: r for r in rows}
    assert by["2ms"]["seeds"] == [0, 1] and by["2ms"]["baselines_named"] == ["small", "small"]
    assert by["2ms"]["deltas"] == pytest.approx([0.20, 0.20])
    assert by["0_5ms"]["baseline"] == [] and by["0_5ms"]["over_budget"] == 2  # nothing fits; measured over
    table = seed_comparison_markdown(rows)
    assert "| d | 2ms | 0, 1 | 62.0 ± 2.0 | small, small | 42.0 ± 2.0 | +20.0 ± 0.0 | +20.0, +20.0 | 0 |" in table
    assert "| small | 42.0 ± 2.0 | 40.0, 44.0 |" in baselines_over_seeds_markdown({0: run(0.6, 0.40, 0.7)[0],
                                                                                 1: run(0.6, 0.44, 0.7)[0]})


def test_regenerating_the_page_keeps_sections_other_benchmarks_spliced_in() -> None:
    from evit.results_page import spliced_blocks

    block = "<!-- finetune:start -->\n## Fine-tuning\n\n| a |\n<!-- finetune:end -->"
    page = f"# Results\n\nold generated text\n\n{block}\n\n<!-- other:start -->\nunclosed\n"
    assert spliced_blocks(page) == [block]
