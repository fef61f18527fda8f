"""The `lut@<device>` stage: build a device's latency table, validate it, report.

    evit lut --device cpu-1t      (dvc.yaml: lut@cpu-1t; Prefect: the lut task)

1. Plan: every unique block the search space can produce (`blocks.unique_blocks`,
   derived from the space's choices), or in `lut_mode: sampled` the blocks of
   `sample_subnets` subnets across the FLOPs levels. A full table larger than
   `max_entries` is refused with the count and the way out (sampled mode).
2. Measure, resumably: on devices that run modules in-process (torch-cpu,
   onnxruntime-cpu, cuda) each block is timed *in context*, inside "carrier" subnets
   (`blocks.covering_archs`: few valid archs that together contain every block), as the
   chain of its block modules with each block timed separately. In isolation a block
   runs with its weights and code hot in the caches and looks up to ~20% faster than it
   is inside a subnet; in context the sum of the blocks matches the subnet. `command`
   devices time each block on its own (an external runner sees one file at a time).
   Every few seconds the measurements are flushed to `luts/<device>.partial.json`.
3. Validate: `validate_subnets` random subnets across the levels, timed end to end as
   static subnets (for ONNX devices: the pipeline's own ONNX export), interleaved;
   compare with the prediction and with FLOPs; fit the optional linear correction.
4. Write `luts/<device>.json` (complete), `metrics/lut-<device>.json`,
   `plots/lut-<device>.png` and `.csv`, and log them to MLflow (`lut@<device>` run).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evit import cancel, paths
from evit.arch import Arch
from evit.config import DeviceParams, Params
from evit.errors import LUTError
from evit.blocks import Block, arch_blocks
from evit.flops import flops_m
from evit.io import write_json_atomic
from evit.latency.blocks import count_by_kind, covering_archs, sample_subnets, sampled_blocks, unique_blocks
from evit.latency.devices import Device, Item, Measurement, get_device, split_repeats, torch_threads
from evit.latency.lut import FORMAT, PartialLUT, partial_path
from evit.latency.predictor import BlockRegression, LatencyPredictor
from evit.latency.report import choose_correction, flops_proxy, plot_points, validation_metrics, write_points_csv
from evit.resolve import space_for
from evit.latency.timing import OUTLIER_TOLERANCE, REMEASURE_PASSES, LoadWatch, keep_lower, outliers
from evit.space import SearchSpace

log = logging.getLogger(__name__)

HEADLINE_METRICS = ("n", "rmse_ms", "mape_pct", "within_10pct", "spearman", "flops_within_10pct", "flops_spearman",
                    "lut_entries", "build_seconds",
                    # how it was measured (issue 13): a figure means little without the load beside it
                    "estimator", "clock", "cpu_count", "load_avg_1m_mean", "load_avg_1m_max",
                    "remeasured_subnets", "lowered_subnets", "lowered_entries")
"""What metrics/lut-<device>.json keeps (`dvc metrics show` stays one readable table); the full
validation report (raw predictions, correction, FLOPs proxy errors) is `validation` in the LUT."""

OVERHEAD_KEY = "overhead|null"
CHAIN_GROUP = 4
"""Carriers timed together, round robin (interleaving)."""
VALIDATE_GROUP = 8
ETA_WARN_S = 3600.0


class NullModule(nn.Module):
    """The cheapest module a runtime must still execute: times the fixed cost of one call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


@dataclass(frozen=True)
class Plan:
    mode: str
    blocks: list[Block]
    """Blocks the table will hold (sampled mode: plus any extra a carrier happens to contain)."""
    carriers: list[Arch]
    """In-context devices: the subnets the blocks are timed inside. Empty for isolated devices."""

    def units(self) -> list[str]:
        if self.carriers:
            return [f"carrier|{a.key}" for a in self.carriers]
        return [f"block|{b.key}" for b in self.blocks]


def block_input_shape(b: Block, batch: int) -> tuple[int, int, int, int]:
    return (batch, b.c_in, b.h, b.h)


