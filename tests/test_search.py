"""Evolutionary search: the algorithm on synthetic fitness, caching, seeding, Pareto front,
and the whole per-device search on a tiny real supernet, real data and a real latency table."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from search_export_helpers import TINY, tiny_predictor, tiny_space

from evit import flops
from evit.arch import Arch
from evit.config import parse_params
from evit.io import read_json
from evit.search.budgets import Budget, device_budgets
from evit.search.evolution import EvolutionSettings, evolve
from evit.search.fitness import FitnessCache
from evit.search.pareto import pareto_front
from evit.search.seeding import match_level

SMALL = EvolutionSettings(population=12, generations=4, top_k=6, mutations=4, crossovers=4)


def synthetic_fitness(arch: Arch) -> float:
    """Bigger is better, with a deterministic per-arch wobble so the ranking is not trivial."""
    wobble = (sum(i * ord(c) for i, c in enumerate(arch.key)) % 97) / 97.0
    return flops.flops_m(arch, TINY) + 0.05 * wobble


def run(budget: float, seed: int, calls: list[Arch] | None = None, seeds: list[Arch] = ()):  # noqa: ANN201
    def fitness(a: Arch) -> float:
        if calls is not None:
            calls.append(a)
        return synthetic_fitness(a)

    return evolve(
        TINY, SMALL,
        feasible=lambda archs: [flops.flops_m(a, TINY) <= budget for a in archs],
        fitness=fitness, cost=lambda a: flops.flops_m(a, TINY),
        random_arch=TINY.sample_uniform, rng=random.Random(seed), seeds=seeds,
    )


def test_evolve_respects_the_constraint_improves_and_never_reevaluates() -> None:
    calls: list[Arch] = []
    res = run(0.25, seed=0, calls=calls)
    assert flops.flops_m(res.best, TINY) <= 0.25
    assert all(flops.flops_m(a, TINY) <= 0.25 for a in res.scores)
    assert len(calls) == len(set(calls)) == len(res.scores)  # each arch evaluated once
    best = [h.best_fitness for h in res.history]
    assert best == sorted(best) and len(res.history) == SMALL.generations + 1
    assert res.history[0].evaluated == SMALL.population
    assert all(b.evaluated - a.evaluated <= SMALL.mutations + SMALL.crossovers
               for a, b in zip(res.history, res.history[1:]))
    assert res.best_fitness == max(res.scores.values())
    # the search beats the random initial population
    initial_best = max(synthetic_fitness(a) for a in calls[: SMALL.population])
    assert res.best_fitness >= initial_best


def test_evolve_is_reproducible_and_seeded() -> None:
    a, b = run(0.3, seed=3), run(0.3, seed=3)
    assert a.best == b.best and list(a.scores) == list(b.scores)
    assert list(run(0.3, seed=4).scores) != list(a.scores)


def test_evolve_uses_feasible_seeds_first() -> None:
    rng = random.Random(0)
    pool = [TINY.sample_uniform(rng) for _ in range(40)]
    fits = [a for a in pool if flops.flops_m(a, TINY) <= 0.2][:3]
    too_big = TINY.largest()
    res = run(0.2, seed=0, seeds=[too_big, *fits, fits[0]])
    assert res.seeded == len(fits)
    assert too_big not in res.scores and all(a in res.scores for a in fits)


def test_evolve_without_any_feasible_subnet_raises() -> None:
    with pytest.raises(ValueError, match="no feasible subnet"):
        run(0.001, seed=0)


def test_fitness_cache_persists_and_is_tied_to_its_context(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    ctx = {"supernet_sha256": "a", "data_version": "d"}
    calls: list[str] = []

    def fn(a: Arch) -> float:
        calls.append(a.key)
        return 0.5

    archs = [TINY.smallest(), TINY.largest()]
    c = FitnessCache(path, ctx, flush_every=1)
    for a in archs + archs:
        c.evaluate(a, fn)
    assert len(calls) == 2 and c.stats()["hits"] == 2
    again = FitnessCache(path, ctx)
    assert again.evaluate(archs[0], fn) == 0.5 and len(calls) == 2
    other = FitnessCache(path, {**ctx, "supernet_sha256": "b"})
    assert len(other) == 0
    other.evaluate(archs[0], fn)
    assert len(calls) == 3


def test_pareto_front() -> None:
    pts = [{"latency_ms": 1.0, "top1": 0.5, "key": "a"}, {"latency_ms": 2.0, "top1": 0.4, "key": "b"},
           {"latency_ms": 2.0, "top1": 0.7, "key": "c"}, {"latency_ms": 3.0, "top1": 0.7, "key": "d"},
           {"latency_ms": 0.5, "top1": 0.1, "key": "e"}, {"latency_ms": 4.0, "top1": 0.9, "key": "f"}]
    assert [p["key"] for p in pareto_front(pts)] == ["e", "a", "c", "f"]


def test_budgets_and_labels() -> None:
    b = device_budgets([1.5, 3.0, 1.50], [12.0])
    assert [x.label for x in b] == ["1_5ms", "3ms", "12mflops"]
    assert Budget.from_dict(b[0].to_dict()) == b[0]
    fixed = Budget("arch", 618.78, "L1.5")
    assert (fixed.label, fixed.text) == ("l1_5", "arch L1.5") and Budget.from_dict(fixed.to_dict()) == fixed


def test_match_level_maps_a_budget_to_the_bank_that_fits() -> None:
    rng = random.Random(0)
    pool = [TINY.sample_uniform(rng) for _ in range(300)]
    banks: dict[int, list[tuple[Arch, float]]] = {}
    for a in pool:
        lv = TINY.level_of(flops.flops_m(a, TINY))
        if lv is not None and len(banks.setdefault(lv, [])) < 5:
            banks[lv].append((a, -rng.random()))
    metric = lambda archs: [flops.flops_m(a, TINY) for a in archs]  # noqa: E731
    s = match_level(TINY, banks, metric, 0.21, rng, sampler=None)
    assert s.level == 1  # level 2 (0.2..0.24) has a median above 0.21
    best_first = [a for a, _ in sorted(banks[1], key=lambda e: -e[1])]
    assert s.seeds[: len(best_first)] == best_first
    assert match_level(TINY, banks, metric, 0.01, rng, sampler=None).level == 0


# --- the stage on real components ------------------------------------------------------------

@pytest.fixture
def tiny_search(prepared_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    from evit.data.loader import PreparedData
    from evit.search.stage import SearchInputs

    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "EVIT_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    data = PreparedData(prepared_digits)
    space = tiny_space(data.num_classes)
    dev = {"name": "cpu-1t", "kind": "torch-cpu", "threads": 1, "warmup": 1, "repeats": 3, "rounds": 1}
    probe = parse_params({"devices": [dev]}).device("cpu-1t")
    predictor = tiny_predictor(space, probe)
    rng = random.Random(0)
    lat = sorted(predictor.predict_many([space.sample_uniform(rng) for _ in range(50)]))
    budget_ms = round(float(lat[len(lat) // 2]), 4)  # half of the space fits
    params = parse_params({
        "data": {"out_dir": str(prepared_digits)},
        "devices": [{**dev, "budgets_ms": [budget_ms]}],
        "search": {"population": 8, "generations": 2, "top_k": 4, "mutations": 4, "crossovers": 4,
                   "bn_calib_batches": 1, "eval_batch_size": 128, "flops_budgets_m": [0.15]},
        "export": {"register_model": False},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })
    supernet = tiny_supernet_for(space)
    inputs = SearchInputs(space=space, supernet=supernet, predictor=predictor, data=data, banks={},
                          device=params.device("cpu-1t"),
                          fitness_context={"supernet": "tiny-seed-0", "data": data.content_hash},
                          sources={"checkpoint_sha256": None, "data_version": data.content_hash})
    return params, inputs, budget_ms


def tiny_supernet_for(space):  # noqa: ANN001, ANN201
    from evit.nn.supernet import Supernet

    torch.manual_seed(0)
    return Supernet(space).eval()


@pytest.mark.slow
def test_device_search_end_to_end_and_resumes_from_cache(tiny_search, tmp_path: Path) -> None:  # noqa: ANN001
    from evit.search.stage import run_device_search

    params, inputs, budget_ms = tiny_search
    out_dir = tmp_path / "results" / "search-cpu-1t"
    summary = run_device_search(params, inputs, out_dir)
    result = read_json(out_dir / "result.json")
    by_label = {b["label"]: b for b in result["budgets"]}
    lat_label = Budget("latency", budget_ms).label
    assert set(by_label) == {lat_label, "0_15mflops"}
    lat, fl = by_label[lat_label], by_label["0_15mflops"]
    assert lat["feasible"] and fl["feasible"]
    assert lat["predicted_latency_ms"] <= budget_ms
    assert fl["flops_m"] <= 0.15
    for b in (lat, fl):
        arch = inputs.space.validate(Arch.from_dict(b["arch"]))
        assert b["key"] == arch.key
        assert 0.0 <= b["search_top1"] <= 1.0 and 0.0 <= b["val_top1"] <= 1.0
        assert b["measured_latency_ms"] > 0 and b["measurement"]["n"] == 3
        assert b["flops_m"] == pytest.approx(flops.flops_m(arch, inputs.space))
        assert b["history"][-1]["best_fitness"] == b["search_top1"]
    assert result["device_description"]["kind"] == "torch-cpu"

    population = read_json(out_dir / "population.json")["subnets"]
    keys = [p["key"] for p in population]
    assert len(keys) == len(set(keys)) == summary["metrics"]["evaluated"]
    assert all(p["latency_ms"] <= budget_ms for p in population if p["budgets"] == [lat_label])
    front = read_json(out_dir / "pareto.json")["front"]
    assert front and all(p["key"] in keys for p in front)
    assert [p["latency_ms"] for p in front] == sorted(p["latency_ms"] for p in front)
    with open("plots/search-cpu-1t.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(front)
    assert Path("plots/search-cpu-1t.png").stat().st_size > 1000
    metrics = read_json("metrics/search-cpu-1t.json")
    assert metrics["budgets"][lat_label]["val_top1"] == pytest.approx(lat["val_top1"], abs=1e-6)

    # the stage's MLflow run (a local sqlite store)
    from mlflow import MlflowClient

    from evit.search.stage import _track

    _track(params, "cpu-1t", summary["metrics"], [out_dir / "result.json", Path("plots/search-cpu-1t.png")])
    client = MlflowClient(params.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("evit").experiment_id])
    assert run.data.metrics[f"{lat_label}.val_top1"] == pytest.approx(lat["val_top1"], abs=1e-6)
    assert run.data.params["search.population"] == "8" and run.data.tags["evit.device"] == "cpu-1t"

    assert "baselines" not in result  # no baselines result yet: no comparison

    # a re-run evaluates nothing again and chooses the same subnets; with the baselines stage's
    # result present it compares each budget's subnet with the best baseline that fits it
    from evit.io import write_json_atomic

    write_json_atomic("results/baselines.json", {"models": [
        {"model": "fast", "macs_m": 0.1, "val_top1": 0.3, "search_top1": 0.3, "latency_ms": {"cpu-1t": budget_ms / 2}},
        {"model": "slow", "macs_m": 9.0, "val_top1": 0.9, "search_top1": 0.9, "latency_ms": {"cpu-1t": budget_ms * 9}}]})
    again = run_device_search(params, inputs, out_dir)
    assert again["metrics"]["evaluated"] == 0 and again["metrics"]["cache_hits"] > 0
    result2 = read_json(out_dir / "result.json")
    assert [b["key"] for b in result2["budgets"]] == [b["key"] for b in result["budgets"]]
    rows = {r["budget"]: r for r in result2["baselines"]}
    assert rows[lat_label]["baseline"] == "fast" and rows["0_15mflops"]["baseline"] == "fast"
    lat2 = next(b for b in result2["budgets"] if b["label"] == lat_label)
    assert rows[lat_label]["delta_top1"] == pytest.approx(lat2["val_top1"] - 0.3)

    # export of what the search chose (no registry): files, hashes, ONNX agrees
    from evit.export.stage import export_result
    from evit.io import sha256_file

    exported = export_result(params, "cpu-1t", result, inputs.supernet, inputs.data,
                             supernet_sha256="tiny", out_root=tmp_path / "exports" / "cpu-1t")
    assert [e["label"] for e in exported] == [lat_label, "0_15mflops"]
    for e in exported:
        folder = Path(e["folder"])
        card = read_json(folder / "card.json")
        assert card["metrics"]["val_top1"] == by_label[e["label"]]["val_top1"]
        assert card["latency"]["measured_ms"] == by_label[e["label"]]["measured_latency_ms"]
        assert card["onnx"]["max_abs_diff_vs_torch"] < 1e-3
        for name, digest in card["files"].items():
            assert sha256_file(folder / name) == digest
        assert "val top-1" in (folder / "card.md").read_text()
