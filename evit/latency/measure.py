"""Measuring a table's units and its validation subnets: in rounds, resumably, re-measuring outliers.

2. On devices that run modules in process (torch-cpu, onnxruntime-cpu, cuda, litert,
   executorch) each block is timed *in context*, inside its carrier subnets, as the chain
   of its block modules with each block timed separately. In isolation a block runs with
   its weights and code hot in the caches and looks up to ~20% faster than it is inside a
   subnet; in context the sum of the blocks matches the subnet. External (`command`)
   devices time each block on its own (an external runner sees one file at a time).
   Every few seconds the measurements are flushed to `luts/<device>.partial.json`.
3. Validation subnets are timed end to end as static subnets (for ONNX devices: the
   pipeline's own ONNX export), interleaved with the table's units in every round.
   What the table and the validation disagree on is re-measured (`evit.latency.timing`).
(The numbering follows `evit.latency.stage`, which runs the whole build.)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from evit import cancel
from evit.arch import Arch
from evit.blocks import Block, arch_blocks
from evit.config import DeviceParams
from evit.latency.devices import Device, Item, torch_threads
from evit.latency.lut import PartialLUT
from evit.latency.measurement import Measurement
from evit.latency.plan import Plan, Probe, rounds_plan
from evit.latency.report import choose_correction
from evit.latency.timing import OUTLIER_TOLERANCE, REMEASURE_PASSES, LoadWatch, keep_lower, outliers
from evit.nn.static import StaticSubnet, block_input_shape, build_block
from evit.progress import Progress
from evit.space import SearchSpace

log = logging.getLogger(__name__)

OVERHEAD_KEY = "overhead|null"
CHAIN_GROUP = 4
"""Carriers timed together, round robin (interleaving)."""
VALIDATE_GROUP = 8
ETA_WARN_S = 3600.0


class NullModule(nn.Module):
    """The cheapest module a runtime must still execute: times the fixed cost of one call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
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
    return Progress(total, desc, unit=unit, initial=initial, enabled=enabled, logger=log)


def block_item(b: Block, space: SearchSpace, batch: int, occurrence: int = 0) -> Item:
    """A block to time; the n-th repeat of a block inside one subnet gets its own module (own weights)."""
    key = b.key if occurrence == 0 else f"{b.key}#{occurrence}"
    return Item(functools.partial(build_block, b, space.head_dropout), block_input_shape(b, batch), key=key,
                file_key=b.key)


def null_item(shape: tuple[int, ...]) -> Item:
    return Item(NullModule(), shape, key=f"{OVERHEAD_KEY}|{'x'.join(map(str, shape))}")


def overhead_item(device: Device, space: SearchSpace, plan: Plan) -> Item | None:
    """The almost empty module timing the per-call cost: at the logits' shape when it ends a
    carrier chain, else alone; None for devices without a per-call overhead."""
    batch = device.params.batch_size
    shape = (batch, space.num_classes) if plan.carriers else (batch, 1, 1, 1)
    return null_item(shape) if device.per_call_overhead else None


def carrier_chain(arch: Arch, space: SearchSpace, batch: int) -> list[Item]:
    """Every block position of a carrier, in order (a repeated block: one item per position)."""
    blocks = arch_blocks(arch, space)
    return [block_item(b, space, batch, occurrence=blocks[:j].count(b)) for j, b in enumerate(blocks)]


def subnet_item(arch: Arch, space: SearchSpace, batch: int) -> Item:
    """A whole static subnet, timed end to end (validation)."""
    return Item(functools.partial(StaticSubnet, arch, space), (batch, 3, arch.resolution, arch.resolution),
                key=f"e2e|{arch.key}", blocks=len(arch_blocks(arch, space)))