def plan_lut(space: SearchSpace, dp: DeviceParams, *, in_context: bool) -> Plan:
    """What to measure for this device; LUTError if a full table would exceed `max_entries`."""
    if dp.lut_mode == "full":
        blocks = unique_blocks(space)
        if len(blocks) > dp.max_entries:
            carriers = len(covering_archs(space, blocks)) if in_context else None
            how = f" timed inside {carriers} carrier subnets" if carriers else ""
            raise LUTError(
                f"device '{dp.name}': a full latency table of the '{space.name}' space needs {len(blocks)} entries "
                f"({', '.join(f'{k} {v}' for k, v in count_by_kind(blocks).items())}){how}, more than its "
                f"max_entries={dp.max_entries}. Set `lut_mode: sampled` on this device (times the blocks of "
                f"sample_subnets={dp.sample_subnets} subnets across the FLOPs levels and predicts the rest with a "
                "per-kind regression fitted on them), or raise `max_entries` if the device is fast enough"
            )
    else:
        rng = random.Random(f"lut-sample-{dp.seed}")
        blocks = sampled_blocks(space, dp.sample_subnets, dp.max_entries, rng)
    carriers = covering_archs(space, blocks) if in_context else []
    return Plan(dp.lut_mode, blocks, carriers)


def fingerprint(dp: DeviceParams, device: Device, space: SearchSpace, plan: Plan) -> dict[str, Any]:
    """What measurements depend on; a partial table is resumed only if all of it still matches."""
    settings = dp.model_dump(mode="json")
    for k in ("name", "budgets_ms", "validate_subnets", "command_timeout_s", "convert_jobs"):
        settings.pop(k, None)
    desc = device.describe()
    host = {k: desc.get(k) for k in ("hostname", "cpu", "torch", "onnxruntime", "gpu", "cuda", "clock", "executorch",
                                     "ai-edge-litert") if k in desc or k not in ("executorch", "ai-edge-litert")}
    return {"format": FORMAT, "device": settings, "host": host, "space": space.structure_dict(),
            "opset": device.opset, "method": "in-context" if plan.carriers else "isolated"}


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence per-file INFO logs (one per exported block) for the duration of a build."""
    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, old):
            lg.setLevel(lvl)


def _progress(total: int, initial: int, desc: str, unit: str, enabled: bool) -> Any:
    from evit.progress import Progress

    return Progress(total, desc, unit=unit, initial=initial, enabled=enabled, logger=log)


def _block_item(b: Block, space: SearchSpace, batch: int, occurrence: int = 0) -> Item:
    """A block to time; the n-th repeat of a block inside one subnet gets its own module (own weights)."""
    from evit.nn.static import build_block

    key = b.key if occurrence == 0 else f"{b.key}#{occurrence}"
    return Item(functools.partial(build_block, b, space.head_dropout), block_input_shape(b, batch), key=key,
                file_key=b.key)


def _null_item(shape: tuple[int, ...]) -> Item:
    return Item(NullModule(), shape, key=f"{OVERHEAD_KEY}|{'x'.join(map(str, shape))}")


def _overhead_item(device: Device, space: SearchSpace, plan: Plan) -> Item | None:
    """The almost empty module timing the per-call cost: at the logits' shape when it ends a
    carrier chain, else alone; None for devices without a per-call overhead."""
    batch = device.params.batch_size
    shape = (batch, space.num_classes) if plan.carriers else (batch, 1, 1, 1)
    return _null_item(shape) if device.per_call_overhead else None


def _carrier_chain(arch: Arch, space: SearchSpace, batch: int) -> list[Item]:
    """Every block position of a carrier, in order (a repeated block: one item per position)."""
    blocks = arch_blocks(arch, space)
    return [_block_item(b, space, batch, occurrence=blocks[:j].count(b)) for j, b in enumerate(blocks)]


def _subnet_item(arch: Arch, space: SearchSpace, batch: int) -> Item:
    """A whole static subnet, timed end to end (validation)."""
    from evit.nn.static import StaticSubnet

    return Item(functools.partial(StaticSubnet, arch, space), (batch, 3, arch.resolution, arch.resolution),
                key=f"e2e|{arch.key}")


def _rounds_plan(dp: DeviceParams, in_process: bool) -> tuple[list[int], int]:
    """Samples per round and untimed warm-up runs per round (one round for external runners)."""
    if not in_process:
        return [dp.repeats], dp.warmup
    per_round = split_repeats(dp.repeats, dp.rounds)
    return per_round, -(-dp.warmup // len(per_round))


def measure_all(device: Device, space: SearchSpace, plan: Plan, archs: Sequence[Arch], state: PartialLUT, *,
                progress: bool = True, watch: LoadWatch | None = None) -> None:
    """Measure the table's units and the validation subnets, in rounds, resumably.

    Every round visits every carrier (or block) and then every validation subnet, taking
    `repeats / rounds` samples of each; samples are pooled over rounds. So the table and
    the end-to-end runs it is checked against are spread over the same stretch of time,
    and a burst of load from another job inflates a few samples of everything rather than
    all samples of a few entries.
    """
    dp = device.params
    batch = dp.batch_size
    per_round, warm = _rounds_plan(dp, device.in_process)
    units = plan.units()
    null = _overhead_item(device, space, plan)
    total = len(per_round) * (len(units) + len(archs) + (0 if plan.carriers or null is None else 1))
    # mobile kinds convert every file now, in parallel, instead of between measurements
    device.prepare_ahead(_ahead_groups(device, space, plan, archs))
    bar = _progress(total, len(state.done), f"lut@{device.name}", "unit", progress)
    t0, done_here, warned = time.monotonic(), 0, False

    def finish(n: int, seconds: float) -> None:
        nonlocal done_here, warned
        state.measure_seconds += seconds
        state.maybe_flush()
        if watch is not None:
            watch.sample()
        bar.update(n)
        done_here += n
        warned = warned or _eta_warning(device, t0, done_here, total - len(state.done))
        cancel.check(f"lut@{device.name}: measured units are kept, re-run to resume")

    try:
        for r, count in enumerate(per_round):
            # 1. the table: carriers in context, or single blocks
            todo = [i for i, u in enumerate(units) if f"{u}@{r}" not in state.done]
            if plan.carriers:
                for g in range(0, len(todo), CHAIN_GROUP):
                    group = [plan.carriers[i] for i in todo[g:g + CHAIN_GROUP]]
                    chains, keys = [], []
                    for arch in group:
                        chains.append(_carrier_chain(arch, space, batch) + ([null] if null else []))
                        keys.append([b.key for b in arch_blocks(arch, space)] + ([OVERHEAD_KEY] if null else []))
                    t = time.monotonic()
                    results = device.measure_chains(chains, repeats=count, warmup=warm, rounds=1)
                    seconds = time.monotonic() - t
                    for arch, ks, ms in zip(group, keys, results):
                        pooled: dict[str, list[float]] = {}
                        for k, m in zip(ks, ms):  # a block repeated within a subnet: pool its layers
                            pooled.setdefault(k, []).extend(m.samples)
                        state.add(f"carrier|{arch.key}@{r}", {k: Measurement.from_samples(v)
                                                              for k, v in pooled.items()})
                    finish(len(group), seconds)
            else:
                if null is not None and f"overhead@{r}" not in state.done:
                    m = device.measure_many([null], repeats=count, warmup=warm, rounds=1)[0]
                    state.add(f"overhead@{r}", {OVERHEAD_KEY: m})
                    finish(1, 0.0)
                for i in todo:
                    b = plan.blocks[i]
                    t = time.monotonic()
                    m = device.measure_many([_block_item(b, space, batch)], repeats=count, warmup=warm, rounds=1)[0]
                    state.add(f"block|{b.key}@{r}", {b.key: m})
                    finish(1, time.monotonic() - t)
            # 2. validation: whole static subnets (ONNX kinds: the pipeline's own export of them)
            todo_v = [a for a in archs if f"e2e|{a.key}@{r}" not in state.done]
            for g in range(0, len(todo_v), VALIDATE_GROUP):
                group_a = todo_v[g:g + VALIDATE_GROUP]
                items = [_subnet_item(a, space, batch) for a in group_a]
                t = time.monotonic()
                for a, m in zip(group_a, device.measure_many(items, repeats=count, warmup=warm, rounds=1)):
                    state.add(f"e2e|{a.key}@{r}", {a.key: m}, validation=True)
                finish(len(group_a), time.monotonic() - t)
    finally:
        state.flush()
        bar.close()


def _ahead_groups(device: Device, space: SearchSpace, plan: Plan, archs: Sequence[Arch]) -> list[list[Item]]:
    """The items `measure_all` will time, grouped as its calls will need them (`Device.prepare_ahead`):
    the table (every block position of every carrier, or every block, + the overhead module),
    then the validation subnets, `VALIDATE_GROUP` at a time."""
    batch = device.params.batch_size
    table = ([it for a in plan.carriers for it in _carrier_chain(a, space, batch)] if plan.carriers
             else [_block_item(b, space, batch) for b in plan.blocks])
    null = _overhead_item(device, space, plan)
    if null is not None:
        table.append(null)
    validation = [_subnet_item(a, space, batch) for a in archs]
    return [table, *(validation[g:g + VALIDATE_GROUP] for g in range(0, len(validation), VALIDATE_GROUP))]


def convert_ahead(params: Params, device: str, *, jobs: int | None = None,
                  space: SearchSpace | None = None) -> dict[str, Any]:
    """Make the files a `litert` / `executorch` table build will time, without timing anything.

    Why: converting is nearly all of such a build, and it needs no quiet machine. The
    pipeline runs this beside training (which leaves cores idle), in `jobs` worker
    processes, so that `build_lut` later finds every file in the cache and only measures.
    The files are the ones `build_lut` would make (same plan, same validation subnets, same
    grouping), so a build that runs without this converts them itself.
    """
    dp = params.device(device)
    if jobs is not None:
        dp = dp.model_copy(update={"convert_jobs": jobs})
    space = space or space_for(params)
    dev = get_device(dp, opset=params.export.onnx_opset)
    if not hasattr(dev, "files_made"):
        return {"device": device, "files_made": 0, "files_reused": 0, "seconds": 0.0}
    dev.check_available()
    dev.isolate_conversions = True  # type: ignore[attr-defined]  # never in this (possibly training) process
    plan = plan_lut(space, dp, in_context=dev.in_process)
    archs = sample_subnets(space, dp.validate_subnets, random.Random(f"lut-validate-{dp.seed}"))
    t0 = time.monotonic()
    try:
        dev.prepare_ahead(_ahead_groups(dev, space, plan, archs))
    finally:
        dev.close()
    return {"device": device, "files_made": dev.files_made, "files_reused": dev.files_reused,  # type: ignore[attr-defined]
            "seconds": round(time.monotonic() - t0, 1)}


def _eta_warning(device: Device, t0: float, done: int, remaining: int) -> bool:
    if done < 8:
        return False
    eta = (time.monotonic() - t0) / done * max(remaining, 0)
    if eta > ETA_WARN_S:
        hint = ("set `lut_mode: sampled` on this device (or fewer `repeats`)" if device.params.lut_mode == "full"
                else "fewer `sample_subnets`, `validate_subnets` or `repeats`")
        converts = hasattr(device, "convert_seconds")  # mobile kinds: the first units pay the conversions
        log.warning("lut@%s: about %.0f min left (%d units of work)%s; for a smaller table: %s", device.name,
                    eta / 60, remaining, ", extrapolated from units that included converting, so an upper bound"
                    if converts else "", hint)
        return True
    return False


def statistic(dp: DeviceParams) -> str:
    """The Measurement field the table and its validation use (DeviceParams.estimator)."""
    return f"{dp.estimator}_ms"


def _entries(state: PartialLUT, plan: Plan, space: SearchSpace, stat: str) -> tuple[dict[str, dict[str, Any]], float]:
    """Table entries from the pooled samples (+ how many carriers each block was timed in)."""
    carriers: dict[str, int] = {}
    for arch in plan.carriers:
        for b in set(arch_blocks(arch, space)):
            carriers[b.key] = carriers.get(b.key, 0) + 1
    entries: dict[str, dict[str, Any]] = {}
    for k, v in sorted(state.samples.items()):
        if k == OVERHEAD_KEY:
            continue
        entries[k] = Measurement.from_samples(v).to_dict()
        if plan.carriers:
            entries[k]["carriers"] = carriers.get(k, 0)
    overhead = Measurement.from_samples(state.samples[OVERHEAD_KEY]).to_dict()[stat] \
        if OVERHEAD_KEY in state.samples else 0.0
    return entries, float(overhead)


def build_lut(params: Params, device: str, *, space: SearchSpace | None = None, track: bool = True,
              progress: bool = True) -> dict[str, Any]:
    """Build, validate and write the latency table of one device (resuming a partial build).

    `space` defaults to `params.space` with the prepared data's classes (`space_for`); pass
    one to build a table for a custom space. `track=False` skips MLflow.
    """
    t_start = time.monotonic()
    dp = params.device(device)
    space = space or space_for(params)
    dev = get_device(dp, opset=params.export.onnx_opset)
    dev.check_available()
    out = paths.lut_path(params, device)
    plan = plan_lut(space, dp, in_context=dev.in_process)
    log.info("lut@%s: %s table of the '%s' space (%d classes): %d blocks (%s)%s", device, plan.mode, space.name,
             space.num_classes, len(plan.blocks), ", ".join(f"{k} {v}" for k, v in count_by_kind(plan.blocks).items()),
             f", timed in context inside {len(plan.carriers)} carrier subnets" if plan.carriers else ", each on its own")
    archs = sample_subnets(space, dp.validate_subnets, random.Random(f"lut-validate-{dp.seed}"))
    state = PartialLUT.open(partial_path(out), fingerprint(dp, dev, space, plan))
    watch = LoadWatch()
    try:
        # the harness (module building, ONNX export) uses the device's thread budget: on a
        # shared machine a 2-thread op waits whenever another job holds the second core
        with _quiet("evit.formats.onnx"), torch_threads(dp.threads):
            measure_all(dev, space, plan, archs, state, progress=progress, watch=watch)
    except BaseException:
        dev.close()
        raise
    stat = statistic(dp)
    entries, overhead = _entries(state, plan, space, stat)
    missing = [b.key for b in plan.blocks if b.key not in entries]
    if missing:  # pragma: no cover - guarded by the planner
        raise LUTError(f"lut@{device}: {len(missing)} planned blocks were not measured, e.g. {missing[:3]}")

    fallback = None
    n_enumerated = len(plan.blocks)
    if plan.mode == "sampled":
        all_blocks = {b.key: b for b in unique_blocks(space)}
        n_enumerated = len(all_blocks)
        keys = [k for k in entries if k in all_blocks]
        fallback = BlockRegression.fit([all_blocks[k] for k in keys],
                                       [max(entries[k][stat] - overhead, 1e-6) for k in keys])
    desc = dev.describe()
    lut: dict[str, Any] = {
        "format": FORMAT,
        "complete": True,
        "device": {**desc, "params": dp.model_dump(mode="json")},
        "versions": {k: desc.get(k) for k in ("torch", "onnxruntime", "numpy", "python", "cuda")},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "space": space.structure_dict(),
        "num_classes": space.num_classes,
        "mode": plan.mode,
        "method": "in-context" if plan.carriers else "isolated",
        "statistic": stat,
        "overhead_ms": round(overhead, 6),
        "enumerated_blocks": n_enumerated,
        "entries": entries,
        "carriers": [a.key for a in plan.carriers],
        "fallback": fallback.to_dict() if fallback else None,
        "correction": None,
        "measure_seconds": round(state.measure_seconds, 1),
    }

    # validation: raw predictions, correction choice (held out), metrics
    base = LatencyPredictor.from_lut(lut, space, use_correction=False, source=str(out))
    measured = np.array([Measurement.from_samples(state.validation[a.key]).to_dict()[stat] for a in archs])
    raw = base.raw_many(archs)
    flops = np.array([flops_m(a, space) for a in archs])
    resolutions = np.array([a.resolution for a in archs])
    kinds = base.kind_costs(archs)
    try:
        def retable(over: Sequence[Arch]) -> tuple[np.ndarray, np.ndarray, int]:
            """Re-time the table units holding the blocks of subnets the table over-predicts;
            keep each block's lower estimate; return the new raw predictions and kind costs."""
            n = _remeasure_table(dev, space, plan, over, entries, stat)
            now = LatencyPredictor.from_lut(lut, space, use_correction=False, source=str(out))
            return now.raw_many(archs), now.kind_costs(archs), n

        choice, first_within, remeasured, lowered, retimed = _remeasure_outliers(
            dev, dp, space, archs, raw, kinds, overhead, measured, resolutions, stat, retable)
        raw = choice.raw
    finally:
        dev.close()
    lut["correction"] = {**choice.correction.to_dict(), **choice.details}
    metrics = validation_metrics(choice.predicted, raw, measured, flops, choice)
    load = watch.summary()
    conversion = ({"files_made": dev.files_made, "files_reused": dev.files_reused,  # type: ignore[attr-defined]
                   "seconds": round(dev.convert_seconds, 1)}  # type: ignore[attr-defined]
                  if hasattr(dev, "files_made") else None)
    lut["measurement"] = {"estimator": stat, "clock": dev.clock_name, "load": load, "conversion": conversion,
                          "outlier_tolerance": OUTLIER_TOLERANCE, "remeasured_subnets": remeasured,
                          "lowered_subnets": lowered, "lowered_entries": retimed,
                          "within_10pct_first_pass": round(first_within, 6)}
    metrics.update({"estimator": stat, "clock": dev.clock_name, "cpu_count": load["cpu_count"],
                    **{f"load_avg_{k[5:]}": v for k, v in load.items() if k.startswith("load_1m_")},
                    "remeasured_subnets": remeasured, "lowered_subnets": lowered, "lowered_entries": retimed,
                    "within_10pct_first_pass": round(first_within, 6)})
    metrics.update({"lut_entries": len(entries), "enumerated_blocks": n_enumerated, "carriers": len(plan.carriers),
                    "overhead_ms": round(overhead, 6), "measure_seconds": round(state.measure_seconds, 1),
                    "build_seconds": round(time.monotonic() - t_start, 1)})
    lut["validation"] = {"statistic": stat, **metrics}  # the full report; the metrics file keeps the headline
    write_json_atomic(out, lut)

    metrics_path = paths.lut_metrics_path(device)
    write_json_atomic(metrics_path, {k: metrics[k] for k in HEADLINE_METRICS})
    png, csv_path = paths.plots_dir() / f"lut-{device}.png", paths.plots_dir() / f"lut-{device}.csv"
    proxy = flops_proxy(flops, measured)
    write_points_csv(csv_path, [
        {"measured_ms": round(m, 6), "predicted_ms": round(p, 6), "flops_m": round(f, 4),
         "flops_proxy_ms": round(x, 6), "raw_ms": round(r, 6), "level": "" if lv is None else lv, "arch": a.key}
        for a, m, p, f, x, r, lv in zip(archs, measured, choice.predicted, flops, proxy, raw,
                                        (space.level_of(f) for f in flops))
    ])
    plot_points(png, device, measured, choice.predicted, proxy, metrics)
    state.remove()
    log.info("lut@%s: %d entries; %d/%d subnets within +-10%% (FLOPs proxy: %.0f%%), MAPE %.2f%%, %.0f s; "
             "estimator %s, load average %s (max %s) on %s CPUs, %d outlier subnet(s) re-measured", device,
             len(entries), round(metrics["within_10pct"] * metrics["n"]), metrics["n"],
             metrics["flops_within_10pct"] * 100, metrics["mape_pct"], metrics["build_seconds"], stat,
             load["load_1m_mean"], load["load_1m_max"], load["cpu_count"], remeasured)
    if track:
        _track(params, device, metrics, [out, metrics_path, png, csv_path])
    return {"device": device, "lut": str(out), "metrics": str(metrics_path), "entries": len(entries),
            "mode": plan.mode, "carriers": len(plan.carriers), "n": metrics["n"],
            "within_10pct": metrics["within_10pct"], "mape_pct": metrics["mape_pct"],
            "flops_within_10pct": metrics["flops_within_10pct"], "build_seconds": metrics["build_seconds"],
            **({"conversion": conversion} if conversion else {})}


