"""The `lut@<device>` stage: build a device's latency table, validate it, report.

    evit lut --device cpu-1t      (dvc.yaml: lut@cpu-1t; Prefect: the lut task)

1. Plan (`evit.latency.plan`): every unique block the search space can produce, or in
   `lut_mode: sampled` the blocks of `sample_subnets` subnets across the FLOPs levels; the
   carrier subnets in-process devices time them in.
2. Measure, resumably (`evit.latency.measure`): the blocks in context, in rounds, flushed
   to `luts/<device>.partial.json` every few seconds.
3. Validate: `validate_subnets` random subnets across the levels, timed end to end as
   static subnets (for ONNX devices: the pipeline's own ONNX export), interleaved;
   compare with the prediction and with FLOPs; fit the optional linear correction.
4. Write `luts/<device>.json` (complete), `metrics/lut-<device>.json`,
   `plots/lut-<device>.png` and `.csv`, and log them to MLflow (`lut@<device>` run).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evit import paths
from evit.arch import Arch
from evit.blocks import arch_blocks
from evit.config import Params
from evit.errors import LUTError
from evit.flops import flops_m
from evit.io import write_json_atomic
from evit.latency.coverage import count_by_kind, sample_subnets, unique_blocks
from evit.latency.devices import get_device, torch_threads
from evit.latency.devices.shared import shared_store
from evit.latency.lut import FORMAT, PartialLUT, check_space, load_lut, partial_path
from evit.latency.measure import (
    OVERHEAD_KEY,
    Deadline,
    ahead_groups,
    measure_all,
    probe_device,
    quiet,
    remeasure_outliers,
    remeasure_table,
)
from evit.latency.measurement import Measurement, statistic
from evit.latency.plan import MIN_VALIDATE, Plan, Probe, fingerprint, plan_budget, plan_lut
from evit.latency.predictor import TRANSFER_FORMS, BlockRegression, LatencyPredictor, Transfer
from evit.latency.report import choose_correction, flops_proxy, plot_points, validation_metrics, write_points_csv
from evit.latency.timing import OUTLIER_TOLERANCE, LoadWatch
from evit.resolve import space_for
from evit.space import SearchSpace
from evit.tracking import flat_params, log_stage, numeric_metrics

log = logging.getLogger(__name__)

HEADLINE_METRICS = ("n", "rmse_ms", "mape_pct", "within_10pct", "spearman", "flops_within_10pct", "flops_spearman",
                    "lut_entries", "build_seconds",
                    # how it was measured (issue 13): a figure means little without the load beside it
                    "estimator", "clock", "cpu_count", "load_avg_1m_mean", "load_avg_1m_max",
                    "remeasured_subnets", "lowered_subnets", "lowered_entries",
                    # issue 24: what a new device's table cost, and where its unmeasured blocks came from
                    "device_seconds", "host_seconds", "table_source")
"""What metrics/lut-<device>.json keeps (`dvc metrics show` stays one readable table); the full
validation report (raw predictions, correction, FLOPs proxy errors) is `validation` in the LUT."""

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
    if not dev.converts_files:
        return {"device": device, "files_made": 0, "files_reused": 0, "seconds": 0.0}
    if dp.lut.device_minutes is not None:  # its plan depends on a timing probe: `evit lut` converts
        return {"device": device, "files_made": 0, "files_reused": 0, "seconds": 0.0,
                "skipped": "a budgeted table's plan depends on a timing probe; `evit lut` converts its files"}
    dev.check_available()
    dev.isolate_conversions()  # never in this (possibly training) process
    store = shared_store(params.storage)
    if store is not None:
        dev.share(store)
    plan = plan_lut(space, dp, in_context=dev.in_process)
    archs = sample_subnets(space, dp.validate_subnets, random.Random(f"lut-validate-{dp.seed}"))
    t0 = time.monotonic()
    try:
        dev.prepare_ahead(ahead_groups(dev, space, plan, archs))
    finally:
        dev.close()
    stats = dev.conversion_stats() or {}
    return {"device": device, "files_made": stats.get("files_made", 0), "bytes_made": stats.get("bytes_made", 0),
            "files_reused": stats.get("files_reused", 0), "seconds": round(time.monotonic() - t0, 1)}


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
    prior = _load_prior(params, dp, space)  # a bad prior fails before anything is timed
    dev.check_available()
    store = shared_store(params.storage)
    if store is not None:
        dev.share(store)
    out = paths.lut_path(params, device)
    budget = None
    probe = None
    if dp.lut.device_minutes is not None:
        # a partial build (same device settings) is resumed whatever its budget: what it timed stays valid,
        # and its probe is reused, so a larger budget times only what its plan adds
        state = PartialLUT.open(partial_path(out), fingerprint(dp, dev, space, Plan("budget", [], [])))
        if state.probe:
            probe = Probe(**state.probe)
        else:
            pool = sample_subnets(space, max(dp.validate_subnets, MIN_VALIDATE),
                                  random.Random(f"lut-validate-{dp.seed}"))
            with quiet("evit.formats.onnx"):
                probe = probe_device(dev, space, pool)
            state.probe = probe.to_dict()
            state.device_seconds += probe.seconds
            state.flush()
        budget = plan_budget(space, dp, probe, in_context=dev.in_process)
        plan, archs = budget.plan, budget.validation
        log.info("lut@%s: budget %.1f min of device time; will time %d %s (%d blocks: %s) and %d validation subnets "
                 "end to end; expected %.1f min of device time (probe %.0f s, table %.0f s, validation %.0f s)%s",
                 device, budget.budget_s / 60, len(plan.carriers) or len(plan.blocks),
                 "carrier subnets" if plan.carriers else "blocks", len(plan.blocks),
                 ", ".join(f"{k} {v}" for k, v in count_by_kind(plan.blocks).items()), len(archs),
                 budget.expected_s["total"] / 60, budget.expected_s["probe"], budget.expected_s["table"],
                 budget.expected_s["validation"], "; the rest of the blocks from " +
                 (f"the prior '{dp.lut.prior}' or " if prior else "") + "a per-kind regression")
    else:
        plan = plan_lut(space, dp, in_context=dev.in_process)
        archs = sample_subnets(space, dp.validate_subnets, random.Random(f"lut-validate-{dp.seed}"))
        state = PartialLUT.open(partial_path(out), fingerprint(dp, dev, space, plan))
    log.info("lut@%s: %s table of the '%s' space (%d classes): %d blocks (%s)%s", device, plan.mode, space.name,
             space.num_classes, len(plan.blocks), ", ".join(f"{k} {v}" for k, v in count_by_kind(plan.blocks).items()),
             f", timed in context inside {len(plan.carriers)} carrier subnets" if plan.carriers else ", each on its own")
    device_s0 = state.device_seconds
    deadline = Deadline(budget.budget_s, budget.unit_s, budget.expected_s["validation"],
                        progress=state.budget_progress) if budget else None
    watch = LoadWatch()
    try:
        # the harness (module building, ONNX export) uses the device's thread budget: on a
        # shared machine a 2-thread op waits whenever another job holds the second core
        with quiet("evit.formats.onnx"), torch_threads(dp.threads):
            measure_all(dev, space, plan, archs, state, progress=progress, watch=watch, deadline=deadline)
    except BaseException:
        dev.close()
        raise
    if budget is not None and deadline is not None and deadline.cut:  # the table is what was measured in time
        timed = {u.split("@")[0] for u in state.done}
        kept = [a for a in plan.carriers if f"carrier|{a.key}" in timed]
        blocks = sorted({b for a in kept for b in arch_blocks(a, space)}) if plan.carriers else \
            [b for b in plan.blocks if f"block|{b.key}" in timed]
        log.info("lut@%s: %d of %d planned %s timed within the budget", device, len(kept) or len(blocks),
                 len(plan.carriers) or len(plan.blocks), "carriers" if plan.carriers else "blocks")
        plan = Plan("budget", blocks, kept)
    stat = statistic(dp)
    entries, overhead = _entries(state, plan, space, stat)
    missing = [b.key for b in plan.blocks if b.key not in entries]
    if missing:  # pragma: no cover - guarded by the planner
        raise LUTError(f"lut@{device}: {len(missing)} planned blocks were not measured, e.g. {missing[:3]}")

    fallback = None
    n_enumerated = len(plan.blocks)
    if plan.mode in ("sampled", "budget"):
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
    measured = np.array([Measurement.from_samples(state.validation[a.key]).to_dict()[stat] for a in archs])
    flops = np.array([flops_m(a, space) for a in archs])
    resolutions = np.array([a.resolution for a in archs])
    if prior is not None and plan.mode != "full":  # a full table measured every block: nothing to transfer
        lut["transfer"], lut["table_sources"] = _choose_transfer(lut, prior, space, archs, measured, resolutions,
                                                                 overhead, dp.seed, str(out))
    base = LatencyPredictor.from_lut(lut, space, use_correction=False, source=str(out))
    raw = base.raw_many(archs)
    kinds = base.kind_costs(archs)
    device_before_remeasure = time.monotonic(), dev.prepare_seconds
    try:
        def retable(over: Sequence[Arch]) -> tuple[np.ndarray, np.ndarray, int]:
            """Re-time the table units holding the blocks of subnets the table over-predicts;
            keep each block's lower estimate; return the new raw predictions and kind costs."""
            n = remeasure_table(dev, space, plan, over, entries, stat)
            now = LatencyPredictor.from_lut(lut, space, use_correction=False, source=str(out))
            return now.raw_many(archs), now.kind_costs(archs), n

        # a budgeted table re-measures nothing: it would spend device time the plan did not count
        choice, first_within, remeasured, lowered, retimed = remeasure_outliers(
            dev, dp, space, archs, raw, kinds, overhead, measured, resolutions, stat, retable,
            **({"passes": 0} if budget is not None else {}))
        raw = choice.raw
    finally:
        dev.close()
    remeasure_s = max(0.0, time.monotonic() - device_before_remeasure[0]
                      - (dev.prepare_seconds - device_before_remeasure[1])) if remeasured or retimed else 0.0
    device_s = state.device_seconds + remeasure_s
    build_s = time.monotonic() - t_start
    host_s = max(0.0, build_s - (device_s - device_s0))
    lut["correction"] = {**choice.correction.to_dict(), **choice.details}
    metrics = validation_metrics(choice.predicted, raw, measured, flops, choice)
    load = watch.summary()
    conversion = dev.conversion_stats()
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
                    "build_seconds": round(build_s, 1), "device_seconds": round(device_s, 1),
                    "host_seconds": round(host_s, 1),
                    "table_source": (f"prior-{lut['transfer']['form']}" if lut.get("transfer")
                                     else "regression" if fallback else "measured")})
    if budget is not None:
        metrics.update({"budget_minutes": dp.lut.device_minutes, "expected_device_seconds": budget.expected_s["total"],
                        "validation_subnets": len(archs)})
        lut["budget"] = {"device_minutes": dp.lut.device_minutes, "expected_seconds": budget.expected_s,
                         "probe": probe.to_dict() if probe else None, "spent_device_seconds": round(device_s, 1)}
    if conversion:
        metrics.update({"files_converted": conversion["files_made"], "files_reused": conversion["files_reused"]})
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
    log.info("lut@%s: device time %.1f min%s, host time %.1f min%s", device, device_s / 60,
             f" of a {dp.lut.device_minutes:g} min budget" if budget is not None else "", host_s / 60,
             f"; {conversion['files_made']} file(s) converted ({conversion['bytes_made'] / 1e9:.2f} GB), "
             f"{conversion['files_reused']} reused "
             f"({conversion['files_fetched']} fetched from the shared store)" if conversion else "")
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
            "spearman": metrics["spearman"], "device_seconds": metrics["device_seconds"],
            "host_seconds": metrics["host_seconds"], "table_source": metrics["table_source"],
            **({"budget_minutes": dp.lut.device_minutes} if budget is not None else {}),
            **({"conversion": conversion, "files_converted": conversion["files_made"],
                "files_reused": conversion["files_reused"]} if conversion else {})}


