"""Where a search starts: the FLOPs level that matches a budget, its bank, random proposals.

The spec seeds the first population from the memory bank of the level being searched.
A latency budget is not a FLOPs level, so we map it: for every level, take the bank's
subnets (or, for a level with an empty bank, a few subnets drawn in that level), compute
the budget's metric (predicted latency, or FLOPs for a FLOPs budget) and pick the highest
level whose median fits the budget. Seeds are that level's bank entries, best score
first, then the next level's (whose lighter members often fit and are the strongest
candidates). Random members are drawn from the levels up to one above the matched level,
mixed half-and-half with uniform draws over the whole space, and must pass the
constraint like every other member.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from evit.arch import Arch
from evit.space import SearchSpace

Metric = Callable[[Sequence[Arch]], list[float]]
Banks = Mapping[int, Sequence[tuple[Arch, float]]]


@dataclass(frozen=True)
class Seeding:
    level: int | None
    seeds: list[Arch]
    level_medians: dict[int, float]


def _level_samples(sampler: object, level: int, rng: random.Random, n: int) -> list[Arch]:
    out = []
    for _ in range(n):
        try:
            out.append(sampler.sample(level, rng))  # type: ignore[attr-defined]
        except (ValueError, RuntimeError):
            break
    return out


def match_level(
    space: SearchSpace,
    banks: Banks,
    metric: Metric,
    budget: float,
    rng: random.Random,
    sampler: object | None,
    probe: int = 12,
) -> Seeding:
    """The level whose subnets best fill `budget`, and the bank seeds for it."""
    medians: dict[int, float] = {}
    for level in range(len(space.levels)):
        archs = [a for a, _ in banks.get(level, ())]
        if not archs and sampler is not None:
            archs = _level_samples(sampler, level, rng, probe)
        if archs:
            medians[level] = float(statistics.median(metric(archs)))
    fitting = [lv for lv, m in medians.items() if m <= budget]
    if fitting:
        level: int | None = max(fitting)
    elif medians:
        level = min(medians)
    else:
        level = None
    seeds: list[Arch] = []
    if level is not None:
        for lv in (level, level + 1):
            entries = sorted(banks.get(lv, ()), key=lambda e: (-e[1], e[0].key))
            seeds.extend(a for a, _ in entries)
    return Seeding(level=level, seeds=list(dict.fromkeys(seeds)), level_medians=medians)


def proposal(space: SearchSpace, sampler: object | None, levels: Sequence[int]) -> Callable[[random.Random], Arch]:
    """Random member generator: half level-sampled (levels given), half uniform."""
    levels = list(levels)

    def draw(rng: random.Random) -> Arch:
        if sampler is not None and levels and rng.random() < 0.5:
            try:
                return sampler.sample(rng.choice(levels), rng)  # type: ignore[attr-defined]
            except (ValueError, RuntimeError):
                pass
        return space.sample_uniform(rng)

    return draw
