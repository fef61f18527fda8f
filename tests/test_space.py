"""Search spaces, sampling primitives, the fast FLOPs counter, and `evit arch info`."""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from evit import blocks as blocks_mod
from evit import flops
from evit.arch import Arch, ArchError, MBStage, Stem, ViTStage
from evit.cli import app
from evit.level_sampler import LevelSampler
from evit.space import CPU, IMAGENET, PRESETS, SearchSpace, get_space

# --- presets ---------------------------------------------------------------------------------


def test_imagenet_preset_is_the_spec_table() -> None:
    s = IMAGENET
    assert s.resolutions == (128, 160, 176, 192, 224, 256)
    assert (s.first_stride, s.stem_widths, s.stem_depths, s.stem_kernels) == (2, (16, 24), (1, 2), (3, 5))
    rows = [(st.kind, st.stride, st.widths, st.depths, st.se, st.expansions, st.kernels, st.mlp_ratios, st.v_scales)
            for st in s.stages]
    mb_choices = ((3, 4, 5, 6), (3, 5), (), ())
    vit_choices = ((), (), (2, 3, 4, 5), (2, 3, 4))
    assert rows == [
        ("mbconv", 2, (16, 24, 32), (2, 3, 4, 5), False, *mb_choices),
        ("mbconv", 2, (16, 24, 32, 40, 48), (2, 3, 4, 5, 6), True, *mb_choices),
        ("transformer", 2, (48, 64, 80, 96), (1, 2, 3, 4, 5), False, *vit_choices),
        ("transformer", 1, tuple(range(80, 161, 16)), tuple(range(1, 7)), False, *vit_choices),
        ("transformer", 2, tuple(range(144, 289, 16)), tuple(range(1, 7)), False, *vit_choices),
        ("transformer", 2, tuple(range(160, 321, 16)), tuple(range(1, 7)), False, *vit_choices),
    ]
    assert (s.head_expansion, s.head_width, s.head_dim, s.ds_expansion, s.se_reduction) == (6, 1984, 16, 6, 4)
    assert s.levels == (100, 200, 300, 400, 500, 700, 900, 1200) and s.tolerance == 10.0
    assert s.num_classes == 1000 and s.max_kernel == 5
    assert s.level_window(0) == (100.0, 120.0) and s.level_window(7) == (1200.0, 1220.0)


def test_cpu_preset_is_the_same_family_smaller() -> None:
    c = CPU
    assert [st.kind for st in c.stages][:2] == ["mbconv", "mbconv"]
    assert set(st.kind for st in c.stages[2:]) == {"transformer"}
    assert max(c.resolutions) <= 64 and len(c.stages) < len(IMAGENET.stages)
    assert max(st.widths[-1] for st in c.stages) < max(st.widths[-1] for st in IMAGENET.stages)
    lo, hi = flops.flops_range(c)
    assert all(lo <= lv and lv + 2 * c.tolerance <= hi for lv in c.levels)
    assert set(PRESETS) == {"imagenet", "cpu"}


def test_get_space_overrides_and_errors() -> None:
    s = get_space("imagenet", levels=[150, 250], tolerance=5, num_classes=10)
    assert s.levels == (150, 250) and s.tolerance == 5 and s.num_classes == 10
    assert s.structure_dict()["num_classes"] == 10 and "levels" not in s.structure_dict()
    assert flops.flops_m(s.largest(), s) < flops.flops_m(IMAGENET.largest(), IMAGENET)  # 10-way head
    with pytest.raises(ArchError, match=r"unknown search space 'imagnet'.*\['cpu', 'imagenet'\]"):
        get_space("imagnet")


def test_level_of_and_nearest_level() -> None:
    s = IMAGENET
    assert s.level_of(100.0) == 0 and s.level_of(120.0) == 0 and s.level_of(120.5) is None
    assert s.level_of(1210) == 7 and s.level_of(50) is None
    assert s.nearest_level(50) == 0 and s.nearest_level(5000) == 7 and s.nearest_level(650) in (4, 5)


