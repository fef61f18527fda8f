"""Performance-aware sampling: the level walk of `complexity` plus one memory bank per level.

For each of a step's 3 level draws: with probability `exploit_p` and only while the
level's bank is more than half full, draw from the bank with softmax(score) (exploit);
otherwise explore: draw `explore_candidates` subnets in the level and keep the one the
preference rule (`evit.train.samplers.preference_diff`) likes best against an anchor (the
best entry of the lowest level's bank; the space's min subnet for the lowest level or
while that bank is empty). As in the reference, the rule only runs once the current
bank is at least half full; before that the first candidate is kept, so the banks fill
with a plain, diverse sample of the level. Only explored subnets are offered to a bank.

Two ways to keep the banks, one per sampler name:

- `elastic` follows the reference code (microsoft/Moonlit, ElasticViT `process.py`,
  `models/model.py`, `train_eval_supernet.py`):
  - exploit probability `exploit_p_start` (0.2), + `exploit_p_step` (0.15) every
    `exploit_p_every_epochs` (100) *absolute* epochs, bumped before epoch e when
    (e + 1) is a multiple: any run under 100 epochs stays at 0.2;
  - score = -CE with hard labels from a separate no-grad forward on the step's
    un-mixed batch, averaged over the global batch (train-mode BN, as the training
    forward). Without mixup and drop-path the training forward of an explored draw IS
    that forward (same weights, same batch, same mode), so its CE is reused instead of
    paying for a second pass (`scores_from_training`);
  - every entry of every bank is re-scored on one shared batch at each epoch start
    (the reference's `bank_loss_update` at batch 0), and the current level's whole bank
    at 1/4, 1/2 and 3/4 of each epoch when the step explored (`bank_arch_update(...,
    update_bank=True)`), so the scores a bank compares come from one batch and one
    moment;
  - capacity `bank_capacity` (150) per level, `bank_capacity_big` (50) from
    `bank_big_from_m` MFLOPs up (the reference's 500 on levels starting at 100; by
    default 5x the lowest level); a full bank replaces its worst entry if the newcomer
    scores higher. (The reference can hold an arch twice; here a re-explored arch
    refreshes its entry.)
- `elastic-compressed` is evit's earlier variant, made for short runs: the whole
  0.2 -> 0.95 ramp compressed into the run (`exploit_p_every` as a fraction of it),
  small banks (30), and scores ranked as an *advantage* over the level's min subnet
  measured in the same step (so scores from different batches and moments can be
  compared), refreshed whenever an entry is re-trained and, `rescore_per_epoch` times
  per epoch, for the `rescore_entries` stalest entries of the current level against a
  fresh score of the min subnet on the same un-mixed batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evit.arch import Arch
from evit.space import SearchSpace
from evit.train.banks import BankEntry, MemoryBank
from evit.train.samplers import (
    LEVEL_SUBNETS,
    ComplexitySampler,
    Draw,
    LevelSamplerLike,
    preference_diff,
)

REFERENCE_BIG_BANK_RATIO = 5.0
"""The reference's big banks start at 500 MFLOPs on levels that start at 100."""


@dataclass(frozen=True)
class ElasticSettings:
    """The reference's bank rules (`elastic`)."""

    bank_capacity: int = 150
    bank_capacity_big: int = 50
    bank_big_from_m: float | None = None
    """Levels from this many MFLOPs on get `bank_capacity_big`; None: 5x the lowest level."""
    exploit_p_start: float = 0.2
    exploit_p_step: float = 0.15
    exploit_p_every_epochs: int = 100
    explore_candidates: int = 5


@dataclass(frozen=True)
class CompressedSettings:
    """evit's earlier, short-run bank rules (`elastic-compressed`)."""

    bank_capacity: int = 30
    exploit_p_start: float = 0.2
    exploit_p_step: float = 0.15
    exploit_p_every: float = 1 / 6
    """Fraction of the run after which the exploit probability grows by `exploit_p_step`."""
    explore_candidates: int = 5
    rescore_per_epoch: int = 2
    rescore_entries: int = 3