@dataclass(frozen=True)
class _Remeasured:
    predicted: np.ndarray
    raw: np.ndarray
    kinds: np.ndarray
    correction: Any
    details: dict[str, Any]


def _remeasure_outliers(dev: Device, dp: DeviceParams, space: SearchSpace, archs: Sequence[Arch], raw: np.ndarray,
                        kinds: np.ndarray, overhead: float, measured: np.ndarray, resolutions: np.ndarray, stat: str,
                        retable: Callable[[Sequence[Arch]], tuple[np.ndarray, np.ndarray, int]],
                        ) -> tuple[Any, float, int, int, int]:
    """Re-measure what the table and the validation disagree on (`evit.latency.timing`).

    A subnet measured slower than predicted may have run during a burst of other work: it is
    re-measured. A subnet measured faster than predicted points at table entries timed during
    a burst: the table units holding its blocks are re-timed. Either way only a lower
    estimate replaces a recorded one. Updates `measured` (and the table, via `retable`) in
    place; returns the final choice (with `.raw`), the share within tolerance before any
    re-measurement, and how many subnets were re-measured / lowered and entries lowered.
    """
    def choose(raw_now: np.ndarray, kinds_now: np.ndarray) -> Any:
        c = choose_correction(raw_now, measured, resolutions, seed=dp.seed, kind_costs=kinds_now,
                              overhead_ms=overhead)
        return _Remeasured(c.predicted, raw_now, kinds_now, c.correction, c.details)

    choice = choose(raw, kinds)
    first = float(np.mean(np.abs(choice.predicted - measured) <= OUTLIER_TOLERANCE * measured))
    remeasured = lowered = retimed = 0
    if not dev.in_process:  # an external runner's single invocation per subnet: nothing to pool
        return choice, first, 0, 0, 0
    for _ in range(REMEASURE_PASSES):
        bad = outliers(choice.predicted, measured)
        if not bad:
            break
        cancel.check(f"lut@{dp.name}: while re-measuring outliers, re-run to resume")
        slow = [i for i in bad if choice.predicted[i] < measured[i]]
        fast = [i for i in bad if choice.predicted[i] > measured[i]]
        log.info("lut@%s: %d validation subnet(s) off the table by more than %.0f%%: re-measuring %d, re-timing the "
                 "table units of %d", dp.name, len(bad), OUTLIER_TOLERANCE * 100, len(slow), len(fast))
        if slow:
            items = [_subnet_item(archs[i], space, dp.batch_size) for i in slow]
            with _quiet("evit.formats.onnx"), torch_threads(dp.threads):
                again = dev.measure_many(items)
            for i, m in zip(slow, again):
                new = keep_lower(measured[i], m.to_dict()[stat])
                lowered += int(new < measured[i])
                measured[i] = new
            remeasured += len(slow)
        raw_now, kinds_now = choice.raw, choice.kinds
        if fast:
            raw_now, kinds_now, n = retable([archs[i] for i in fast])
            retimed += n
        choice = choose(raw_now, kinds_now)
    return choice, first, remeasured, lowered, retimed