@dataclass
class Deadline:
    """A device-time budget enforced while measuring (`lut.device_minutes`).

    The plan's estimates come from a probe taken at one moment; on a shared machine the
    device time of a unit can grow with the load. So before each group of table units the
    build compares what the units timed so far cost with what the plan expected of them,
    scales the rest (and the validation still to come) by that ratio, and stops timing
    table units once they would not fit: the table keeps what it measured, the validation
    subnets are always timed.
    """

    budget_s: float
    unit_s: dict[str, float]
    """Expected device seconds of each table unit ("carrier|<key>" / "block|<key>"), all rounds."""
    validation_s: float
    progress: dict[str, float] = field(default_factory=lambda: {"expected": 0.0, "spent": 0.0})
    """Device seconds the table units timed so far were expected to take, and took: the
    partial table's own dict (`PartialLUT.budget_progress`), so a resumed build goes on from
    the ratio over everything it timed. Restarted with each run, the first group after a
    resume (cold caches, reloaded files) set it alone: 3.4x in a LiteRT build whose table
    had run at 1.8x."""
    cut: bool = False

    def inflation(self) -> float:
        expected, spent = self.progress["expected"], self.progress["spent"]
        return max(1.0, spent / expected) if expected > 0 else 1.0

    def timed(self, expected_s: float, spent_s: float) -> None:
        self.progress["expected"] += expected_s
        self.progress["spent"] += spent_s

    def fits(self, spent_now: float, units: Sequence[str], rounds: int, rounds_left: int) -> bool:
        """Whether `units` (one round's share) and the validation rounds still to come fit."""
        if self.cut:
            return False
        need = (sum(self.unit_s.get(u, 0.0) for u in units) + self.validation_s * rounds_left) / rounds
        need *= self.inflation()
        if spent_now + need > self.budget_s:
            self.cut = True
        return not self.cut


def measure_all(device: Device, space: SearchSpace, plan: Plan, archs: Sequence[Arch], state: PartialLUT, *,
                progress: bool = True, watch: LoadWatch | None = None, deadline: Deadline | None = None) -> None:
    """Measure the table's units and the validation subnets, in rounds, resumably.

    Every round visits every carrier (or block) and then every validation subnet, taking
    `repeats / rounds` samples of each; samples are pooled over rounds. So the table and
    the end-to-end runs it is checked against are spread over the same stretch of time,
    and a burst of load from another job inflates a few samples of everything rather than
    all samples of a few entries.
    """
    dp = device.params
    batch = dp.batch_size
    per_round, warm = rounds_plan(dp, device.in_process)
    units = plan.units()
    null = overhead_item(device, space, plan)
    total = len(per_round) * (len(units) + len(archs) + (0 if plan.carriers or null is None else 1))
    # mobile kinds convert every file now, in parallel, instead of between measurements
    device.prepare_ahead(ahead_groups(device, space, plan, archs))
    bar = _progress(total, len(state.done), f"lut@{device.name}", "unit", progress)
    t0, done_here, warned = time.monotonic(), 0, False
    prep = device.prepare_seconds

    def finish(n: int, seconds: float) -> None:
        nonlocal done_here, warned, prep
        state.measure_seconds += seconds
        state.device_seconds += max(0.0, seconds - (device.prepare_seconds - prep))
        prep = device.prepare_seconds
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
            if deadline is not None and deadline.cut:
                todo = []
            if plan.carriers:
                for g in range(0, len(todo), CHAIN_GROUP):
                    group = [plan.carriers[i] for i in todo[g:g + CHAIN_GROUP]]
                    if deadline is not None:
                        names = [units[i] for i in todo[g:g + CHAIN_GROUP]]
                        if not deadline.fits(state.device_seconds, names, len(per_round), len(per_round) - r):
                            log.info("lut@%s: stopping the table at %.0f s of device time (%.1fx what the probe "
                                     "expected): the rest would not fit the budget with the validation subnets",
                                     device.name, state.device_seconds, deadline.inflation())
                            break
                        before = state.device_seconds
                    chains, keys = [], []
                    for arch in group:
                        chains.append(carrier_chain(arch, space, batch) + ([null] if null else []))
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
                    if deadline is not None:
                        deadline.timed(sum(deadline.unit_s.get(u, 0.0) for u in names) / len(per_round),
                                       state.device_seconds - before)
            else:
                if null is not None and f"overhead@{r}" not in state.done:
                    m = device.measure_many([null], repeats=count, warmup=warm, rounds=1)[0]
                    state.add(f"overhead@{r}", {OVERHEAD_KEY: m})
                    finish(1, 0.0)
                for i in todo:
                    b = plan.blocks[i]
                    if deadline is not None:
                        if not deadline.fits(state.device_seconds, [units[i]], len(per_round), len(per_round) - r):
                            break
                        before = state.device_seconds
                    t = time.monotonic()
                    m = device.measure_many([block_item(b, space, batch)], repeats=count, warmup=warm, rounds=1)[0]
                    state.add(f"block|{b.key}@{r}", {b.key: m})
                    finish(1, time.monotonic() - t)
                    if deadline is not None:
                        deadline.timed(deadline.unit_s.get(units[i], 0.0) / len(per_round), state.device_seconds - before)
            # 2. validation: whole static subnets (ONNX kinds: the pipeline's own export of them)
            todo_v = [a for a in archs if f"e2e|{a.key}@{r}" not in state.done]
            for g in range(0, len(todo_v), VALIDATE_GROUP):
                group_a = todo_v[g:g + VALIDATE_GROUP]
                items = [subnet_item(a, space, batch) for a in group_a]
                t = time.monotonic()
                for a, m in zip(group_a, device.measure_many(items, repeats=count, warmup=warm, rounds=1)):
                    state.add(f"e2e|{a.key}@{r}", {a.key: m}, validation=True)
                finish(len(group_a), time.monotonic() - t)
    finally:
        state.flush()
        bar.close()


