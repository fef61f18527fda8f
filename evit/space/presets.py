"""The shipped search spaces: `imagenet` (the paper space, exactly as in the spec) and `cpu`.

`cpu` is the same family at small inputs, four stages, what the embedded default trains
on 2 cores. `get_space` returns a preset with its levels, classes or FLOPs convention
overridden; `evit.resolve.space_from_params` is what turns `params.space` into a space
(a preset, or a reference space read from its config file).
"""

from __future__ import annotations

from collections.abc import Sequence

from evit.arch import ArchError
from evit.space.core import SearchSpace, StageSpace


def _r(lo: int, hi: int, step: int) -> tuple[int, ...]:
    return tuple(range(lo, hi + 1, step))


IMAGENET = SearchSpace(
    name="imagenet",
    resolutions=(128, 160, 176, 192, 224, 256),
    stem_widths=(16, 24),
    stem_depths=(1, 2),
    stem_kernels=(3, 5),
    stages=(
        StageSpace("mbconv", _r(16, 32, 8), _r(2, 5, 1), 2, expansions=(3, 4, 5, 6), kernels=(3, 5), se=False),
        StageSpace("mbconv", _r(16, 48, 8), _r(2, 6, 1), 2, expansions=(3, 4, 5, 6), kernels=(3, 5), se=True),
        StageSpace("transformer", _r(48, 96, 16), _r(1, 5, 1), 2, mlp_ratios=(2, 3, 4, 5), v_scales=(2, 3, 4)),
        StageSpace("transformer", _r(80, 160, 16), _r(1, 6, 1), 1, mlp_ratios=(2, 3, 4, 5), v_scales=(2, 3, 4)),
        StageSpace("transformer", _r(144, 288, 16), _r(1, 6, 1), 2, mlp_ratios=(2, 3, 4, 5), v_scales=(2, 3, 4)),
        StageSpace("transformer", _r(160, 320, 16), _r(1, 6, 1), 2, mlp_ratios=(2, 3, 4, 5), v_scales=(2, 3, 4)),
    ),
    head_expansion=6,
    head_width=1984,
    head_dropout=0.2,
    levels=(100, 200, 300, 400, 500, 700, 900, 1200),
    tolerance=10.0,
)

# CPU scale, same family: 32-48 px inputs, two MBConv + two transformer stages, narrow.
# Stage 2 keeps stride 1 so that 32 px inputs still give a 4x4 token map.
CPU = SearchSpace(
    name="cpu",
    resolutions=(32, 40, 48),
    stem_widths=(8, 16),
    stem_depths=(1, 2),
    stem_kernels=(3, 5),
    stages=(
        StageSpace("mbconv", _r(16, 24, 8), _r(1, 2, 1), 2, expansions=(2, 3, 4), kernels=(3, 5), se=False),
        StageSpace("mbconv", _r(16, 32, 8), _r(1, 3, 1), 1, expansions=(2, 3, 4), kernels=(3, 5), se=True),
        StageSpace("transformer", _r(32, 64, 16), _r(1, 2, 1), 2, mlp_ratios=(2, 3), v_scales=(2, 3)),
        StageSpace("transformer", _r(48, 80, 16), _r(1, 3, 1), 1, mlp_ratios=(2, 3), v_scales=(2, 3)),
    ),
    head_expansion=6,
    head_width=256,
    head_dropout=0.0,
    # FLOPs range of this space at 10 classes: 1.6 to 29 MMACs, median 8.
    levels=(2, 4, 6, 9, 13, 18),
    tolerance=0.5,
    num_classes=10,
)

PRESETS: dict[str, SearchSpace] = {s.name: s for s in (IMAGENET, CPU)}


def get_space(
    name: str,
    levels: Sequence[int] | None = None,
    tolerance: float | None = None,
    num_classes: int | None = None,
    flops_convention: str | None = None,
) -> SearchSpace:
    """A preset by name, optionally with its FLOPs levels/tolerance/classes/convention overridden."""
    try:
        space = PRESETS[name]
    except KeyError:
        raise ArchError(f"unknown search space {name!r}; accepted: {sorted(PRESETS)}") from None
    if levels is not None or tolerance is not None:
        space = space.with_levels(levels if levels is not None else space.levels, tolerance)
    if num_classes is not None:
        space = space.with_classes(num_classes)
    if flops_convention is not None:
        space = space.with_convention(flops_convention)
    return space
