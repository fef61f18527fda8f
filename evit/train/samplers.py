"""Which subnets a training step trains: the three samplers behind one interface.

    sampler = make_sampler(params.train, space, total_steps)
    draws = sampler.step(step_idx)          # [Draw(role, arch, distill, level), ...]
    ... forward/backward every draw ...
    sampler.observe(step_idx, [(draw, hard_ce), ...])

- `uniform`: the sandwich rule (largest + smallest + 2 uniform subnets per step); the
  largest learns from the labels (or the teacher), the others by in-place distillation
  from the largest. The baseline the paper improves on.
- `complexity`: complexity-aware sampling. A level index walks by -1/0/+1 per step
  (uniform among the moves that stay in range; at either end staying is twice as
  likely, as in the reference's `get_bank_id`); each step trains 3 subnets drawn in
  the current level plus that level's min subnet (distilled from the mean of the 3).
- `elastic` (default): complexity-aware + performance-aware sampling with one memory
  bank of (arch, score) per level (see `evit.train.banks.MemoryBank` and `ElasticSampler`).
- `flat` (an ablation control, not a method): exactly `complexity`'s step structure
  and losses (3 subnets learn from the labels/teacher, a min subnet is distilled from
  their detached mean), but the 3 are drawn uniformly over the WHOLE space and the min
  is the space's smallest subnet (one "level" spanning everything, no walk). `uniform`
  vs `flat` isolates the losses (sandwich in-place distillation from the largest vs
  3 supervised + mean-distilled min); `flat` vs `complexity` isolates the sampling.

Every draw comes from the sampler's own `random.Random` streams, seeded from
`train.seed` alone: every DDP rank draws the same subnets, and nothing rank-dependent
(data, losses) reaches the streams. Bank scores do depend on data, so the training loop
all-reduces them before `observe` (the banks stay identical on all ranks). The level
walk has its own stream, so `complexity` and `elastic` visit the same levels at the same
steps for one seed (their step times and ablations compare like with like).

Scores and staleness (our choice; the reference spends extra forward passes instead):
- score = -CE of the subnet on its training batch with hard labels, taken from the
  logits the training forward already computed (no extra pass). Under mixup the hard
  target is the unsmoothed mixed one-hot; with a teacher it is still the label.
- Raw -CE is not comparable across time or batches: the loss of every subnet falls as
  training goes on (raw replace-worst would evict old entries for being old, not for
  being worse, and softmax draws would favour recent entries), and a hard batch lowers
  every score of its step. So a bank ranks entries by their *advantage*: the score
  minus the score of the level's reference subnet measured in the same step. The
  reference is the level's min subnet, which every step at that level trains anyway
  (on the same batch, with the same weights, hard-label CE from its own training
  logits). Training progress, batch difficulty and the exploit/explore mix of the step
  all cancel in that paired difference; what is left is how much better the subnet is
  than its level's fixed reference. (A mean over the step's level draws would not do:
  exploited draws are the bank's best, so that mean would rise with the exploit
  probability and penalise later entries.) Softmax is shift-invariant, so
  softmax(advantage) equals softmax over scores moved to "now" (advantage + the
  level's latest reference score, which is what the banks export as the score).
- Freshness: an entry's advantage is re-measured whenever that arch is trained again
  (every exploit draw does it for free), and `rescore_per_epoch` times per epoch the
  loop re-measures the `rescore_entries` stalest entries of the current level on the
  step's batch with the step's weights (a few forward passes, no backward;
  `stale_entries` / `rescore`), against the same step's reference.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

from evit import flops
from evit.arch import Arch, MBStage
from evit.space import SearchSpace
from evit.train.banks import BankEntry, MemoryBank

SAMPLERS = ("uniform", "flat", "complexity", "elastic")
LEVEL_SUBNETS = 3
"""Subnets drawn per step in the current level (the spec's 3), besides the level's min."""


class LevelSamplerLike(Protocol):
    def sample(self, level: int, rng: random.Random) -> Arch: ...

    def min_arch(self, level: int) -> Arch: ...


class Draw(NamedTuple):
    """One subnet to train in a step.

    role: "max" | "min" | "rand<i>" | "level<i>"; distill: trained against the detached
    mean prediction of the step's non-distilled draws (which always come first) instead
    of the labels/teacher; level: the FLOPs level the sampler drew it for (None: uniform).
    """

    role: str
    arch: Arch
    distill: bool
    level: int | None


# --- helpers shared by the samplers -------------------------------------------------------------

def _rng_state(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: Sequence[Any]) -> None:
    version, internal, gauss = state
    rng.setstate((int(version), tuple(int(v) for v in internal), gauss))


def walk_level(level: int, n_levels: int, rng: random.Random) -> int:
    """One step of the level walk: -1/0/+1, uniform among moves in range, ends stay 2x likely."""
    if n_levels <= 1:
        return 0
    if level <= 0:
        moves = (0, 0, 1)
    elif level >= n_levels - 1:
        moves = (-1, 0, 0)
    else:
        moves = (-1, 0, 1)
    return level + rng.choice(moves)


def with_transformer(arch: Arch, donor: Arch, field_name: str) -> Arch:
    """`arch` with `donor`'s `field_name` ("width" or "depth") in every transformer stage."""
    stages = tuple(
        st if isinstance(st, MBStage) else replace(st, **{field_name: getattr(d, field_name)})
        for st, d in zip(arch.stages, donor.stages, strict=True)
    )
    return replace(arch, stages=stages)


def preference_diff(candidate: Arch, anchor: Arch, space: SearchSpace) -> float:
    """The reference's preference rule; smaller is preferred.

    FLOPs(candidate with the anchor's transformer widths) - FLOPs(candidate with the
    anchor's transformer depths). A wide, shallow candidate loses many FLOPs when it
    takes the (narrow) anchor's widths and few when it takes the anchor's depths, so
    the difference is small (negative): the rule prefers wider, shallower transformer
    stages at equal FLOPs. The hybrids may break the width rule between stages; the
    counter does not care, as in the reference.
    """
    wide = flops.flops_m(with_transformer(candidate, anchor, "width"), space)
    deep = flops.flops_m(with_transformer(candidate, anchor, "depth"), space)
    return wide - deep


# --- the interface -------------------------------------------------------------------------------

class SubnetSampler(ABC):
    """Chooses the subnets of every training step; state round-trips through `state_dict`."""

    name: str = ""

    def __init__(self, space: SearchSpace, seed: int) -> None:
        self.space = space
        self.seed = seed
        self.rng = random.Random(f"evit-sampler-draw:{seed}")

    @abstractmethod
    def step(self, step_idx: int) -> list[Draw]:
        """The draws of step `step_idx`; non-distilled draws first."""

    def observe(self, step_idx: int, results: Sequence[tuple[Draw, float]]) -> None:
        """Per-draw hard-label CE of the step just trained (identical on every rank)."""

    @property
    def banks(self) -> dict[int, MemoryBank]:
        return {}

    def stale_entries(self, level: int | None, k: int) -> list[Arch]:
        """Up to `k` bank entries of `level`, stalest first (none for bankless samplers)."""
        return []

    def rescore(self, step_idx: int, level: int, arch: Arch, hard_ce: float) -> None:
        """A fresh measurement of a bank entry (see the module docstring)."""

    def stats(self, step_idx: int) -> dict[str, float]:
        """Scalars worth logging for this step (exploit probability, bank fill...)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"sampler state is for {state.get('name')!r}, not {self.name!r}")
        _set_rng_state(self.rng, state["rng"])


class UniformSampler(SubnetSampler):
    """Sandwich rule: largest (labels/teacher) + smallest + 2 uniform, distilled from the largest."""

    name = "uniform"

    def step(self, step_idx: int) -> list[Draw]:
        return [
            Draw("max", self.space.largest(), False, None),
            Draw("min", self.space.smallest(), True, None),
            *(Draw(f"rand{i}", self.space.sample_uniform(self.rng), True, None) for i in range(2)),
        ]


class FlatSampler(SubnetSampler):
    """Ablation control: complexity's step (3 supervised + distilled min), draws over the whole space.

    Same roles and losses as `ComplexitySampler` with `rand<i>` for the 3 supervised
    draws (they are uniform over the space, not level draws); the distilled `min` is the
    space's smallest subnet, the min of the one region the draws come from.
    """

    name = "flat"

    def step(self, step_idx: int) -> list[Draw]:
        draws = [Draw(f"rand{i}", self.space.sample_uniform(self.rng), False, None) for i in range(LEVEL_SUBNETS)]
        draws.append(Draw("min", self.space.smallest(), True, None))
        return draws


class ComplexitySampler(SubnetSampler):
    """Level walk; 3 subnets in the current level + the level's min subnet; no largest."""

    name = "complexity"

    def __init__(self, space: SearchSpace, seed: int, level_sampler: LevelSamplerLike) -> None:
        super().__init__(space, seed)
        if not space.levels:
            raise ValueError(f"space '{space.name}' has no FLOPs levels; the '{self.name}' sampler needs them")
        self.level_sampler = level_sampler
        self.walk_rng = random.Random(f"evit-sampler-walk:{seed}")
        self.level = 0
        """Level of the last step (the reference starts its walk at level 0)."""

    def next_level(self) -> int:
        self.level = walk_level(self.level, len(self.space.levels), self.walk_rng)
        return self.level

    def level_draw(self, level: int, i: int) -> Draw:
        return Draw(f"level{i}", self.level_sampler.sample(level, self.rng), False, level)

    def step(self, step_idx: int) -> list[Draw]:
        level = self.next_level()
        draws = [self.level_draw(level, i) for i in range(LEVEL_SUBNETS)]
        draws.append(Draw("min", self.level_sampler.min_arch(level), True, level))
        return draws

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "walk_rng": _rng_state(self.walk_rng), "level": self.level}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        _set_rng_state(self.walk_rng, state["walk_rng"])
        self.level = int(state["level"])


