"""The `search@<device>` stage: trained supernet + device LUT -> best subnet per budget.

For each budget of the device (its `budgets_ms`, then `search.flops_budgets_m`):
evolutionary search (evit.search.evolution) with the budget as constraint (LUT-predicted
latency, or analytic FLOPs) and top-1 on the `search` split after BN recalibration as
fitness, seeded from the memory bank of the matching FLOPs level (evit.search.seeding).
Fitness is cached per arch across budgets and runs (evit.search.fitness).

Then each chosen subnet gets its final numbers: top-1 on `val` (never seen by the search)
and latency measured on the device itself, next to the predicted one.

Outputs (paths from evit.paths): `<search_dir>/result.json` (chosen subnet per budget),
`population.json` (every evaluated subnet), `pareto.json`, `fitness-cache.json`;
`plots/search-<device>.png` and `.csv`; `metrics/search-<device>.json`.

A budget below the fastest subnet of the space is reported as infeasible in result.json
(with the smallest predicted latency, so the user knows what to ask for) and skipped by
export; only when every budget is infeasible does the stage fail.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evit import cancel, flops, paths
from evit.arch import Arch
from evit.config import DeviceParams, Params
from evit.errors import CheckpointError, DataError, LUTError, UserError
from evit.evaluate import calibrated_static, split_top1
from evit.io import read_json, sha256_file, write_json_atomic
from evit.search.budgets import Budget, device_budgets
from evit.search.evolution import EvolutionResult, EvolutionSettings, GenerationStats, evolve
from evit.search.fitness import FitnessCache
from evit.search.pareto import pareto_front, plot_search, write_front_csv
from evit.search.seeding import match_level, proposal
from evit.space import SearchSpace
from evit.tracking import log_stage, numeric_metrics

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
POPULATION_FILE = "population.json"
PARETO_FILE = "pareto.json"
CACHE_FILE = "fitness-cache.json"


class SearchError(UserError):
    """A search cannot run as configured (no budgets, every budget infeasible, ...)."""


# --- what a search needs, loaded once per device ---------------------------------------------

@dataclass
class SearchInputs:
    """Everything the per-budget searches share. Built by `load_inputs` or directly in tests."""

    space: SearchSpace
    supernet: Any
    predictor: Any
    """Has `predict_many(archs) -> sequence of ms` (the device's LUT predictor)."""
    data: Any
    banks: dict[int, list[tuple[Arch, float]]]
    device: DeviceParams
    fitness_context: dict[str, Any]
    sources: dict[str, Any] = field(default_factory=dict)
    """Provenance recorded in result.json: checkpoint path + sha256, data version, LUT."""


def load_inputs(params: Params, device: str) -> SearchInputs:
    import torch

    from evit.data.loader import PreparedData
    from evit.latency.predictor import LatencyPredictor
    from evit.resolve import space_for
    from evit.train.checkpoint import load_supernet

    dev = params.device(device)
    ckpt = paths.checkpoint_path(params)
    if not ckpt.is_file():
        raise CheckpointError(f"supernet checkpoint {str(ckpt)!r} not found; run `evit train` first")
    lut = paths.lut_path(params, device)
    if not lut.is_file():
        raise LUTError(f"latency table {str(lut)!r} for device {device!r} not found; run `evit lut -d {device}` first")
    manifest = paths.manifest_path(params)
    if not manifest.is_file():
        raise DataError(f"prepared data manifest {str(manifest)!r} not found; run `evit prepare` first")
    data_version = str(read_json(manifest).get("content_hash", "unknown"))

    compute = "cuda" if torch.cuda.is_available() and params.train.device in ("auto", "cuda") else "cpu"
    supernet, _meta = load_supernet(ckpt, space=space_for(params), map_location=compute)
    space: SearchSpace = supernet.space
    predictor = LatencyPredictor.load(lut, space)
    data = PreparedData(paths.prepared_dir(params))
    banks = _load_banks(ckpt)
    ckpt_sha = sha256_file(ckpt)
    sp = params.search
    context = {"supernet_sha256": ckpt_sha, "data_version": data_version, "split": "search",
               "bn_calib_batches": sp.bn_calib_batches, "eval_batch_size": sp.eval_batch_size,
               "seed": sp.seed, "compute": compute}
    sources = {"checkpoint": str(ckpt), "checkpoint_sha256": ckpt_sha, "data_version": data_version,
               "lut": str(lut), "lut_sha256": sha256_file(lut)}
    return SearchInputs(space=space, supernet=supernet, predictor=predictor, data=data, banks=banks,
                        device=dev, fitness_context=context, sources=sources)


def _load_banks(ckpt: Path) -> dict[int, list[tuple[Arch, float]]]:
    from evit.train.banks import load_banks

    try:
        banks = load_banks(ckpt)
    except (KeyError, ValueError, CheckpointError) as exc:  # a uniform-sampler run keeps no banks
        log.info("no memory banks in %s (%s); seeding searches with random subnets only", ckpt, exc)
        return {}
    return {int(k): [(a, float(s)) for a, s in v] for k, v in (banks or {}).items()}


# --- one device ------------------------------------------------------------------------------

class _Costs:
    """Memoised predicted latency / FLOPs / params per arch (each computed once, vectorised)."""

    def __init__(self, space: SearchSpace, predictor: Any) -> None:
        self.space = space
        self.predictor = predictor
        self.latency: dict[Arch, float] = {}
        self._count: dict[Arch, flops.Cost] = {}

    def latency_many(self, archs: Sequence[Arch]) -> list[float]:
        missing = [a for a in dict.fromkeys(archs) if a not in self.latency]
        if missing:
            for a, ms in zip(missing, self.predictor.predict_many(missing)):
                self.latency[a] = float(ms)
        return [self.latency[a] for a in archs]

    def cost(self, arch: Arch) -> flops.Cost:
        c = self._count.get(arch)
        if c is None:
            c = self._count[arch] = flops.count(arch, self.space)
        return c

    def flops_many(self, archs: Sequence[Arch]) -> list[float]:
        return [self.cost(a).flops_m for a in archs]

    def metric(self, budget: Budget):  # noqa: ANN201 - a Callable
        return self.latency_many if budget.kind == "latency" else self.flops_many


def _fitness_fn(inputs: SearchInputs, params: Params):  # noqa: ANN202
    from evit.evaluate import evaluate_subnet

    sp = params.search

    def fitness(arch: Arch) -> float:
        return float(evaluate_subnet(inputs.supernet, arch, inputs.data, "search", sp.bn_calib_batches,
                                     sp.eval_batch_size, sp.seed))

    return fitness


def _level_sampler(space: SearchSpace) -> object | None:
    if not space.levels:
        return None
    from evit.level_sampler import LevelSampler  # type: ignore[import-not-found]

    return LevelSampler(space)


def search_budget(
    inputs: SearchInputs,
    budget: Budget,
    settings: EvolutionSettings,
    cache: FitnessCache,
    costs: _Costs,
    fitness: Any,
    seed: int,
) -> tuple[EvolutionResult | None, dict[str, Any]]:
    """Search one budget; returns (result or None when infeasible, summary for result.json)."""
    space = inputs.space
    rng = random.Random(f"evit-search:{seed}:{inputs.device.name}:{budget.label}")
    metric = costs.metric(budget)
    smallest = space.smallest()
    floor = metric([smallest])[0]
    summary: dict[str, Any] = {"budget": budget.to_dict(), "label": budget.label}
    if floor > budget.value:
        log.warning("budget %s is infeasible on %s: the smallest subnet needs %.4g %s", budget.text,
                    inputs.device.name, floor, budget.unit)
        summary.update(feasible=False, reason=f"the smallest subnet of the space needs {floor:.4g} {budget.unit}",
                       min_achievable=floor)
        return None, summary

    sampler = _level_sampler(space)
    seeding = match_level(space, inputs.banks, metric, budget.value, rng, sampler)
    levels = list(range(0, (seeding.level if seeding.level is not None else -1) + 2))
    levels = [lv for lv in levels if lv < len(space.levels)]
    draw = proposal(space, sampler, levels)

    def feasible(archs: Sequence[Arch]) -> list[bool]:
        return [v <= budget.value for v in metric(archs)]

    progress = _progress(f"{inputs.device.name} {budget.text}", settings.generations + 1)

    def on_generation(st: GenerationStats) -> None:
        progress.update(1, best=f"{st.best_fitness:.4f}", evaluated=st.evaluated)
        cancel.check(f"search {inputs.device.name} {budget.text}: evaluated subnets are kept, re-run to resume")
        log.info("search %s %s: generation %d/%d, %d evaluated, best %.4f, top-k mean %.4f",
                 inputs.device.name, budget.text, st.generation, settings.generations, st.evaluated,
                 st.best_fitness, st.mean_top_k)

    try:
        result = evolve(space, settings, feasible=feasible, fitness=lambda a: _checked(cache.evaluate, a, fitness),
                        cost=lambda a: metric([a])[0], random_arch=draw, rng=rng, seeds=seeding.seeds,
                        on_generation=on_generation)
    except ValueError as exc:
        summary.update(feasible=False, reason=str(exc), min_achievable=floor)
        return None, summary
    finally:
        progress.close()
        cache.flush()
    summary.update(feasible=True, level=seeding.level, seeded=result.seeded,
                   evaluated=len(result.scores), history=[h.to_dict() for h in result.history])
    return result, summary


def _checked(evaluate: Any, arch: Arch, fitness: Any) -> Any:
    """Stop between subnet evaluations on SIGTERM/SIGINT (the fitness cache keeps what was done)."""
    cancel.check("during search: evaluated subnets are kept in the fitness cache, re-run to resume")
    return evaluate(arch, fitness)


def _progress(desc: str, total: int):  # noqa: ANN202
    from evit.progress import Progress

    # the per-generation log line below already says it all when not on a terminal
    return Progress(total, f"search {desc}", unit="gen", logger=log, min_interval_s=float("inf"))


def final_evaluation(inputs: SearchInputs, params: Params,
                     archs: Sequence[Arch]) -> tuple[dict[Arch, dict[str, Any]], dict[str, Any]]:
    """val top-1 and measured latency of each distinct chosen subnet (each measured once).

    Both use the BN-calibrated static subnet that export will ship (evit.search.fitness).
    """
    from evit.latency.devices import get_device
    from evit.latency.measurement import statistic

    sp = params.search
    runner = get_device(inputs.device, opset=params.export.onnx_opset)
    runner.check_available()
    stat = statistic(inputs.device)  # the same estimator as the LUT the prediction comes from
    out: dict[Arch, dict[str, Any]] = {}
    for arch in dict.fromkeys(archs):
        static = calibrated_static(inputs.supernet, arch, inputs.data, bn_batches=sp.bn_calib_batches,
                                   batch_size=sp.eval_batch_size, seed=sp.seed)
        val = split_top1(static, inputs.data, "val", arch.resolution, sp.eval_batch_size)
        static = static.to("cpu").eval()
        shape = (inputs.device.batch_size, 3, arch.resolution, arch.resolution)
        m = runner.measure(static, shape)
        ms = float(getattr(m, stat))
        out[arch] = {"val_top1": val, "measured_latency_ms": ms, "measurement": m.to_dict()}
        log.info("final %s: val top-1 %.4f, measured %.4f ms (%s)", arch.key, val, ms, stat)
    return out, runner.describe()


def fixed_arch_summaries(inputs: SearchInputs, specs: Sequence[str], costs: _Costs, cache: FitnessCache,
                         fitness: Any) -> tuple[list[dict[str, Any]], dict[str, tuple[Arch, float]]]:
    """Result entries for fixed architectures (released names or arch JSON files), not searched.

    Each is scored like a search candidate (top-1 on `search`, cached) so that its entry has
    exactly the fields of a searched budget's and export/registry treat it the same way.
    """
    from evit.released import resolve_arch

    summaries: list[dict[str, Any]] = []
    chosen: dict[str, tuple[Arch, float]] = {}
    for spec in specs:
        name, arch = resolve_arch(spec)
        arch = inputs.space.validate(arch)
        budget = Budget("arch", costs.cost(arch).flops_m, name)
        top1 = cache.evaluate(arch, fitness)
        cache.flush()
        log.info("fixed arch %s (%s): search top-1 %.4f", name, arch.key, top1)
        summaries.append({"budget": budget.to_dict(), "label": budget.label, "feasible": True, "fixed": True})
        chosen[budget.label] = (arch, top1)
    return summaries, chosen


def run_device_search(params: Params, inputs: SearchInputs, out_dir: Path,
                      fixed_archs: Sequence[str] | None = None, *, search: bool = True) -> dict[str, Any]:
    """Search every budget of `inputs.device`, add the fixed archs, evaluate the winners, write all outputs.

    `fixed_archs` defaults to `search.fixed_archs`; `search=False` skips the budgets (only the
    fixed archs: what `evit export --arch` uses).
    """
    dev = inputs.device
    fixed = list(params.search.fixed_archs if fixed_archs is None else fixed_archs)
    budgets = device_budgets(dev.budgets_ms, params.search.flops_budgets_m) if search else []
    if not budgets and not fixed:
        raise SearchError(
            f"device {dev.name!r} has no budgets: set devices[name={dev.name}].budgets_ms and/or "
            "search.flops_budgets_m (or search.fixed_archs) in params.yaml (e.g. budgets_ms: [1.5, 3.0])"
        )
    t0 = time.perf_counter()
    settings = EvolutionSettings.from_params(params.search)
    # `evit export --arch` must not touch the search stage's outputs (DVC tracks them)
    cache_dir = out_dir if search else Path(tempfile.mkdtemp(prefix="evit-fixed-"))
    cache = FitnessCache(cache_dir / CACHE_FILE, inputs.fitness_context)
    costs = _Costs(inputs.space, inputs.predictor)
    fitness = _fitness_fn(inputs, params)

    results: dict[str, EvolutionResult] = {}
    summaries: list[dict[str, Any]] = []
    for budget in budgets:
        result, summary = search_budget(inputs, budget, settings, cache, costs, fitness, params.search.seed)
        summaries.append(summary)
        if result is not None:
            results[budget.label] = result
    chosen = {label: (r.best, r.best_fitness) for label, r in results.items()}
    fixed_summaries, fixed_chosen = fixed_arch_summaries(inputs, fixed, costs, cache, fitness)
    clash = sorted(set(fixed_chosen) & {s["label"] for s in summaries})
    if clash:
        raise SearchError(f"search.fixed_archs: label(s) {clash} collide with budget labels; rename the arch files")
    summaries += fixed_summaries
    chosen.update(fixed_chosen)
    if not chosen:
        reasons = "; ".join(f"{s['label']}: {s['reason']}" for s in summaries)
        raise SearchError(f"every budget of device {dev.name!r} is infeasible ({reasons}); raise the budgets")

    final, device_description = final_evaluation(inputs, params, [a for a, _ in chosen.values()])
    for s in summaries:
        hit = chosen.get(s["label"])
        if hit is None:
            continue
        arch, top1 = hit
        c = costs.cost(arch)
        s.update(arch=arch.to_dict(), key=arch.key, search_top1=top1,
                 predicted_latency_ms=costs.latency_many([arch])[0], flops_m=c.flops_m, params_m=c.params_m,
                 **final[arch])

    population = _population(results, costs)
    front = pareto_front(population, x="latency_ms", y="top1")
    plotted = [{"label": s["label"], "latency_ms": s["predicted_latency_ms"], "top1": s["search_top1"]}
               for s in summaries if s.get("feasible")]
    from evit.baselines.compare import comparison_rows
    from evit.baselines.stage import load_baselines

    baselines = load_baselines(params)
    seconds = time.perf_counter() - t0
    result_doc = {
        "device": dev.name,
        "device_params": dev.model_dump(mode="json"),
        "device_description": device_description,
        "space": inputs.space.to_dict(),
        "sources": inputs.sources,
        "settings": dataclasses.asdict(settings),
        "seed": params.search.seed,
        "budgets": summaries,
        "cache": cache.stats(),
        "seconds": round(seconds, 2),
    }
    if baselines is not None:  # searched subnet per budget vs the best standalone model under it
        result_doc["baselines"] = comparison_rows(dev.name, summaries, baselines)
    if not search:  # evit export --arch: the entries only, the search's own files stay as they are
        return result_doc
    write_json_atomic(out_dir / POPULATION_FILE, {"device": dev.name, "subnets": population})
    write_json_atomic(out_dir / PARETO_FILE, {"device": dev.name, "x": "latency_ms", "y": "top1", "front": front})
    write_json_atomic(out_dir / RESULT_FILE, result_doc)
    _write_plots(params, dev.name, population, front, plotted, [b.value for b in budgets if b.kind == "latency"],
                 baselines)
    metrics = _metrics(summaries, cache, seconds)
    write_json_atomic(paths.search_metrics_path(dev.name), headline_metrics(metrics))
    return {"device": dev.name, "result": str(out_dir / RESULT_FILE), "metrics": metrics}


def _population(results: dict[str, EvolutionResult], costs: _Costs) -> list[dict[str, Any]]:
    rows: dict[Arch, dict[str, Any]] = {}
    for label, r in results.items():
        for arch, fit in r.scores.items():
            row = rows.get(arch)
            if row is None:
                c = costs.cost(arch)
                row = rows[arch] = {"key": arch.key, "arch": arch.to_dict(), "top1": fit,
                                    "latency_ms": costs.latency_many([arch])[0], "flops_m": c.flops_m,
                                    "params_m": c.params_m, "budgets": []}
            row["budgets"].append(label)
    return sorted(rows.values(), key=lambda r: (r["latency_ms"], -r["top1"], r["key"]))


def _write_plots(params: Params, device: str, population: list[dict[str, Any]], front: list[dict[str, Any]],
                 chosen: list[dict[str, Any]], latency_budgets: list[float],
                 baselines: dict[str, Any] | None = None) -> None:
    plots = paths.plots_dir()
    write_front_csv(plots / f"search-{device}.csv", front, ["latency_ms", "top1", "flops_m", "params_m", "key"])
    others = [{"label": m["model"], "latency_ms": m["latency_ms"][device], "top1": m["search_top1"]}
              for m in (baselines or {}).get("models", []) if device in m["latency_ms"]]
    plot_search(plots / f"search-{device}.png", population, front, chosen,
                title=f"search on {device}: top-1 vs predicted latency", latency_budgets=latency_budgets,
                baselines=others)


def _metrics(summaries: list[dict[str, Any]], cache: FitnessCache, seconds: float) -> dict[str, Any]:
    per_budget = {}
    for s in summaries:
        if not s.get("feasible"):
            per_budget[s["label"]] = {"feasible": False}
            continue
        per_budget[s["label"]] = {
            "feasible": True,
            "search_top1": round(s["search_top1"], 6),
            "val_top1": round(s["val_top1"], 6),
            "predicted_latency_ms": round(s["predicted_latency_ms"], 6),
            "measured_latency_ms": round(s["measured_latency_ms"], 6),
            "flops_m": round(s["flops_m"], 6),
            "params_m": round(s["params_m"], 6),
        }
    return {"budgets": per_budget, "evaluated": cache.misses, "cache_hits": cache.hits,
            "cached_total": len(cache), "seconds": round(seconds, 2)}


HEADLINE_KEYS = ("val_top1", "predicted_latency_ms", "measured_latency_ms")


def headline_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics/search-<device>.json: per feasible budget its val top-1 and latencies, and the
    evaluation count (`dvc metrics show` makes a column of every key; the rest is in
    result.json and the MLflow run)."""
    budgets = {label: {k: m[k] for k in HEADLINE_KEYS} for label, m in metrics["budgets"].items() if m["feasible"]}
    return {"budgets": budgets, "infeasible": len(metrics["budgets"]) - len(budgets),
            "evaluated": metrics["evaluated"], "seconds": metrics["seconds"]}


def _track(params: Params, device: str, metrics: dict[str, Any], files: list[Path]) -> None:
    """Log the stage to MLflow; a tracking failure must not throw away a finished search."""
    numbers = numeric_metrics({k: metrics[k] for k in ("evaluated", "cache_hits", "seconds")})
    log_stage(params, f"search@{device}", tags={"evit.device": device}, log_sections=("search",),
              metrics={**numbers, **numeric_metrics(metrics["budgets"])}, artifacts=files, artifact_path="search")


def search_device(params: Params, device: str, *, track: bool = True) -> dict[str, Any]:
    """Stage entry point (evit.stages.search): load the device's inputs, search, write outputs."""
    inputs = load_inputs(params, device)
    out_dir = paths.search_dir(params, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = run_device_search(params, inputs, out_dir)
    if track:
        plots = paths.plots_dir()
        _track(params, device, summary["metrics"],
               [out_dir / RESULT_FILE, out_dir / PARETO_FILE, plots / f"search-{device}.png",
                plots / f"search-{device}.csv"])
    return summary
