"""What a device's latency table will measure: the plan, and what a partial build is keyed on.

- `plan_lut`: every unique block the search space can produce (`coverage.unique_blocks`,
  derived from the space's choices), or in `lut_mode: sampled` the blocks of
  `sample_subnets` subnets across the FLOPs levels. A full table larger than
  `max_entries` is refused with the count and the way out (sampled mode). Devices that
  run modules in process time the blocks *in context*, inside "carrier" subnets
  (`coverage.covering_archs`: few valid archs that together contain every block).
- `plan_budget` (`lut.device_minutes`): what fits a device-time budget, from a short
  timing probe (`Probe`): whole validation subnets (up to `BUDGET_VALIDATION_SHARE` of the
  budget, at least `MIN_VALIDATE`), then carrier subnets chosen greedily for the block
  kinds and sizes they add per second of device time; the blocks they hold are measured,
  the rest predicted (from a prior device's table, or the per-kind regression).
- `fingerprint`: what measurements depend on (device settings, host, versions, space);
  a partial table is resumed only while all of it still matches.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from evit.arch import Arch
from evit.blocks import Block, arch_blocks
from evit.config import DeviceParams
from evit.errors import LUTError
from evit.flops import flops_m
from evit.latency.coverage import count_by_kind, covering_archs, sample_subnets, sampled_blocks, unique_blocks
from evit.latency.devices import Device, split_repeats
from evit.latency.lut import FORMAT
from evit.space import SearchSpace


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


BUDGET_VALIDATION_SHARE = 0.35
"""Share of a device-time budget (after the probe) for whole validation subnets."""
MIN_VALIDATE = 10
"""Fewest validation subnets a budgeted table fits its correction on (the `validate_subnets` minimum)."""
CANDIDATES = 600
"""Level-spread subnets the budget planner chooses its carriers from."""
MIN_SAMPLE_MS = 0.5
"""A timed sample of a module alone lasts at least this long (`Device.measure_many`)."""


@dataclass(frozen=True)
class Probe:
    """What a short timing probe says about a device (`evit.latency.measure.probe_device`).

    One end-to-end run of a subnet takes about `c0_ms + c1_ms * MFLOPs`; one pass over a
    carrier chain (every block timed on its own, in context) `chain_factor` times that;
    an external runner's invocation about `call_s` seconds. `seconds`: device time it took.
    """

    c0_ms: float
    c1_ms: float
    chain_factor: float
    call_s: float
    seconds: float

    def run_ms(self, mflops: float) -> float:
        return max(self.c0_ms + self.c1_ms * mflops, 1e-3)

    def to_dict(self) -> dict[str, float]:
        return {k: round(float(v), 6) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class BudgetPlan:
    plan: Plan
    validation: list[Arch]
    expected_s: dict[str, float]
    """Expected device seconds: probe, table, validation, total."""
    budget_s: float
    unit_s: dict[str, float]
    """Expected device seconds of each table unit (`Plan.units` names), for `measure.Deadline`."""


def rounds_plan(dp: DeviceParams, in_process: bool = True) -> tuple[list[int], int]:
    """Samples per round and untimed warm-up runs per round (one round for external runners).

    One rule for both the measuring (`measure.measure_all`) and the budget's estimate of it.
    """
    if not in_process:
        return [dp.repeats], dp.warmup
    per_round = split_repeats(dp.repeats, dp.rounds)
    return per_round, -(-dp.warmup // len(per_round))


def _passes(dp: DeviceParams) -> tuple[int, int]:
    """(passes of one carrier chain, runs of one end-to-end subnet) over a whole build."""
    per_round, warm = rounds_plan(dp)
    rounds = len(per_round)
    return rounds * (warm + 1) + dp.repeats, rounds * max(warm, 1) + dp.repeats


def plan_budget(space: SearchSpace, dp: DeviceParams, probe: Probe, *, in_context: bool) -> BudgetPlan:
    """What to measure within `dp.lut.device_minutes` of device time (module docstring).

    LUTError (one line, before anything else is timed) when the budget cannot hold the
    probe, `MIN_VALIDATE` validation subnets and one carrier (which holds every block kind).
    """
    assert dp.lut.device_minutes is not None
    budget = dp.lut.device_minutes * 60.0
    chain_passes, e2e_runs = _passes(dp)

    def e2e_s(a: Arch) -> float:
        if not in_context:
            return probe.call_s
        return e2e_runs * max(probe.run_ms(flops_m(a, space)), MIN_SAMPLE_MS) / 1e3

    def carrier_s(a: Arch) -> float:
        return chain_passes * probe.run_ms(flops_m(a, space)) * probe.chain_factor / 1e3

    pool = sample_subnets(space, max(dp.validate_subnets, MIN_VALIDATE), random.Random(f"lut-validate-{dp.seed}"))
    left = budget - probe.seconds
    validation: list[Arch] = []
    spent_v = 0.0
    for a in pool:
        cost = e2e_s(a)
        if len(validation) >= MIN_VALIDATE and spent_v + cost > BUDGET_VALIDATION_SHARE * left:
            break
        validation.append(a)
        spent_v += cost
    left -= spent_v
    drawn = sample_subnets(space, CANDIDATES, random.Random(f"lut-carriers-{dp.seed}"))
    held = set(validation)
    candidates = [a for a in drawn if a not in held] or drawn  # a tiny space may have no other subnet

    holds = {a: set(arch_blocks(a, space)) for a in candidates}
    sizes = {a: {(b.kind, b.h, b.c_out) for b in bs} for a, bs in holds.items()}
    covered: set[tuple[str, int, int]] = set()
    blocks: set[Block] = set()
    chosen: list[Arch] = []
    unit_s: dict[str, float] = {}
    spent_t = 0.0
    first_cost = None
    todo = list(candidates)
    while todo:
        def unit_cost(a: Arch, have: set[Block] = blocks) -> float:
            if in_context:
                return carrier_s(a)
            return probe.call_s * len(holds[a] - have)

        # new block kinds/sizes first, then any new block (a size already seen with other choices)
        scored = [((10 * len(sizes[a] - covered) + len(holds[a] - blocks)) / max(unit_cost(a), 1e-9), -i, a)
                  for i, a in enumerate(todo)]
        gain, _, best = max(scored)
        cost = unit_cost(best)
        if first_cost is None:
            first_cost = cost
        if spent_t + cost > left:
            todo.remove(best)
            if not chosen:
                break
            continue
        if gain <= 0 and chosen:
            break
        chosen.append(best)
        if in_context:
            unit_s[f"carrier|{best.key}"] = cost
        else:
            for b in holds[best] - blocks:
                unit_s[f"block|{b.key}"] = probe.call_s
        covered |= sizes[best]
        blocks |= holds[best]
        spent_t += cost
        todo.remove(best)
    if not chosen:
        need = probe.seconds + spent_v + (first_cost or 0.0)
        raise LUTError(
            f"device '{dp.name}': lut.device_minutes={dp.lut.device_minutes:g} cannot cover the block kinds of the "
            f"'{space.name}' space: the probe ({probe.seconds:.1f} s), {len(validation)} validation subnets "
            f"({spent_v:.1f} s) and one carrier subnet ({first_cost or 0:.1f} s) need about {need:.1f} s; "
            f"raise device_minutes to at least {math.ceil(need / 0.6) / 100:g} or lower repeats/warmup")
    plan = Plan("budget", sorted(blocks), chosen if in_context else [])
    expected = {"probe": round(probe.seconds, 1), "table": round(spent_t, 1), "validation": round(spent_v, 1),
                "total": round(probe.seconds + spent_t + spent_v, 1)}
    return BudgetPlan(plan, validation, expected, budget, unit_s)


def fingerprint(dp: DeviceParams, device: Device, space: SearchSpace, plan: Plan) -> dict[str, Any]:
    """What measurements depend on; a partial table is resumed only if all of it still matches."""
    settings = dp.model_dump(mode="json")
    for k in ("name", "budgets_ms", "validate_subnets", "command_timeout_s", "convert_jobs"):
        settings.pop(k, None)
    settings.pop("lut", None)  # budget and prior change what is measured, not how: samples stay valid
    if settings.get("precision") == "fp32":  # the default: fp32 tables built before `precision` existed still match
        settings.pop("precision")
    desc = device.describe()
    host = {k: desc.get(k) for k in ("hostname", "cpu", "torch", "onnxruntime", "gpu", "cuda", "clock", "executorch",
                                     "ai-edge-litert") if k in desc or k not in ("executorch", "ai-edge-litert")}
    in_context = bool(plan.carriers) or (plan.mode == "budget" and device.in_process)
    return {"format": FORMAT, "device": settings, "host": host, "space": space.structure_dict(),
            "opset": device.opset, "method": "in-context" if in_context else "isolated"}