@dataclass(frozen=True)
class ElasticSettings:
    bank_capacity: int = 30
    exploit_p_start: float = 0.2
    exploit_p_step: float = 0.15
    exploit_p_every: float = 1 / 6
    explore_candidates: int = 5


class ElasticSampler(ComplexitySampler):
    """Complexity-aware walk + per-level memory banks (performance-aware sampling).

    For each of the 3 level draws: with probability `exploit_p(step)` and only while the
    level's bank is more than half full, draw from the bank with softmax(score)
    (exploit); otherwise explore: draw `explore_candidates` subnets in the level and keep
    the one the preference rule likes best against the anchor (the best subnet of the
    lowest level's bank; the lowest level's min subnet while that bank is empty, or when
    the current level is the lowest). As in the reference, the rule only runs once the
    current bank is at least half full; before that the first candidate is kept, so the
    banks fill with a plain, diverse sample of the level.
    """

    name = "elastic"

    def __init__(self, space: SearchSpace, seed: int, level_sampler: LevelSamplerLike, total_steps: int,
                 settings: ElasticSettings = ElasticSettings()) -> None:
        super().__init__(space, seed, level_sampler)
        self.settings = settings
        self.total_steps = max(1, total_steps)
        self._banks = {i: MemoryBank(settings.bank_capacity) for i in range(len(space.levels))}
        self.baseline: dict[int, float] = {}
        """Per level: the latest -CE of its reference (min) subnet (see the module docstring)."""
        self._reference: tuple[int, int, float] = (-1, -1, 0.0)
        """(step, level, reference score) of the last observed step, for `rescore` in that step."""
        self._explored: set[str] = set()
        """Roles of the current step that were explored (only those are offered to the bank)."""
        self._p = 0.0

    @property
    def banks(self) -> dict[int, MemoryBank]:
        return self._banks

    def exploit_p(self, step_idx: int) -> float:
        s = self.settings
        bumps = math.floor(step_idx / (s.exploit_p_every * self.total_steps) + 1e-9)
        return min(1.0, s.exploit_p_start + s.exploit_p_step * bumps)

    def anchor(self, level: int) -> Arch:
        best = self._banks[0].best() if level > 0 else None
        return best if best is not None else self.level_sampler.min_arch(0)

    def explore(self, level: int) -> Arch:
        bank = self._banks[level]
        first = self.level_sampler.sample(level, self.rng)
        if not bank.at_least_half_full() or self.settings.explore_candidates <= 1:
            return first
        anchor = self.anchor(level)
        candidates = [first, *(self.level_sampler.sample(level, self.rng)
                               for _ in range(self.settings.explore_candidates - 1))]
        diffs = [preference_diff(c, anchor, self.space) for c in candidates]
        return candidates[diffs.index(min(diffs))]

    def level_draw(self, level: int, i: int) -> Draw:
        role = f"level{i}"
        bank = self._banks[level]
        exploit = self.rng.random() < self._p and bank.more_than_half_full()
        if exploit:
            arch = bank.draw(self.rng)
            self._explored.discard(role)
        else:
            arch = self.explore(level)
            self._explored.add(role)
        return Draw(role, arch, False, level)

    def step(self, step_idx: int) -> list[Draw]:
        self._p = self.exploit_p(step_idx)
        self._explored = set()
        return super().step(step_idx)

    def observe(self, step_idx: int, results: Sequence[tuple[Draw, float]]) -> None:
        level_results = [(d, ce) for d, ce in results if not d.distill and d.level is not None]
        if not level_results:
            return
        level = level_results[0][0].level
        assert level is not None
        refs = [ce for d, ce in results if d.distill and d.level == level]
        # the level's min subnet, trained in this same step (fallback: the level draws' mean)
        base = -refs[0] if refs else -sum(ce for _, ce in level_results) / len(level_results)
        self.baseline[level] = base
        self._reference = (step_idx, level, base)
        bank = self._banks[level]
        for draw, ce in level_results:
            entry = BankEntry(-ce, -ce - base, step_idx)
            if draw.arch in bank:
                bank.entries[draw.arch] = entry  # refresh a re-trained entry (exploit or re-draw)
            elif draw.role in self._explored:
                bank.offer(draw.arch, entry)

    def stale_entries(self, level: int | None, k: int) -> list[Arch]:
        if level is None or k <= 0:
            return []
        entries = self._banks[level].entries
        return sorted(entries, key=lambda a: entries[a].step)[:k]

    def rescore(self, step_idx: int, level: int, arch: Arch, hard_ce: float) -> None:
        bank = self._banks[level]
        if arch not in bank:
            return
        ref_step, ref_level, ref = self._reference
        base = ref if (ref_step, ref_level) == (step_idx, level) else self.baseline.get(level, -hard_ce)
        bank.entries[arch] = BankEntry(-hard_ce, -hard_ce - base, step_idx)

    def stats(self, step_idx: int) -> dict[str, float]:
        fill = [len(b) / b.capacity for b in self._banks.values()]
        return {"exploit_p": self.exploit_p(step_idx), "bank_fill": sum(fill) / max(1, len(fill)),
                "exploited": float(LEVEL_SUBNETS - len(self._explored))}

    def export_banks(self) -> dict[int, list[tuple[Arch, float]]]:
        """Per level: (arch, score moved to now = advantage + latest reference score), best first."""
        out: dict[int, list[tuple[Arch, float]]] = {}
        for lv, bank in self._banks.items():
            base = self.baseline.get(lv, 0.0)
            items = sorted(bank.entries.items(), key=lambda kv: -kv[1].advantage)
            out[lv] = [(a, e.advantage + base) for a, e in items]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(),
                "banks": {str(lv): b.to_list() for lv, b in self._banks.items()},
                "baseline": {str(lv): v for lv, v in self.baseline.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        cap = self.settings.bank_capacity
        self._banks = {i: MemoryBank.from_list(cap, state["banks"].get(str(i), [])) for i in range(len(self.space.levels))}
        self.baseline = {int(k): float(v) for k, v in state["baseline"].items()}


def make_sampler(name: str, space: SearchSpace, seed: int, total_steps: int,
                 settings: ElasticSettings = ElasticSettings(),
                 level_sampler: LevelSamplerLike | None = None) -> SubnetSampler:
    """The sampler `train.sampler` names, seeded by `seed` (the same on every rank)."""
    if name == "uniform":
        return UniformSampler(space, seed)
    if name == "flat":
        return FlatSampler(space, seed)
    if level_sampler is None:
        from evit.level_sampler import LevelSampler

        level_sampler = LevelSampler(space)
    if name == "complexity":
        return ComplexitySampler(space, seed, level_sampler)
    if name == "elastic":
        return ElasticSampler(space, seed, level_sampler, total_steps, settings)
    raise ValueError(f"unknown sampler {name!r}; accepted: {list(SAMPLERS)}")


def settings_from_params(train: Any) -> ElasticSettings:
    return ElasticSettings(bank_capacity=train.bank_capacity, exploit_p_start=train.exploit_p_start,
                           exploit_p_step=train.exploit_p_step, exploit_p_every=train.exploit_p_every,
                           explore_candidates=train.explore_candidates)
