"""Which subnets a training step trains: the interface and the bankless samplers.

    sampler = make_sampler(...)             # evit.train.sampler_factory
    draws = sampler.step(step_idx)          # [Draw(role, arch, distill, level), ...]
    ... forward/backward every draw ...
    wanted = sampler.to_score(step_idx)     # archs to score on the step's un-mixed batch
    sampler.observe(step_idx, [(draw, hard_ce), ...], {arch: hard_ce of wanted})

- `uniform`: the sandwich rule (largest + smallest + 2 uniform subnets per step); the
  largest learns from the labels (or the teacher), the others by in-place distillation
  from the largest. The baseline the paper improves on.
- `complexity`: complexity-aware sampling. A level index walks by -1/0/+1 per step
  (uniform among the moves that stay in range; at either end staying is twice as
  likely, as in the reference's `get_bank_id`); each step trains 3 subnets drawn in
  the current level plus a min subnet (distilled from the mean of the 3). Which min:
  the reference keeps 3 min subnets shared by groups of levels (`MinSubnets`).
- `elastic` / `elastic-compressed` (`evit.train.elastic`): complexity-aware +
  performance-aware sampling with one memory bank per level.
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
walk has its own stream, so `complexity` and the elastic samplers visit the same levels
at the same steps for one seed (their step times and ablations compare like with like).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, NamedTuple, Protocol

from evit import flops
from evit.arch import Arch, MBStage
from evit.space import SearchSpace
from evit.train.banks import MemoryBank

SAMPLERS = ("uniform", "flat", "complexity", "elastic", "elastic-compressed")
BANKED = ("elastic", "elastic-compressed")
"""The samplers with memory banks (their checkpoints hold banks; search can seed from them)."""
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
    scores_from_training: bool = False
    """Set by the loop when a draw's training forward equals a scoring forward (no mixup, no
    drop-path): a sampler may then take an explored draw's score from its training CE."""

    def __init__(self, space: SearchSpace, seed: int) -> None:
        self.space = space
        self.seed = seed
        self.rng = random.Random(f"evit-sampler-draw:{seed}")

    @abstractmethod
    def step(self, step_idx: int) -> list[Draw]:
        """The draws of step `step_idx`; non-distilled draws first."""

    def to_score(self, step_idx: int) -> list[Arch]:
        """Archs whose hard-label CE this step needs from a separate no-grad forward.

        Called after `step` and the step's backward passes, before the optimiser step
        (the weights the draws were trained with); the forward runs on the step's
        un-mixed batch (`evit.train.step.score_archs`). Bankless samplers need none.
        """
        return []

    def observe(self, step_idx: int, results: Sequence[tuple[Draw, float]],
                fresh: Mapping[Arch, float] | None = None) -> None:
        """Per-draw hard-label CE of the step just trained, and the CE of `to_score`'s archs.

        Both are global-batch means (identical on every rank).
        """

    @property
    def banks(self) -> dict[int, MemoryBank]:
        return {}

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


def shared_min_level(level: int, anchors: Sequence[int]) -> int:
    """The level whose min subnet `level` distils: the highest anchor at or below it.

    The reference keeps 3 min subnets (keys 200/400/800 MFLOPs) and gives each FLOPs
    target the one whose bucket holds it: on its levels [100, 200, 300, 400, 500, 700,
    900, 1200] that is {100, 200} -> the first, {300, 400} -> the second, the rest ->
    the third, i.e. anchors at level indices (0, 2, 4), each anchor's min being the
    smallest subnet of its group (below the other levels' windows). No anchors (or
    none at or below `level`): the level's own min.
    """
    below = [a for a in anchors if a <= level]
    return max(below) if below else level


class ComplexitySampler(SubnetSampler):
    """Level walk; 3 subnets in the current level + a min subnet (see `shared_min_level`); no largest."""

    name = "complexity"

    def __init__(self, space: SearchSpace, seed: int, level_sampler: LevelSamplerLike,
                 shared_min_levels: Sequence[int] = ()) -> None:
        super().__init__(space, seed)
        if not space.levels:
            raise ValueError(f"space '{space.name}' has no FLOPs levels; the '{self.name}' sampler needs them")
        self.level_sampler = level_sampler
        self.shared_min_levels = tuple(a for a in shared_min_levels if 0 <= a < len(space.levels))
        self.walk_rng = random.Random(f"evit-sampler-walk:{seed}")
        self.level = 0
        """Level of the last step (the reference starts its walk at level 0)."""

    def min_arch(self, level: int) -> Arch:
        """The min subnet that `level`'s steps distil."""
        return self.level_sampler.min_arch(shared_min_level(level, self.shared_min_levels))

    def next_level(self) -> int:
        self.level = walk_level(self.level, len(self.space.levels), self.walk_rng)
        return self.level

    def level_draw(self, level: int, i: int) -> Draw:
        return Draw(f"level{i}", self.level_sampler.sample(level, self.rng), False, level)

    def step(self, step_idx: int) -> list[Draw]:
        level = self.next_level()
        draws = [self.level_draw(level, i) for i in range(LEVEL_SUBNETS)]
        draws.append(Draw("min", self.min_arch(level), True, level))
        return draws

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "walk_rng": _rng_state(self.walk_rng), "level": self.level}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        _set_rng_state(self.walk_rng, state["walk_rng"])
        self.level = int(state["level"])