def bank_capacities(levels: Sequence[float], settings: ElasticSettings) -> list[int]:
    """Per level: the reference's 150 below its big-bank threshold, 50 from it on."""
    if not levels:
        return []
    big_from = settings.bank_big_from_m
    if big_from is None:
        big_from = REFERENCE_BIG_BANK_RATIO * min(levels)
    return [settings.bank_capacity_big if lv >= big_from else settings.bank_capacity for lv in levels]


def quarter_positions(steps_per_epoch: int) -> set[int]:
    """Batch indices at 1/4, 1/2, 3/4 of an epoch, as the reference's `bank_update_steps`."""
    q = steps_per_epoch // 4
    return {k * q - 1 for k in (1, 2, 3)} if q > 0 else set()


def spread_positions(steps_per_epoch: int, times: int) -> set[int]:
    """`times` batch indices spread over an epoch (the last one at its end)."""
    if times <= 0:
        return set()
    return {max(0, math.ceil(steps_per_epoch * (j + 1) / times) - 1) for j in range(times)}


class BankedSampler(ComplexitySampler):
    """What both bank variants share: exploit/explore per draw, the anchor, the state."""

    def __init__(self, space: SearchSpace, seed: int, level_sampler: LevelSamplerLike,
                 capacities: Sequence[int], explore_candidates: int, shared_min_levels: Sequence[int] = ()) -> None:
        super().__init__(space, seed, level_sampler, shared_min_levels)
        self.capacities = list(capacities)
        self.explore_candidates = explore_candidates
        self._banks = {i: MemoryBank(c) for i, c in enumerate(self.capacities)}
        self._explored: dict[str, Arch] = {}
        """Role -> arch of the current step's explored draws (only those are offered to a bank)."""
        self._p = 0.0

    @property
    def banks(self) -> dict[int, MemoryBank]:
        return self._banks

    def exploit_p(self, step_idx: int) -> float:
        raise NotImplementedError

    def anchor(self, level: int) -> Arch:
        best = self._banks[0].best() if level > 0 else None
        return best if best is not None else self.space.smallest()

    def explore(self, level: int) -> Arch:
        bank = self._banks[level]
        first = self.level_sampler.sample(level, self.rng)
        if not bank.at_least_half_full() or self.explore_candidates <= 1:
            return first
        anchor = self.anchor(level)
        candidates = [first, *(self.level_sampler.sample(level, self.rng) for _ in range(self.explore_candidates - 1))]
        diffs = [preference_diff(c, anchor, self.space) for c in candidates]
        return candidates[diffs.index(min(diffs))]

    def level_draw(self, level: int, i: int) -> Draw:
        role = f"level{i}"
        bank = self._banks[level]
        if self.rng.random() < self._p and bank.more_than_half_full():
            arch = bank.draw(self.rng)
        else:
            arch = self.explore(level)
            self._explored[role] = arch
        return Draw(role, arch, False, level)

    def step(self, step_idx: int) -> list[Draw]:
        self._p = self.exploit_p(step_idx)
        self._explored = {}
        return super().step(step_idx)

    def stats(self, step_idx: int) -> dict[str, float]:
        fill = [len(b) / b.capacity for b in self._banks.values()]
        return {"exploit_p": self.exploit_p(step_idx), "bank_fill": sum(fill) / max(1, len(fill)),
                "exploited": float(LEVEL_SUBNETS - len(self._explored))}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "banks": {str(lv): b.to_list() for lv, b in self._banks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._banks = {i: MemoryBank.from_list(cap, state["banks"].get(str(i), []))
                       for i, cap in enumerate(self.capacities)}


class ElasticSampler(BankedSampler):
    """The reference's performance-aware sampling (see the module docstring)."""

    name = "elastic"

    def __init__(self, space: SearchSpace, seed: int, level_sampler: LevelSamplerLike, steps_per_epoch: int,
                 settings: ElasticSettings = ElasticSettings(), shared_min_levels: Sequence[int] = ()) -> None:
        super().__init__(space, seed, level_sampler, bank_capacities(space.levels, settings),
                         settings.explore_candidates, shared_min_levels)
        self.settings = settings
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.quarters = quarter_positions(self.steps_per_epoch)

    def exploit_p(self, step_idx: int) -> float:
        s = self.settings
        epoch = step_idx // self.steps_per_epoch
        return min(1.0, s.exploit_p_start + s.exploit_p_step * ((epoch + 1) // s.exploit_p_every_epochs))

    def rescored_levels(self, step_idx: int) -> list[int]:
        """Banks re-scored this step: all at an epoch start, the current one at the quarters."""
        b = step_idx % self.steps_per_epoch
        if b == 0 and len(self._banks) > 1:
            return sorted(self._banks)
        if b in self.quarters and self._explored:
            return [self.level]
        return []

    def to_score(self, step_idx: int) -> list[Arch]:
        wanted = [a for lv in self.rescored_levels(step_idx) for a in self._banks[lv].entries]
        if not self.scores_from_training:
            wanted += self._explored.values()
        return list(dict.fromkeys(wanted))

    def observe(self, step_idx: int, results: Sequence[tuple[Draw, float]],
                fresh: Mapping[Arch, float] | None = None) -> None:
        fresh = fresh or {}
        for lv in self.rescored_levels(step_idx):
            for arch in self._banks[lv].entries:
                self._banks[lv].entries[arch] = _entry(-fresh[arch], step_idx)
        trained = {d.arch: ce for d, ce in results}
        for arch in self._explored.values():
            ce = fresh[arch] if not self.scores_from_training else trained[arch]
            self._banks[self.level].offer(arch, _entry(-ce, step_idx))


def _entry(score: float, step: int) -> BankEntry:
    """The reference ranks by the raw score (advantage = score: no reference subnet)."""
    return BankEntry(score, score, step)


class CompressedElasticSampler(BankedSampler):
    """evit's earlier short-run variant (see the module docstring)."""

    name = "elastic-compressed"

    def __init__(self, space: SearchSpace, seed: int, level_sampler: LevelSamplerLike, steps_per_epoch: int,
                 total_steps: int, settings: CompressedSettings = CompressedSettings(),
                 shared_min_levels: Sequence[int] = ()) -> None:
        super().__init__(space, seed, level_sampler, [settings.bank_capacity] * len(space.levels),
                         settings.explore_candidates, shared_min_levels)
        self.settings = settings
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total_steps = max(1, total_steps)
        self.rescore_at = spread_positions(self.steps_per_epoch, settings.rescore_per_epoch)
        self.baseline: dict[int, float] = {}
        """Per level: the latest -CE of its min subnet, the reference point of the advantages."""

    def exploit_p(self, step_idx: int) -> float:
        s = self.settings
        bumps = math.floor(step_idx / (s.exploit_p_every * self.total_steps) + 1e-9)
        return min(1.0, s.exploit_p_start + s.exploit_p_step * bumps)

    def stale_entries(self) -> list[Arch]:
        entries = self._banks[self.level].entries
        return sorted(entries, key=lambda a: entries[a].step)[:self.settings.rescore_entries]

    def to_score(self, step_idx: int) -> list[Arch]:
        if step_idx % self.steps_per_epoch not in self.rescore_at:
            return []
        stale = self.stale_entries()
        # the min subnet on the same clean batch: the training CE of the min may come from a mixed one
        return list(dict.fromkeys([*stale, self.min_arch(self.level)])) if stale else []

    def observe(self, step_idx: int, results: Sequence[tuple[Draw, float]],
                fresh: Mapping[Arch, float] | None = None) -> None:
        level_results = [(d, ce) for d, ce in results if not d.distill and d.level is not None]
        if not level_results:
            return
        level = self.level
        refs = [ce for d, ce in results if d.distill and d.level == level]
        # the min subnet, trained in this same step (fallback: the level draws' mean)
        base = -refs[0] if refs else -sum(ce for _, ce in level_results) / len(level_results)
        self.baseline[level] = base
        bank = self._banks[level]
        explored = set(self._explored)
        for draw, ce in level_results:
            entry = BankEntry(-ce, -ce - base, step_idx)
            if draw.arch in bank:
                bank.entries[draw.arch] = entry  # refresh a re-trained entry (exploit or re-draw)
            elif draw.role in explored:
                bank.offer(draw.arch, entry)
        if fresh:
            clean_base = -fresh[self.min_arch(level)]
            for arch, ce in fresh.items():
                if arch in bank:
                    bank.entries[arch] = BankEntry(-ce, -ce - clean_base, step_idx)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "baseline": {str(lv): v for lv, v in self.baseline.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.baseline = {int(k): float(v) for k, v in state["baseline"].items()}