def _load_prior(params: Params, dp: Any, space: SearchSpace) -> dict[str, Any] | None:
    """The finished table of `dp.lut.prior` (LUTError naming the device and the fix when it is
    missing, partial or for another space), or None without a prior."""
    if dp.lut.prior is None:
        return None
    path = paths.lut_path(params, dp.lut.prior)
    try:
        lut = load_lut(path)
        check_space(lut, space, repr(str(path)))
    except LUTError as exc:
        raise LUTError(f"device '{dp.name}': lut.prior '{dp.lut.prior}' has no usable table: {exc}") from None
    return lut


def _choose_transfer(lut: dict[str, Any], prior: dict[str, Any], space: SearchSpace, archs: Sequence[Arch],
                     measured: np.ndarray, resolutions: np.ndarray, overhead: float, seed: int,
                     source: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Where the blocks this table did not measure come from: its own per-kind regression, or the
    prior's costs mapped per kind ('scale' or 'power', `Transfer`); whichever predicts the
    validation subnets with the lowest held-out MAPE (each with its best correction form)."""
    prior_pred = LatencyPredictor.from_lut(prior, space, use_correction=False, source="prior")
    costs = {b.key: round(prior_pred.block_cost(b), 9) for b in unique_blocks(space)}
    stat = lut["statistic"]
    by_key = {b.key: b for b in unique_blocks(space)}
    pairs = [(by_key[k].kind, costs[k], max(e[stat] - overhead, 0.0)) for k, e in lut["entries"].items()
             if k in costs]
    candidates: dict[str, dict[str, Any] | None] = {"regression": None}
    for form in TRANSFER_FORMS:
        candidates[f"prior-{form}"] = Transfer.fit(str(prior.get("device", {}).get("name", "prior")), costs, pairs,
                                                   form).to_dict()
    errors: dict[str, float] = {}
    for name, transfer in candidates.items():
        pred = LatencyPredictor.from_lut({**lut, "transfer": transfer}, space, use_correction=False, source=source)
        c = choose_correction(pred.raw_many(archs), measured, resolutions, seed=seed, kind_costs=pred.kind_costs(archs),
                              overhead_ms=overhead)
        errors[name] = min(c.details["cv_mape_pct"].values())
    best = min(errors, key=lambda k: (round(errors[k], 9), list(candidates).index(k)))
    log.info("lut: unmeasured blocks from %s (held-out MAPE %s)", best,
             ", ".join(f"{k} {v:.2f}%" for k, v in errors.items()))
    return candidates[best], {"cv_mape_pct": {k: round(v, 4) for k, v in errors.items()}, "chosen": best,
                              "prior": candidates["prior-scale"]["prior"] if candidates["prior-scale"] else None,
                              "pairs": len(pairs)}


def _track(params: Params, device: str, metrics: dict[str, Any], files: list[Path]) -> None:
    """Log the stage to MLflow; a tracking failure must not throw away a finished table."""
    log_stage(params, f"lut@{device}", tags={"evit.device": device,
                                            "evit.lut.correction": str(metrics.get("correction_form"))},
              log_sections=("space",), values=flat_params(params.device(device).model_dump(mode="json"), "device."),
              metrics=numeric_metrics(metrics), artifacts=files, artifact_path="lut")