def _remeasure_table(dev: Device, space: SearchSpace, plan: Plan, archs: Sequence[Arch],
                     entries: dict[str, dict[str, Any]], stat: str) -> int:
    """Re-time the table units (carriers, or single blocks) holding the blocks of `archs`;
    an entry takes the new estimate only when lower. Returns how many entries were lowered."""
    dp = dev.params
    batch = dp.batch_size
    keys = {b.key for a in archs for b in arch_blocks(a, space)}
    fresh: dict[str, list[float]] = {}
    null = _overhead_item(dev, space, plan)
    with _quiet("evit.formats.onnx"), torch_threads(dp.threads):
        if plan.carriers:
            carriers = [c for c in plan.carriers if keys & {b.key for b in arch_blocks(c, space)}]
            for g in range(0, len(carriers), CHAIN_GROUP):
                cancel.check(f"lut@{dp.name}: while re-timing table entries, re-run to resume")
                group = carriers[g:g + CHAIN_GROUP]
                chains, chain_keys = [], []
                for arch in group:
                    chains.append(_carrier_chain(arch, space, batch) + ([null] if null else []))
                    chain_keys.append([b.key for b in arch_blocks(arch, space)])
                for ks, ms in zip(chain_keys, dev.measure_chains(chains)):
                    for k, m in zip(ks, ms):
                        if k in keys:
                            fresh.setdefault(k, []).extend(m.samples)
        else:
            blocks = [b for b in plan.blocks if b.key in keys]
            for b, m in zip(blocks, dev.measure_many([_block_item(b, space, batch) for b in blocks])):
                fresh[b.key] = list(m.samples)
    lowered = 0
    for k, samples in fresh.items():
        if k not in entries:
            continue
        new = Measurement.from_samples(samples).to_dict()
        if new[stat] < entries[k][stat]:
            entries[k] = {**new, **({"carriers": entries[k]["carriers"]} if "carriers" in entries[k] else {}),
                          "retimed": True}
            lowered += 1
    return lowered


def _track(params: Params, device: str, metrics: dict[str, Any], files: list[Path]) -> None:
    """Log the stage to MLflow; a tracking failure must not throw away a finished table."""
    try:
        import mlflow

        from evit.tracking import flat_params, stage_run

        with stage_run(params, f"lut@{device}", tags={"evit.device": device}, log_sections=("space",)):
            mlflow.log_params(flat_params(params.device(device).model_dump(mode="json"), "device."))
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(float(v))})
            mlflow.set_tag("evit.lut.correction", str(metrics.get("correction_form")))
            for f in files:
                mlflow.log_artifact(str(f), artifact_path="lut")
    except Exception as exc:  # noqa: BLE001 - tracking is best effort by design
        log.warning("lut@%s: could not log to MLflow (%s: %s); the table and report are written", device,
                    type(exc).__name__, exc)