def probe_device(device: Device, space: SearchSpace, archs: Sequence[Arch]) -> Probe:
    """A short timing probe for the budget planner: the smallest and the largest of `archs`
    end to end and (in-process kinds) the largest as a carrier chain, 2 samples each.

    Mobile kinds convert the probe's files first (host time, not counted); the device time it
    takes is `Probe.seconds`.
    """
    from evit.flops import flops_m

    dp = device.params
    batch = dp.batch_size
    lo = min(archs, key=lambda a: flops_m(a, space))
    hi = max(archs, key=lambda a: flops_m(a, space))
    items = [subnet_item(lo, space, batch), subnet_item(hi, space, batch)]
    null = overhead_item(device, space, Plan("budget", [], [hi]))
    chain = carrier_chain(hi, space, batch) + ([null] if null else []) if device.in_process else []
    device.prepare_ahead([items, *([chain] if chain else [])])
    with quiet("evit.formats.onnx"), torch_threads(dp.threads):
        p0, t0 = device.prepare_seconds, time.monotonic()
        m_lo, m_hi = device.measure_many(items, repeats=2, warmup=1, rounds=1)
        e2e_s = time.monotonic() - t0 - (device.prepare_seconds - p0)
        chain_s = 0.0
        factor = 1.0
        if chain:
            p0, t0 = device.prepare_seconds, time.monotonic()
            device.measure_chains([chain], repeats=2, warmup=1, rounds=1)
            chain_s = time.monotonic() - t0 - (device.prepare_seconds - p0)
            factor = max(1.0, chain_s / 4 / max(m_hi.median_ms / 1e3, 1e-6))  # 1 warm-up + 1 untimed + 2 passes
    f_lo, f_hi = flops_m(lo, space), flops_m(hi, space)
    c1 = max(0.0, (m_hi.median_ms - m_lo.median_ms) / (f_hi - f_lo)) if f_hi > f_lo else 0.0
    c0 = m_lo.median_ms - c1 * f_lo
    # wall seconds per timed second (the thread clock leaves out time other processes held the core)
    runs = sum((1 + 2 * max(1, math.ceil(0.5 / max(m.median_ms, 1e-6)))) * m.median_ms for m in (m_lo, m_hi))
    wall = min(max(e2e_s / max(runs / 1e3, 1e-9), 1.0), 10.0) if device.in_process else 1.0
    return Probe(c0_ms=c0 * wall, c1_ms=c1 * wall, chain_factor=factor / wall, call_s=max(e2e_s, 1e-3) / 2,
                 seconds=max(0.0, e2e_s) + max(0.0, chain_s))


