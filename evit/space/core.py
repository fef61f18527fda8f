"""The search space type, plus the seeded sampling primitives the paper uses.

A `SearchSpace` says which values every field of an `Arch` may take, how the supernet is
shaped around them (strides, head widths), and where its FLOPs levels lie. The presets
(`imagenet`, `cpu`) are in `evit.space.presets`; a space built from the reference
implementation's own config is in `evit.space.reference`.

Choices of ours where the paper is silent:
- The "width never smaller than the previous stage's" rule applies between consecutive
  stages and, as in the reference implementation, between the stem and MBConv stage 1
  (in the `imagenet` space a 24-wide stem needs stage 1 at 24 or 32; in `cpu` the rule
  never binds there).
- `uniform` means uniform over the valid space: every field is drawn uniformly and the
  whole draw is rejected while the width rule fails (cheap: acceptance is > 30%).
- `mutate` and `crossover` repair a width-rule violation by re-drawing (bounded tries),
  so they always return a valid arch.

Each space also names its FLOPs convention (`flops_convention`: "true" MACs or the
paper's "reference" counting), which `evit.flops` applies; see there.

Drawing inside a FLOPs level and each level's "min" subnet need the FLOPs counter, so
they live in `evit.level_sampler.LevelSampler` (`sample(level, rng)`, `min_arch(level)`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from evit.arch import Arch, ArchError, MBStage, Stage, Stem, ViTStage

_MAX_TRIES = 1000
VARIANTS = ("default", "reference")

FlopsConvention = Literal["true", "reference"]
FLOPS_CONVENTIONS: tuple[str, ...] = ("true", "reference")
"""true: every MAC of the real forward pass (hook-exact). reference: the counting of the
paper's reference implementation, so that FLOPs levels and budgets mean the paper's
numbers (rules in `evit.flops`)."""


@dataclass(frozen=True)
class StageSpace:
    kind: Literal["mbconv", "transformer"]
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    stride: int
    # MBConv stages
    expansions: tuple[int, ...] = ()
    kernels: tuple[int, ...] = ()
    se: bool = False
    # transformer stages
    mlp_ratios: tuple[int, ...] = ()
    v_scales: tuple[int, ...] = ()
    variant: str = "default"
    """Module family of the stage's blocks: "default" (evit's) or "reference" (the layout of
    the paper's released supernet, `evit.nn.reference`); set from `SearchSpace.variant`."""

    def choices(self) -> dict[str, tuple[int, ...]]:
        """Field name -> allowed values, in the order of the stage's dataclass fields."""
        if self.kind == "mbconv":
            return {"width": self.widths, "depth": self.depths, "expansion": self.expansions, "kernel": self.kernels}
        return {"width": self.widths, "depth": self.depths, "mlp_ratio": self.mlp_ratios, "v_scale": self.v_scales}

    def make(self, **values: int) -> Stage:
        return MBStage(**values) if self.kind == "mbconv" else ViTStage(**values)


@dataclass(frozen=True)
class SearchSpace:
    name: str
    resolutions: tuple[int, ...]
    stem_widths: tuple[int, ...]
    stem_depths: tuple[int, ...]
    stem_kernels: tuple[int, ...]
    stages: tuple[StageSpace, ...]
    first_stride: int = 2
    head_expansion: int = 6
    head_width: int = 1984
    head_dropout: float = 0.0
    head_dim: int = 16
    ds_expansion: int = 6
    se_reduction: int = 4
    levels: tuple[float, ...] = ()
    """FLOPs levels in MFLOPs (MACs): level F holds subnets with F <= FLOPs <= F + 2*tolerance."""
    tolerance: float = 10.0
    num_classes: int = 1000
    """Classifier width; set from the prepared data's manifest (it changes head FLOPs)."""
    variant: str = "default"
    """"default": evit's own supernet modules; "reference": modules with the parameter layout
    and forward of the paper's released supernet (`evit.nn.reference`, built by
    `evit.space.reference`), so its checkpoint imports exactly. Same arch type, sampler,
    FLOPs counter, LUTs, search and export for both."""
    flops_convention: FlopsConvention = "true"
    """How `evit.flops` counts this space's FLOPs (levels, budgets, reports); not structural."""
    max_kernel: int = field(init=False)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ArchError(f"space '{self.name}': unknown variant {self.variant!r}; accepted: {list(VARIANTS)}")
        if any(s.variant != self.variant for s in self.stages):
            object.__setattr__(self, "stages", tuple(replace(s, variant=self.variant) for s in self.stages))
        kernels = [*self.stem_kernels, *(k for s in self.stages for k in s.kernels), 3]
        object.__setattr__(self, "max_kernel", max(kernels))

    # --- levels ---------------------------------------------------------------------------
    def level_window(self, level: int) -> tuple[float, float]:
        """The closed FLOPs window (in MFLOPs) of level index `level`."""
        f = self.levels[level]
        return float(f), float(f) + 2.0 * self.tolerance

    def level_of(self, flops_m: float) -> int | None:
        """Index of the level whose window contains `flops_m`, or None (first match wins)."""
        for i in range(len(self.levels)):
            lo, hi = self.level_window(i)
            if lo <= flops_m <= hi:
                return i
        return None

    def nearest_level(self, flops_m: float) -> int:
        """Index of the level whose window is closest to `flops_m` (for seeding searches)."""
        def dist(i: int) -> float:
            lo, hi = self.level_window(i)
            return 0.0 if lo <= flops_m <= hi else min(abs(flops_m - lo), abs(flops_m - hi))

        return min(range(len(self.levels)), key=dist)

    # --- validation -----------------------------------------------------------------------
    def validate_computable(self, arch: Arch) -> Arch:
        """Return `arch` if the supernet's weights can compute it, else raise ArchError naming the field.

        Every choice must be one of this space's; widths may decrease from one stage to the
        next (the weights compute that: each block slices its own stage's weights). What
        sampling, mutation and crossover draw must also satisfy `width_rule` (`validate`).
        """
        def check(where: str, value: int, allowed: Sequence[int]) -> None:
            if value not in allowed:
                raise ArchError(
                    f"{where} = {value} is outside the '{self.name}' space; accepted: {list(allowed)}"
                )

        check("arch.resolution", arch.resolution, self.resolutions)
        check("arch.stem.width", arch.stem.width, self.stem_widths)
        check("arch.stem.depth", arch.stem.depth, self.stem_depths)
        check("arch.stem.kernel", arch.stem.kernel, self.stem_kernels)
        if len(arch.stages) != len(self.stages):
            raise ArchError(
                f"arch.stages has {len(arch.stages)} stages; the '{self.name}' space has "
                f"{len(self.stages)} ({', '.join(s.kind for s in self.stages)})"
            )
        for i, (stage, ss) in enumerate(zip(arch.stages, self.stages)):
            where = f"arch.stages[{i}]"
            if stage.kind != ss.kind:
                raise ArchError(f"{where} is a {stage.kind} stage; the '{self.name}' space has a {ss.kind} stage there")
            for name, allowed in ss.choices().items():
                check(f"{where}.{name}", getattr(stage, name), allowed)
        return arch

    @staticmethod
    def width_rule(arch: Arch) -> str | None:
        """Why `arch` breaks the sampling rule "widths never decrease from the stem on", or None."""
        prev_width = arch.stem.width
        for i, stage in enumerate(arch.stages):
            if stage.width < prev_width:
                before = "the stem's" if i == 0 else "the previous stage's"
                return (f"arch.stages[{i}].width = {stage.width} is smaller than {before} width {prev_width}; "
                        "widths must not decrease from the stem on")
            prev_width = stage.width
        return None

    def validate(self, arch: Arch) -> Arch:
        """Return `arch` if it lies in this space (what sampling and search draw), else raise ArchError."""
        self.validate_computable(arch)
        problem = self.width_rule(arch)
        if problem is not None:
            raise ArchError(problem)
        return arch

    def is_valid(self, arch: Arch) -> bool:
        try:
            self.validate(arch)
        except ArchError:
            return False
        return True

    @staticmethod
    def widths_ok(stages: Sequence[Stage], stem_width: int = 0) -> bool:
        """Widths never decrease from the stem (width `stem_width`) through the stages."""
        if stages and stages[0].width < stem_width:
            return False
        return all(b.width >= a.width for a, b in zip(stages, stages[1:]))

    # --- extremes -------------------------------------------------------------------------
    def smallest(self) -> Arch:
        return self._extreme(min)

    def largest(self) -> Arch:
        return self._extreme(max)

    def _extreme(self, pick: Any) -> Arch:
        stem = Stem(pick(self.stem_widths), pick(self.stem_depths), pick(self.stem_kernels))
        stages = tuple(ss.make(**{k: pick(v) for k, v in ss.choices().items()}) for ss in self.stages)
        return self.validate(Arch(pick(self.resolutions), stem, stages))

    # --- sampling primitives (all seeded through the `rng` argument) ------------------------
    def sample_uniform(self, rng: random.Random) -> Arch:
        def draw_stem() -> Stem:
            return Stem(rng.choice(self.stem_widths), rng.choice(self.stem_depths), rng.choice(self.stem_kernels))

        stem = draw_stem()
        resolution = rng.choice(self.resolutions)
        for _ in range(_MAX_TRIES):
            stages = tuple(ss.make(**{k: rng.choice(v) for k, v in ss.choices().items()}) for ss in self.stages)
            if not self.widths_ok(stages):
                continue  # independent of the stem: keep it
            if stages[0].width >= stem.width:
                return Arch(resolution, stem, stages)
            # stem wider than stage 1: reject the pair, draw both again. Still uniform over the
            # valid space (stem uniform x stages uniform over the monotone ones, pairs rejected),
            # and the same random stream as before wherever the stem never binds (cpu space).
            stem = draw_stem()
        raise RuntimeError(f"space '{self.name}': no width-monotone draw in {_MAX_TRIES} tries")

    def mutate(self, arch: Arch, rng: random.Random, prob: float = 0.2, depth_prob: float = 0.4) -> Arch:
        """The spec's mutation: each choice re-drawn with `prob`, each depth with `depth_prob`."""
        def redraw(value: int, allowed: Sequence[int], p: float) -> int:
            return rng.choice(allowed) if rng.random() < p else value

        for _ in range(_MAX_TRIES):
            resolution = redraw(arch.resolution, self.resolutions, prob)
            stem = Stem(
                redraw(arch.stem.width, self.stem_widths, prob),
                redraw(arch.stem.depth, self.stem_depths, depth_prob),
                redraw(arch.stem.kernel, self.stem_kernels, prob),
            )
            stages = tuple(
                ss.make(**{
                    k: redraw(getattr(st, k), allowed, depth_prob if k == "depth" else prob)
                    for k, allowed in ss.choices().items()
                })
                for st, ss in zip(arch.stages, self.stages)
            )
            if self.widths_ok(stages, stem.width):
                return Arch(resolution, stem, stages)
        return arch

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        """Uniform crossover: every field taken from either parent with probability 1/2."""
        def pick(x: int, y: int) -> int:
            return x if rng.random() < 0.5 else y

        for _ in range(_MAX_TRIES):
            stem = Stem(pick(a.stem.width, b.stem.width), pick(a.stem.depth, b.stem.depth),
                        pick(a.stem.kernel, b.stem.kernel))
            stages = tuple(
                ss.make(**{k: pick(getattr(sa, k), getattr(sb, k)) for k in ss.choices()})
                for sa, sb, ss in zip(a.stages, b.stages, self.stages)
            )
            if self.widths_ok(stages, stem.width):
                return Arch(pick(a.resolution, b.resolution), stem, stages)
        return a

    # --- derived shapes -------------------------------------------------------------------
    def with_classes(self, num_classes: int) -> SearchSpace:
        return replace(self, num_classes=num_classes)

    def with_levels(self, levels: Sequence[int], tolerance: float | None = None) -> SearchSpace:
        return replace(self, levels=tuple(levels), tolerance=self.tolerance if tolerance is None else tolerance)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data description, stored in checkpoints and LUTs to detect a space mismatch.

        `variant` appears only when it is not "default", so files written before variants
        existed still match their space.
        """
        extra: dict[str, Any] = {} if self.variant == "default" else {"variant": self.variant}
        return {
            **extra,
            "name": self.name,
            "resolutions": list(self.resolutions),
            "stem_widths": list(self.stem_widths),
            "stem_depths": list(self.stem_depths),
            "stem_kernels": list(self.stem_kernels),
            "stages": [
                {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(s).items()
                 if k != "variant" or v != "default"} for s in self.stages
            ],
            "first_stride": self.first_stride,
            "head_expansion": self.head_expansion,
            "head_width": self.head_width,
            "head_dim": self.head_dim,
            "ds_expansion": self.ds_expansion,
            "se_reduction": self.se_reduction,
            "levels": list(self.levels),
            "tolerance": self.tolerance,
            "num_classes": self.num_classes,
            "flops_convention": self.flops_convention,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSpace:
        """Inverse of `to_dict`: a checkpoint, LUT or model card carries its space as data.

        Rebuilt field by field, whatever the space's name (a reference space is not a
        preset); `evit.resolve.restore_space` also checks a preset's dict against this
        version's preset of that name.
        """
        stages = tuple(
            StageSpace(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in s.items()}) for s in d["stages"]
        )
        return cls(
            name=d["name"], resolutions=tuple(d["resolutions"]), stem_widths=tuple(d["stem_widths"]),
            stem_depths=tuple(d["stem_depths"]), stem_kernels=tuple(d["stem_kernels"]), stages=stages,
            first_stride=d["first_stride"], head_expansion=d["head_expansion"], head_width=d["head_width"],
            head_dim=d["head_dim"], ds_expansion=d["ds_expansion"], se_reduction=d["se_reduction"],
            levels=tuple(d.get("levels", ())), tolerance=d.get("tolerance", 10.0), num_classes=d["num_classes"],
            variant=d.get("variant", "default"),
            flops_convention=d.get("flops_convention", "true"),
        )

    def structure_dict(self) -> dict[str, Any]:
        """`to_dict` without levels and FLOPs convention: what decides whether weights/LUTs are compatible."""
        d = self.to_dict()
        for k in NON_STRUCTURAL:
            d.pop(k, None)
        return d

    def with_convention(self, convention: str) -> SearchSpace:
        """This space counted under another FLOPs convention (same structure, same weights)."""
        if convention not in FLOPS_CONVENTIONS:
            raise ArchError(f"unknown FLOPs convention {convention!r}; accepted: {list(FLOPS_CONVENTIONS)}")
        return self if convention == self.flops_convention else replace(self, flops_convention=convention)


NON_STRUCTURAL = ("levels", "tolerance", "flops_convention")
"""`to_dict` keys that change how subnets are grouped and counted, not the weights."""