# --- sampling primitives ---------------------------------------------------------------------

@pytest.mark.parametrize("space", [IMAGENET, CPU], ids=lambda s: s.name)
def test_smallest_and_largest(space: SearchSpace) -> None:
    small, big = space.smallest(), space.largest()
    assert space.is_valid(small) and space.is_valid(big)
    assert small.resolution == min(space.resolutions) and big.resolution == max(space.resolutions)
    assert all(st.width == ss.widths[0] and st.depth == ss.depths[0] for st, ss in zip(small.stages, space.stages))
    assert all(st.width == ss.widths[-1] and st.depth == ss.depths[-1] for st, ss in zip(big.stages, space.stages))
    rng = random.Random(0)
    fl = [flops.flops_m(space.sample_uniform(rng), space) for _ in range(500)]
    assert flops.flops_m(small, space) <= min(fl) and max(fl) <= flops.flops_m(big, space)


@pytest.mark.parametrize("space", [IMAGENET, CPU], ids=lambda s: s.name)
def test_primitives_are_seeded_and_reproducible(space: SearchSpace) -> None:
    def run(seed: int) -> list[Arch]:
        rng = random.Random(seed)
        a = [space.sample_uniform(rng) for _ in range(50)]
        m = [space.mutate(x, rng) for x in a]
        c = [space.crossover(x, y, rng) for x, y in zip(a, m)]
        return a + m + c

    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert first != other
    assert all(space.is_valid(x) for x in first + other)


def test_uniform_covers_every_value_evenly() -> None:
    rng = random.Random(3)
    archs = [IMAGENET.sample_uniform(rng) for _ in range(6000)]
    res = Counter(a.resolution for a in archs)
    assert set(res) == set(IMAGENET.resolutions)
    assert all(abs(n / 6000 - 1 / 6) < 0.03 for n in res.values())
    # non-width fields are independent of the width rule: uniform
    for i, ss in enumerate(IMAGENET.stages):
        depths = Counter(a.stages[i].depth for a in archs)
        assert set(depths) == set(ss.depths)
        assert all(abs(n / 6000 - 1 / len(ss.depths)) < 0.035 for n in depths.values())
    # every width of every stage occurs (the width rule prunes combinations, not values)
    for i, ss in enumerate(IMAGENET.stages):
        assert {a.stages[i].width for a in archs} == set(ss.widths)


def _fields(arch: Arch) -> dict[str, int]:
    out = {"resolution": arch.resolution, "stem.width": arch.stem.width, "stem.depth": arch.stem.depth,
           "stem.kernel": arch.stem.kernel}
    for i, st in enumerate(arch.stages):
        for k, v in st.__dict__.items():
            out[f"stages[{i}].{k}"] = v
    return out


def _n_values(space: SearchSpace) -> dict[str, int]:
    out = {"resolution": len(space.resolutions), "stem.width": len(space.stem_widths),
           "stem.depth": len(space.stem_depths), "stem.kernel": len(space.stem_kernels)}
    for i, ss in enumerate(space.stages):
        for k, v in ss.choices().items():
            out[f"stages[{i}].{k}"] = len(v)
    return out


def test_mutation_redraws_choices_at_the_spec_rates() -> None:
    """Each choice is re-drawn with p = 0.2 and each depth with 0.4 (a re-draw may keep the value).

    Width fields also go through the width-rule repair, so only the other fields are
    held to the rate; widths must still change sometimes and stay valid always.
    """
    space, n = IMAGENET, 5000
    base = Arch.from_key("r192_s16-1-3_m24-3-4-3_m40-3-4-5_t64-2-3-3_t96-3-3-3_t192-3-3-3_t272-3-3-3")
    space.validate(base)
    rng = random.Random(11)
    kids = [space.mutate(base, rng) for _ in range(n)]
    assert all(space.is_valid(k) for k in kids)
    before, counts = _fields(base), _n_values(space)
    changed = Counter()
    for k in kids:
        for name, v in _fields(k).items():
            changed[name] += v != before[name]
    redraw_depth, redraw_other = [], []
    for name, c in changed.items():
        if name.endswith(".width") and name.startswith("stages"):
            assert 0 < c < n * 0.2
            continue
        implied = c / n / (1 - 1 / counts[name])  # P(re-draw) from P(change)
        (redraw_depth if name.endswith("depth") else redraw_other).append(implied)
    assert all(abs(p - 0.4) < 0.05 for p in redraw_depth), redraw_depth
    assert all(abs(p - 0.2) < 0.04 for p in redraw_other), redraw_other
    assert abs(np.mean(redraw_depth) - 0.4) < 0.02 and abs(np.mean(redraw_other) - 0.2) < 0.015
    custom = [space.mutate(base, rng, prob=0.0, depth_prob=0.0) for _ in range(20)]
    assert all(k == base for k in custom)


