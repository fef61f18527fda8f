"""The paper's released models (ElasticViT T1 ... L3) by name, and one way to name any arch.

The nine architectures are those of the reference implementation's released checkpoints
(microsoft/Moonlit, ElasticViT), all in the `imagenet` space. `reference_flops_m` is the
figure the paper reports; `evit.flops` reproduces it to within 0.001 M under the
`reference` FLOPs convention (tests/test_flops_reference.py).

`resolve_arch` is what the CLI (`evit arch info T1`, `evit export --arch S1`) and
`search.fixed_archs` share: a released name, or the path of an arch JSON file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from evit.arch import Arch, ArchError
from evit.io import read_user_json

ARCH_EXPECTED = ('an arch JSON object {"resolution": ..., "stem": {...}, "stages": [...]} as `evit arch info` '
                 "prints it")

RELEASED_SPACE = "imagenet"
"""The search space every released model belongs to."""


@dataclass(frozen=True)
class ReleasedModel:
    name: str
    arch: Arch
    reference_flops_m: float
    """The paper's FLOPs figure (MMACs, the reference counter's convention)."""


# name -> (Arch.key, paper MFLOPs); the keys are the `Arch.key` form of released_models.json.
_RELEASED: dict[str, tuple[str, float]] = {
    "T1": ("r128_s16-1-3_m24-2-3-3_m32-3-3-3_t64-1-2-2_t96-1-2-2_t176-1-3-2_t272-1-4-2", 62.915),
    "T2": ("r160_s16-1-3_m24-2-3-3_m40-3-3-3_t48-1-3-2_t96-1-4-2_t176-2-3-2_t256-2-2-2", 119.98),
    "S1": ("r192_s16-1-3_m24-3-3-3_m40-3-3-3_t64-2-2-2_t96-2-2-2_t192-2-3-2_t272-2-4-2", 217.642),
    "S2": ("r224_s16-1-3_m24-3-3-3_m48-3-3-3_t64-2-2-2_t96-2-2-2_t192-2-2-2_t256-2-4-2", 318.528),
    "M": ("r224_s16-1-5_m32-3-3-3_m48-5-3-3_t64-2-2-2_t96-2-4-2_t192-2-4-2_t288-2-5-2", 415.581),
    "L1": ("r256_s16-1-5_m24-3-3-5_m40-3-6-5_t64-2-4-2_t96-2-3-2_t192-2-4-2_t320-2-4-2", 517.108),
    "L1.5": ("r256_s16-2-3_m24-4-3-3_m48-4-4-5_t64-2-4-2_t96-2-5-2_t256-2-3-2_t320-2-5-2", 618.781),
    "L2": ("r256_s16-1-3_m24-3-6-3_m40-4-6-3_t80-2-3-2_t128-2-2-2_t256-2-3-2_t304-2-5-3", 704.111),
    "L3": ("r256_s16-1-5_m32-3-5-3_m48-4-5-5_t80-2-4-2_t128-2-4-2_t256-2-3-2_t320-2-5-2", 815.399),
}

RELEASED: dict[str, ReleasedModel] = {
    name: ReleasedModel(name, Arch.from_key(key), flops) for name, (key, flops) in _RELEASED.items()
}


def released(name: str) -> ReleasedModel | None:
    """The released model called `name` (case-insensitive), or None."""
    for model in RELEASED.values():
        if model.name.lower() == name.lower():
            return model
    return None


def arch_label(name: str) -> str:
    """An alias-safe label for a named arch: 'L1.5' -> 'l1_5' (MLflow aliases: [a-z0-9_-])."""
    label = re.sub(r"[^a-z0-9_-]+", "_", name.lower()).strip("_")
    return label or "arch"


def resolve_arch(spec: str) -> tuple[str, Arch]:
    """(name, arch) for a released model's name or an arch JSON file; ArchError otherwise.

    The name of a JSON file's arch is the file's stem. The arch is not validated against a
    space here: the caller knows which space it needs (and says so in its error).
    """
    model = released(spec)
    if model is not None:
        return model.name, model.arch
    path = Path(spec)
    if path.suffix == ".json" or os.path.lexists(path):
        data = read_user_json(path, "arch file", expect=ARCH_EXPECTED, error=ArchError)
        try:
            return path.stem, Arch.from_dict(data)
        except ArchError as exc:
            raise ArchError(f"arch file {spec!r}: {exc}") from None
    raise ArchError(f"{spec!r} is neither a released model ({', '.join(RELEASED)}) nor an arch JSON file")
