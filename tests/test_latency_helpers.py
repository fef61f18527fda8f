"""Small real pieces shared by the latency tests (imported by tests/test_latency_*.py).

A two-stage space (MBConv then transformer) with 1-2 choices per field: 28 distinct
blocks, 32 valid archs, so a whole LUT builds and validates in seconds on one thread.
"""

from __future__ import annotations

import itertools
from typing import Any

from evit.arch import Arch, Stem
from evit.config import DeviceParams
from evit.space import SearchSpace, StageSpace

TINY = SearchSpace(
    name="tiny-lat",
    resolutions=(16, 24),
    stem_widths=(8,),
    stem_depths=(1,),
    stem_kernels=(3,),
    stages=(
        StageSpace("mbconv", (8, 16), (1, 2), 2, expansions=(2,), kernels=(3,), se=False),
        StageSpace("transformer", (16, 32), (1, 2), 2, mlp_ratios=(2,), v_scales=(2,)),
    ),
    head_expansion=2,
    head_width=32,
    levels=(),
    num_classes=5,
)

FAST = {"warmup": 1, "repeats": 4, "rounds": 2, "validate_subnets": 10}
"""Measurement settings that keep a tiny LUT build to a few seconds."""


def device_params(name: str = "t1", kind: str = "torch-cpu", **kw: Any) -> DeviceParams:
    return DeviceParams(name=name, kind=kind, **{**FAST, **kw})


def all_archs(space: SearchSpace) -> list[Arch]:
    """Every valid arch of a (small) space, by brute force."""
    out = []
    stems = [Stem(w, d, k) for w, d, k in itertools.product(space.stem_widths, space.stem_depths, space.stem_kernels)]
    per_stage = [[ss.make(**dict(zip(ss.choices(), values))) for values in itertools.product(*ss.choices().values())]
                 for ss in space.stages]
    for r, stem, stages in itertools.product(space.resolutions, stems, itertools.product(*per_stage)):
        if space.widths_ok(stages):
            out.append(Arch(r, stem, tuple(stages)))
    return out


def test_tiny_space_is_valid() -> None:
    archs = all_archs(TINY)
    assert len(archs) == 32
    for a in archs:
        TINY.validate(a)