def test_widths_never_decrease_from_the_stem_in_sampling_mutation_crossover_and_validation() -> None:
    """The reference's rule: MBConv stage 1 is never narrower than the stem (imagenet: stem 24 -> 24/32)."""
    space = IMAGENET
    bad = replace(space.largest(), stem=Stem(24, 1, 3))
    bad = replace(bad, stages=(replace(bad.stages[0], width=16), *bad.stages[1:]))
    with pytest.raises(ArchError, match="smaller than the stem's width 24"):
        space.validate(bad)
    rng = random.Random(0)
    draws = [space.sample_uniform(rng) for _ in range(400)]
    assert any(a.stem.width == 24 for a in draws)
    assert all(a.stages[0].width >= a.stem.width for a in draws)
    wide = space.largest()  # stem 24
    for _ in range(300):
        m = space.mutate(wide, rng, prob=0.6, depth_prob=0.6)
        c = space.crossover(space.smallest(), m, rng)
        assert m.stages[0].width >= m.stem.width and c.stages[0].width >= c.stem.width


def test_crossover_takes_each_field_from_either_parent() -> None:
    space, n = IMAGENET, 1500
    a, b = space.smallest(), space.largest()
    rng = random.Random(5)
    kids = [space.crossover(a, b, rng) for _ in range(n)]
    assert all(space.is_valid(k) for k in kids)
    fa, fb = _fields(a), _fields(b)
    kid_fields = [_fields(k) for k in kids]
    for name in fa:
        vals = Counter(f[name] for f in kid_fields)
        assert set(vals) <= {fa[name], fb[name]}
        if not name.endswith(".width"):  # widths (the stem's too): repaired by re-draw
            assert abs(vals[fa[name]] / n - 0.5) < 0.05, name
    assert space.crossover(a, a, rng) == a


# --- levels ------------------------------------------------------------------------------------

@pytest.mark.parametrize("space", [IMAGENET, CPU], ids=lambda s: s.name)
def test_every_level_of_both_presets_is_reachable(space: SearchSpace) -> None:
    ls = LevelSampler(space)
    assert ls.levels_reachable() == [True] * len(space.levels)
    ls.check_levels()
    rng = random.Random(0)
    for lv in range(len(space.levels)):
        lo, hi = space.level_window(lv)
        assert lo <= flops.flops_m(ls.min_arch(lv), space) <= hi
        assert lo <= flops.flops_m(ls.sample(lv, rng), space) <= hi
        assert ls.count_in_window(lv) > 1000


# --- the FLOPs counter's fast path ----------------------------------------------------------------

def _reference(arch: Arch, space: SearchSpace) -> tuple[int, int]:
    """The slow definition: sum over the arch's blocks."""
    blocks = blocks_mod.arch_blocks(arch, space)
    return sum(map(flops.block_flops, blocks)), sum(map(flops.block_params, blocks))


@pytest.mark.parametrize("space", [IMAGENET, CPU, get_space("imagenet", num_classes=10)],
                         ids=["imagenet", "cpu", "imagenet-10"])
