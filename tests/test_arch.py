"""The `Arch` value type: frozen, hashable, ordered, JSON/key round trips, clear errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import pytest

from evit.arch import Arch, ArchError, MBStage, Stem, ViTStage
from evit.errors import UserError
from evit.space import CPU, IMAGENET

# The example of issue 3, verbatim.
ISSUE_EXAMPLE = """
{"resolution": 192,
 "stem": {"width": 16, "depth": 1, "kernel": 3},
 "stages": [
   {"width": 24, "depth": 3, "expansion": 3, "kernel": 3},
   {"width": 40, "depth": 3, "expansion": 3, "kernel": 3},
   {"width": 64, "depth": 2, "mlp_ratio": 2, "v_scale": 2},
   {"width": 96, "depth": 2, "mlp_ratio": 2, "v_scale": 2},
   {"width": 192, "depth": 2, "mlp_ratio": 3, "v_scale": 2},
   {"width": 272, "depth": 2, "mlp_ratio": 4, "v_scale": 2}]}
"""


def example() -> dict:
    return json.loads(ISSUE_EXAMPLE)


def test_issue_example_parses_and_validates_in_the_imagenet_space() -> None:
    arch = Arch.from_json(ISSUE_EXAMPLE)
    assert IMAGENET.validate(arch) is arch
    assert arch.resolution == 192
    assert arch.stem == Stem(16, 1, 3)
    assert arch.stages[0] == MBStage(24, 3, 3, 3)
    assert arch.stages[2] == ViTStage(64, 2, 2, 2)
    assert [s.kind for s in arch.stages] == ["mbconv"] * 2 + ["transformer"] * 4
    assert arch.to_dict() == example()
    assert not CPU.is_valid(arch)


def test_frozen_hashable_and_equal_by_value() -> None:
    a, b = Arch.from_json(ISSUE_EXAMPLE), Arch.from_dict(example())
    assert a == b and a is not b and hash(a) == hash(b)
    assert len({a, b}) == 1 and {a: 1}[b] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.resolution = 224  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.stages[0].width = 32  # type: ignore[misc]
    assert isinstance(a.stages, tuple)
    c = dataclasses.replace(a, resolution=224)
    assert c != a and hash(c) != hash(a)


def test_ordered_within_a_space() -> None:
    rng = random.Random(0)
    archs = [IMAGENET.sample_uniform(rng) for _ in range(200)]
    ordered = sorted(archs)
    assert all(x <= y for x, y in zip(ordered, ordered[1:]))
    assert IMAGENET.smallest() < IMAGENET.largest()
    a = Arch.from_json(ISSUE_EXAMPLE)
    assert a < dataclasses.replace(a, resolution=224)
    assert sorted([a, IMAGENET.largest(), IMAGENET.smallest()]) == [IMAGENET.smallest(), a, IMAGENET.largest()]


@pytest.mark.parametrize("space", [IMAGENET, CPU], ids=lambda s: s.name)
def test_json_and_key_round_trips(space) -> None:
    rng = random.Random(1)
    for arch in [space.smallest(), space.largest(), *(space.sample_uniform(rng) for _ in range(300))]:
        assert Arch.from_json(arch.to_json()) == arch
        assert Arch.from_json(arch.to_json(indent=2)) == arch
        assert Arch.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
        assert Arch.from_key(arch.key) == arch
        assert space.validate(Arch.from_key(arch.key)) == arch
    keys = {space.sample_uniform(rng).key for _ in range(300)}
    assert all("_" in k and " " not in k for k in keys)


def test_key_is_canonical_and_readable() -> None:
    arch = Arch.from_json(ISSUE_EXAMPLE)
    assert arch.key == "r192_s16-1-3_m24-3-3-3_m40-3-3-3_t64-2-2-2_t96-2-2-2_t192-2-3-2_t272-2-4-2"
    for bad in ("", "r192", "r192_sX-1-3", "x_y_z", "r192_s16-1-3_m24-3-3"):
        with pytest.raises(ArchError, match="Arch.key"):
            Arch.from_key(bad)


# --- bad JSON: every error names the offending field ------------------------------------------

def _mutated(path: list, value=..., delete: bool = False) -> dict:
    d = copy.deepcopy(example())
    node = d
    for p in path[:-1]:
        node = node[p]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return d


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (_mutated(["stem", "stride"], 2), ["arch.stem", "unknown", "stride", "kernel"]),
        (_mutated(["colour"], "red"), ["arch:", "unknown", "colour", "resolution"]),
        (_mutated(["stages", 1, "se"], True), ["arch.stages[1]", "unknown", "se"]),
        (_mutated(["stages", 3, "heads"], 6), ["arch.stages[3]", "unknown", "heads"]),
        (_mutated(["resolution"], delete=True), ["arch:", "missing", "resolution"]),
        (_mutated(["stem", "kernel"], delete=True), ["arch.stem", "missing", "kernel"]),
        (_mutated(["stages", 2, "v_scale"], delete=True), ["arch.stages[2]", "missing", "v_scale"]),
        (_mutated(["stages", 0, "kernel"], delete=True), ["arch.stages[0]", "missing", "kernel"]),
        (_mutated(["resolution"], 192.0), ["arch.resolution", "integer", "192.0"]),
        (_mutated(["resolution"], "192"), ["arch.resolution", "integer", "'192'"]),
        (_mutated(["stem", "depth"], True), ["arch.stem.depth", "integer", "True"]),
        (_mutated(["stages", 4, "mlp_ratio"], 2.5), ["arch.stages[4].mlp_ratio", "integer", "2.5"]),
        (_mutated(["stages", 1, "width"], None), ["arch.stages[1].width", "integer", "None"]),
        (_mutated(["stages"], []), ["arch.stages", "non-empty list"]),
        (_mutated(["stages"], {"width": 1}), ["arch.stages", "list"]),
        (_mutated(["stem"], [16, 1, 3]), ["arch.stem", "object"]),
        (_mutated(["stages", 0], 5), ["arch.stages[0]", "object"]),
        (_mutated(["stages", 2], {"width": 64, "depth": 2}), ["arch.stages[2]", "kind", "mlp_ratio"]),
        ([1, 2, 3], ["arch", "JSON object", "list"]),
    ],
)
def test_malformed_json_names_the_field(data, fragments) -> None:
    with pytest.raises(ArchError) as info:
        Arch.from_json(json.dumps(data))
    for frag in fragments:
        assert frag in str(info.value), (frag, str(info.value))
    assert isinstance(info.value, UserError)


def test_not_json_at_all() -> None:
    with pytest.raises(ArchError, match="not valid JSON"):
        Arch.from_json('{"resolution": 192,')


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (_mutated(["resolution"], 200), ["arch.resolution = 200", "'imagenet'", "[128, 160, 176, 192, 224, 256]"]),
        (_mutated(["stem", "width"], 32), ["arch.stem.width = 32", "[16, 24]"]),
        (_mutated(["stem", "depth"], 3), ["arch.stem.depth = 3", "[1, 2]"]),
        (_mutated(["stem", "kernel"], 7), ["arch.stem.kernel = 7", "[3, 5]"]),
        (_mutated(["stages", 0, "width"], 20), ["arch.stages[0].width = 20", "[16, 24, 32]"]),
        (_mutated(["stages", 0, "depth"], 1), ["arch.stages[0].depth = 1", "[2, 3, 4, 5]"]),
        (_mutated(["stages", 1, "expansion"], 2), ["arch.stages[1].expansion = 2", "[3, 4, 5, 6]"]),
        (_mutated(["stages", 1, "kernel"], 7), ["arch.stages[1].kernel = 7", "[3, 5]"]),
        (_mutated(["stages", 2, "depth"], 6), ["arch.stages[2].depth = 6", "[1, 2, 3, 4, 5]"]),
        (_mutated(["stages", 3, "mlp_ratio"], 6), ["arch.stages[3].mlp_ratio = 6", "[2, 3, 4, 5]"]),
        (_mutated(["stages", 5, "v_scale"], 1), ["arch.stages[5].v_scale = 1", "[2, 3, 4]"]),
        (_mutated(["stages", 5, "width"], 336), ["arch.stages[5].width = 336"]),
    ],
)
def test_value_outside_the_space_names_field_and_accepted_values(data, fragments) -> None:
    arch = Arch.from_json(json.dumps(data))  # well-formed, so parsing succeeds
    with pytest.raises(ArchError) as info:
        IMAGENET.validate(arch)
    for frag in fragments:
        assert frag in str(info.value), (frag, str(info.value))
    assert not IMAGENET.is_valid(arch)


def test_decreasing_width_is_rejected_naming_both_widths() -> None:
    # stage 5 (index 4) at 208 then stage 6 (index 5) at 176: each allowed alone, not in this order
    data = _mutated(["stages", 4, "width"], 208)
    data["stages"][5]["width"] = 176
    with pytest.raises(ArchError) as info:
        IMAGENET.validate(Arch.from_dict(data))
    msg = str(info.value)
    assert "arch.stages[5].width = 176" in msg and "208" in msg and "must not decrease" in msg
    # equal widths are fine; as in the reference, stage 1 may not be narrower than the stem
    data["stages"][5]["width"] = 208
    IMAGENET.validate(Arch.from_dict(data))
    narrow = _mutated(["stem", "width"], 24)
    narrow["stages"][0]["width"] = 16
    narrow["stages"][1]["width"] = 16
    with pytest.raises(ArchError, match=r"arch.stages\[0\].width = 16 is smaller than the stem's width 24"):
        IMAGENET.validate(Arch.from_dict(narrow))
    narrow["stages"][0]["width"] = 24
    narrow["stages"][1]["width"] = 24
    IMAGENET.validate(Arch.from_dict(narrow))


def test_wrong_stage_count_or_kind() -> None:
    short = example()
    short["stages"] = short["stages"][:5]
    with pytest.raises(ArchError) as info:
        IMAGENET.validate(Arch.from_dict(short))
    assert "arch.stages has 5 stages" in str(info.value) and "has 6" in str(info.value)
    assert "mbconv, mbconv, transformer" in str(info.value)

    swapped = example()
    swapped["stages"][2] = {"width": 64, "depth": 2, "expansion": 3, "kernel": 3}
    with pytest.raises(ArchError) as info:
        IMAGENET.validate(Arch.from_dict(swapped))
    assert "arch.stages[2] is a mbconv stage" in str(info.value)
    assert "transformer stage there" in str(info.value)

    mixed = example()
    mixed["stages"][0] = {"width": 24, "depth": 3, "expansion": 3, "v_scale": 2}
    with pytest.raises(ArchError) as info:
        Arch.from_dict(mixed)
    assert "arch.stages[0]" in str(info.value) and "v_scale" in str(info.value)
