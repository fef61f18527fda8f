"""The architecture value: one subnet of the ElasticViT supernet, as plain data.

An `Arch` is frozen, hashable and ordered, so it can key caches (fitness, FLOPs, banks)
and be compared across processes through its JSON form. It carries no reference to a
search space: `SearchSpace.validate(arch)` checks it against one.

JSON form (all layers of a stage share the stage's choices; the first conv has the stem
width)::

    {"resolution": 192,
     "stem": {"width": 16, "depth": 1, "kernel": 3},
     "stages": [
       {"width": 24, "depth": 3, "expansion": 3, "kernel": 3},
       {"width": 64, "depth": 2, "mlp_ratio": 2, "v_scale": 2}, ...]}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Union

from evit.errors import UserError


class ArchError(UserError, ValueError):
    """An architecture that is malformed or outside its search space; names the field."""


@dataclass(frozen=True, order=True)
class Stem:
    width: int
    depth: int
    kernel: int


@dataclass(frozen=True, order=True)
class MBStage:
    """A stage of MBConv blocks (inverted residuals)."""

    width: int
    depth: int
    expansion: int
    kernel: int

    kind = "mbconv"


@dataclass(frozen=True, order=True)
class ViTStage:
    """A transformer stage: a downsampling MBConv then `depth` attention+MLP layers."""

    width: int
    depth: int
    mlp_ratio: int
    v_scale: int

    kind = "transformer"


Stage = Union[MBStage, ViTStage]


@dataclass(frozen=True, order=True)
class Arch:
    resolution: int
    stem: Stem
    stages: tuple[Stage, ...]

    # --- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "stem": asdict(self.stem),
            "stages": [asdict(s) for s in self.stages],
        }

    def to_json(self, *, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @property
    def key(self) -> str:
        """Compact canonical string (stable across processes; good for dict keys and tags)."""
        parts = [f"r{self.resolution}", f"s{self.stem.width}-{self.stem.depth}-{self.stem.kernel}"]
        for s in self.stages:
            if isinstance(s, MBStage):
                parts.append(f"m{s.width}-{s.depth}-{s.expansion}-{s.kernel}")
            else:
                parts.append(f"t{s.width}-{s.depth}-{s.mlp_ratio}-{s.v_scale}")
        return "_".join(parts)

    @classmethod
    def from_dict(cls, data: Any) -> Arch:
        if not isinstance(data, dict):
            raise ArchError(f"arch: expected a JSON object, got {type(data).__name__}")
        _check_keys("arch", data, {"resolution", "stem", "stages"})
        resolution = _int("arch.resolution", data["resolution"])
        stem_d = data["stem"]
        if not isinstance(stem_d, dict):
            raise ArchError("arch.stem: expected an object with width, depth, kernel")
        _check_keys("arch.stem", stem_d, {f.name for f in fields(Stem)})
        stem = Stem(**{k: _int(f"arch.stem.{k}", v) for k, v in stem_d.items()})
        stages_d = data["stages"]
        if not isinstance(stages_d, list) or not stages_d:
            raise ArchError("arch.stages: expected a non-empty list of stage objects")
        stages: list[Stage] = []
        for i, sd in enumerate(stages_d):
            where = f"arch.stages[{i}]"
            if not isinstance(sd, dict):
                raise ArchError(f"{where}: expected an object")
            if "expansion" in sd or "kernel" in sd:
                typ: type = MBStage
            elif "mlp_ratio" in sd or "v_scale" in sd:
                typ = ViTStage
            else:
                raise ArchError(
                    f"{where}: cannot tell the stage kind; an MBConv stage has "
                    "width, depth, expansion, kernel and a transformer stage has "
                    "width, depth, mlp_ratio, v_scale"
                )
            _check_keys(where, sd, {f.name for f in fields(typ)})
            stages.append(typ(**{k: _int(f"{where}.{k}", v) for k, v in sd.items()}))
        return cls(resolution=resolution, stem=stem, stages=tuple(stages))

    @classmethod
    def from_json(cls, text: str) -> Arch:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArchError(f"arch: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    @classmethod
    def from_key(cls, key: str) -> Arch:
        """Inverse of `Arch.key`."""
        try:
            head, stem_s, *rest = key.split("_")
            w, d, k = (int(x) for x in stem_s[1:].split("-"))
            stages: list[Stage] = []
            for s in rest:
                a, b, c, e = (int(x) for x in s[1:].split("-"))
                stages.append(MBStage(a, b, c, e) if s[0] == "m" else ViTStage(a, b, c, e))
            return cls(int(head[1:]), Stem(w, d, k), tuple(stages))
        except (ValueError, IndexError):
            raise ArchError(f"arch key {key!r} is not of the form produced by Arch.key") from None


def _check_keys(where: str, data: dict[str, Any], expected: set[str]) -> None:
    unknown = sorted(set(data) - expected)
    if unknown:
        raise ArchError(f"{where}: unknown field(s) {unknown}; accepted: {sorted(expected)}")
    missing = sorted(expected - set(data))
    if missing:
        raise ArchError(f"{where}: missing field(s) {missing}")


def _int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArchError(f"{where}: expected an integer, got {value!r}")
    return value