def test_fast_counter_equals_the_block_sum_exactly(space: SearchSpace) -> None:
    rng = random.Random(2)
    archs = [space.smallest(), space.largest(), *(space.sample_uniform(rng) for _ in range(1500))]
    archs += [space.mutate(a, rng) for a in archs[:300]]
    refs = [_reference(a, space) for a in archs]
    for a, (f, p) in zip(archs, refs):
        cost = flops.count(a, space)
        assert (cost.flops_m, cost.params_m) == (f / 1e6, p / 1e6)
        assert flops.flops_m(a, space) == f / 1e6 and flops.params_m(a, space) == p / 1e6
    many = flops.flops_many(archs, space)
    assert many.dtype == np.float64 and many.tolist() == [f / 1e6 for f, _ in refs]
    assert flops.flops_many([], space).shape == (0,)


def test_stage_table_entries_match_their_blocks_at_every_depth() -> None:
    """Exhaustive on the cpu space: the per-depth prefix sums equal each depth's own block sum."""
    space = get_space("cpu", num_classes=10)
    t = flops.cost_tables(space)
    for r in space.resolutions:
        for i, ss in enumerate(space.stages):
            ins = space.stem_widths if i == 0 else space.stages[i - 1].widths
            h = t.side_list(r)[i]
            names = list(ss.choices())
            for c, vals in itertools.product(ins, itertools.product(*ss.choices().values())):
                st = ss.make(**dict(zip(names, vals)))
                blocks = blocks_mod.stage_blocks(ss, h, c, st, space.head_dim, space.ds_expansion, space.se_reduction)
                want = (sum(map(flops.block_flops, blocks)), sum(map(flops.block_params, blocks)))
                assert flops.stage_cost(space, i, r, c, st) == want


def test_equal_spaces_share_tables_and_a_wrong_stage_kind_is_an_arch_error() -> None:
    a = get_space("cpu", levels=[3, 5])
    b = get_space("cpu", levels=[3, 5])
    assert a is not b and flops.cost_tables(a) is flops.cost_tables(b)
    assert flops.cost_tables(IMAGENET) is not flops.cost_tables(get_space("imagenet", num_classes=10))
    arch = CPU.smallest()
    bad = replace(arch, stages=(ViTStage(16, 1, 2, 2), *arch.stages[1:]))
    with pytest.raises(ArchError, match=r"arch.stages\[0\] is a transformer stage.*mbconv"):
        flops.count(bad, CPU)
    assert isinstance(arch.stages[0], MBStage)


def test_counter_speed_sanity() -> None:
    """The bench measures >100k counts/s on one core; here only a loose floor (shared CI cores)."""
    rng = random.Random(4)
    archs = [IMAGENET.sample_uniform(rng) for _ in range(4000)]
    flops.flops_many(archs, IMAGENET)  # warm the tables
    t0 = time.process_time()
    for _ in range(3):
        for a in archs:
            flops.flops_m(a, IMAGENET)
    rate = 3 * len(archs) / max(time.process_time() - t0, 1e-9)
    assert rate > 20_000, rate


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_arch_info_prints_flops_and_params(tmp_path) -> None:
    from test_arch import ISSUE_EXAMPLE

    path = tmp_path / "arch.json"
    path.write_text(ISSUE_EXAMPLE)
    result = CliRunner().invoke(app, ["arch", "info", "--space", "imagenet", str(path)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    arch = Arch.from_json(ISSUE_EXAMPLE)
    cost = flops.count(arch, IMAGENET)
    assert out["flops_m"] == round(cost.flops_m, 4) and out["params_m"] == round(cost.params_m, 4)
    assert out["key"] == arch.key and Arch.from_dict(out["arch"]) == arch
    assert out["level"] == IMAGENET.level_of(cost.flops_m)
    assert 100 < out["flops_m"] < 1500 and 1 < out["params_m"] < 40

    bad = json.loads(ISSUE_EXAMPLE)
    bad["stages"][3]["mlp_ratio"] = 9
    path.write_text(json.dumps(bad))
    result = CliRunner().invoke(app, ["arch", "info", "--space", "imagenet", str(path)])
    assert result.exit_code == 2
    assert "arch.stages[3].mlp_ratio = 9" in result.stderr and "Traceback" not in result.output