def ahead_groups(device: Device, space: SearchSpace, plan: Plan, archs: Sequence[Arch]) -> list[list[Item]]:
    """The items `measure_all` will time, grouped as its calls will need them (`Device.prepare_ahead`):
    the table (every block position of every carrier, or every block, + the overhead module),
    then the validation subnets, `VALIDATE_GROUP` at a time."""
    batch = device.params.batch_size
    table = ([it for a in plan.carriers for it in carrier_chain(a, space, batch)] if plan.carriers
             else [block_item(b, space, batch) for b in plan.blocks])
    null = overhead_item(device, space, plan)
    if null is not None:
        table.append(null)
    validation = [subnet_item(a, space, batch) for a in archs]
    return [table, *(validation[g:g + VALIDATE_GROUP] for g in range(0, len(validation), VALIDATE_GROUP))]


def _eta_warning(device: Device, t0: float, done: int, remaining: int) -> bool:
    if done < 8:
        return False
    eta = (time.monotonic() - t0) / done * max(remaining, 0)
    if eta > ETA_WARN_S:
        hint = ("set `lut_mode: sampled` on this device (or fewer `repeats`)" if device.params.lut_mode == "full"
                else "fewer `sample_subnets`, `validate_subnets` or `repeats`")
        converts = device.converts_files  # the first units pay the conversions
        log.warning("lut@%s: about %.0f min left (%d units of work)%s; for a smaller table: %s", device.name,
                    eta / 60, remaining, ", extrapolated from units that included converting, so an upper bound"
                    if converts else "", hint)
        return True
    return False


@dataclass(frozen=True)
class _Remeasured:
    predicted: np.ndarray
    raw: np.ndarray
    kinds: np.ndarray
    correction: Any
    details: dict[str, Any]


def remeasure_outliers(dev: Device, dp: DeviceParams, space: SearchSpace, archs: Sequence[Arch], raw: np.ndarray,
                        kinds: np.ndarray, overhead: float, measured: np.ndarray, resolutions: np.ndarray, stat: str,
                        retable: Callable[[Sequence[Arch]], tuple[np.ndarray, np.ndarray, int]],
                        passes: int = REMEASURE_PASSES) -> tuple[Any, float, int, int, int]:
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
    for _ in range(passes):
        bad = outliers(choice.predicted, measured)
        if not bad:
            break
        cancel.check(f"lut@{dp.name}: while re-measuring outliers, re-run to resume")
        slow = [i for i in bad if choice.predicted[i] < measured[i]]
        fast = [i for i in bad if choice.predicted[i] > measured[i]]
        log.info("lut@%s: %d validation subnet(s) off the table by more than %.0f%%: re-measuring %d, re-timing the "
                 "table units of %d", dp.name, len(bad), OUTLIER_TOLERANCE * 100, len(slow), len(fast))
        if slow:
            items = [subnet_item(archs[i], space, dp.batch_size) for i in slow]
            with quiet("evit.formats.onnx"), torch_threads(dp.threads):
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


def remeasure_table(dev: Device, space: SearchSpace, plan: Plan, archs: Sequence[Arch],
                     entries: dict[str, dict[str, Any]], stat: str) -> int:
    """Re-time the table units (carriers, or single blocks) holding the blocks of `archs`;
    an entry takes the new estimate only when lower. Returns how many entries were lowered."""
    dp = dev.params
    batch = dp.batch_size
    keys = {b.key for a in archs for b in arch_blocks(a, space)}
    fresh: dict[str, list[float]] = {}
    null = overhead_item(dev, space, plan)
    with quiet("evit.formats.onnx"), torch_threads(dp.threads):
        if plan.carriers:
            carriers = [c for c in plan.carriers if keys & {b.key for b in arch_blocks(c, space)}]
            for g in range(0, len(carriers), CHAIN_GROUP):
                cancel.check(f"lut@{dp.name}: while re-timing table entries, re-run to resume")
                group = carriers[g:g + CHAIN_GROUP]
                chains, chain_keys = [], []
                for arch in group:
                    chains.append(carrier_chain(arch, space, batch) + ([null] if null else []))
                    chain_keys.append([b.key for b in arch_blocks(arch, space)])
                for ks, ms in zip(chain_keys, dev.measure_chains(chains)):
                    for k, m in zip(ks, ms):
                        if k in keys:
                            fresh.setdefault(k, []).extend(m.samples)
        else:
            blocks = [b for b in plan.blocks if b.key in keys]
            for b, m in zip(blocks, dev.measure_many([block_item(b, space, batch) for b in blocks])):
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


