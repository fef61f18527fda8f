"""`LevelSampler`: in-window draws, determinism, speed, coverage against rejection sampling."""

from __future__ import annotations

import math
import random
import time
from collections import Counter

import pytest

from evit import flops
from evit.errors import UserError
from evit.level_coverage import coverage_report, null_total_variation, total_variation
from evit.level_sampler import LevelError, LevelSampler
from evit.space import IMAGENET, SearchSpace, get_space

CPU10 = get_space("cpu", num_classes=10)


@pytest.fixture(scope="module")
def cpu_sampler() -> LevelSampler:
    return LevelSampler(CPU10)


@pytest.fixture(scope="module")
def imagenet_sampler() -> LevelSampler:
    return LevelSampler(IMAGENET)


def _both(request: pytest.FixtureRequest, name: str) -> LevelSampler:
    return request.getfixturevalue(f"{name}_sampler")


@pytest.mark.parametrize("name", ["cpu", "imagenet"])
def test_every_draw_is_a_valid_subnet_inside_its_window(request: pytest.FixtureRequest, name: str) -> None:
    ls = _both(request, name)
    space: SearchSpace = ls.space
    rng = random.Random(0)
    for lv in range(len(space.levels)):
        lo, hi = space.level_window(lv)
        archs = [ls.sample(lv, rng) for _ in range(300)]
        fl = flops.flops_many(archs, space)
        assert ((fl >= lo) & (fl <= hi)).all(), (lv, fl.min(), fl.max())
        assert all(space.is_valid(a) for a in archs)
        assert len(set(archs)) > 250  # no collapse onto a few subnets
        assert len({a.resolution for a in archs}) >= 2 or lv in (0, len(space.levels) - 1)


@pytest.mark.parametrize("name", ["cpu", "imagenet"])
def test_same_seed_same_draws(request: pytest.FixtureRequest, name: str) -> None:
    ls = _both(request, name)
    levels = range(len(ls.space.levels))
    a = [ls.sample(lv, random.Random(42)) for lv in levels]
    b = [ls.sample(lv, random.Random(42)) for lv in levels]
    rng1, rng2 = random.Random(9), random.Random(9)
    assert a == b
    assert [ls.sample(1, rng1) for _ in range(50)] == [ls.sample(1, rng2) for _ in range(50)]
    assert [ls.sample(1, random.Random(1)) for _ in range(5)] != [ls.sample(1, rng1) for _ in range(5)]
    # a fresh sampler for an equal space draws the same stream
    again = LevelSampler(get_space(ls.space.name, num_classes=ls.space.num_classes))
    assert [again.sample(lv, random.Random(42)) for lv in levels] == a


@pytest.mark.parametrize("name", ["cpu", "imagenet"])
def test_min_arch_is_deterministic_small_and_in_window(request: pytest.FixtureRequest, name: str) -> None:
    ls = _both(request, name)
    space = ls.space
    fresh = LevelSampler(space)
    rng = random.Random(3)
    prev = 0.0
    for lv in range(len(space.levels)):
        lo, hi = space.level_window(lv)
        m = ls.min_arch(lv)
        f = flops.flops_m(m, space)
        assert lo <= f <= hi and space.is_valid(m)
        assert fresh.min_arch(lv) == m and ls.min_arch(lv) is m
        assert f > prev
        prev = f
        # "min": in the lower part of the window and below most of the level's subnets
        draws = flops.flops_many([ls.sample(lv, rng) for _ in range(200)], space)
        assert (draws >= f).mean() > 0.6
        assert f <= lo + (hi - lo) * 0.75
    if name == "imagenet":
        # balanced growth: the 100 MFLOPs min keeps a mid resolution and shallow, narrow stages
        m = ls.min_arch(0)
        assert m.resolution < 192 and all(st.depth <= 3 for st in m.stages)


def test_unreachable_and_bad_levels_are_clear_errors() -> None:
    space = get_space("cpu", levels=[0.2, 4, 500], tolerance=0.5, num_classes=10)
    ls = LevelSampler(space)
    assert ls.levels_reachable() == [False, True, False]
    with pytest.raises(LevelError) as info:
        ls.check_levels()
    msg = str(info.value)
    assert "[0.2, 500]" in msg and "unreachable" in msg and "space.levels" in msg
    with pytest.raises(LevelError, match=r"level 2 \(500\.\.501 MFLOPs\).*spans 1\.6\d*\.\.29\.1"):
        ls.sample(2, random.Random(0))
    with pytest.raises(LevelError, match=r"level index 3 is out of range.*accepted: 0\.\.2"):
        ls.sample(3, random.Random(0))
    with pytest.raises(LevelError, match="out of range"):
        ls.min_arch(-1)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    lo, hi = space.level_window(1)
    assert lo <= flops.flops_m(ls.sample(1, random.Random(0)), space) <= hi
    with pytest.raises(LevelError, match="no FLOPs levels"):
        LevelSampler(get_space("cpu", levels=[]))


def test_speed_sanity(cpu_sampler: LevelSampler, imagenet_sampler: LevelSampler) -> None:
    """The bench measures ~10k subnets/s per level on one core; here a loose floor of 1,000/s."""
    for ls in (cpu_sampler, imagenet_sampler):
        rng = random.Random(5)
        for lv in (0, len(ls.space.levels) // 2, len(ls.space.levels) - 1):
            ls.sample(lv, rng)
            t0 = time.process_time()
            for _ in range(500):
                ls.sample(lv, rng)
            rate = 500 / max(time.process_time() - t0, 1e-9)
            assert rate > 1000, (ls.space.name, lv, rate)


@pytest.mark.parametrize("level", [1, 3])
def test_coverage_matches_rejection_sampling(cpu_sampler: LevelSampler, level: int) -> None:
    """Marginals of the counting sampler vs plain rejection sampling, on levels where rejection is affordable.

    With 2,000 draws each, two samples of one distribution differ by TV ~0.01-0.03 per
    marginal; a level-blind sampler (uniform draws) is off by > 0.2 on the resolution.
    """
    rep = coverage_report(cpu_sampler, level, 2000, random.Random(100 + level))
    assert rep.n_rejection == 2000 and rep.acceptance > 0.03
    assert len(rep.tv) == 4 + 4 * len(CPU10.stages) + 1
    worst, tv = rep.max_tv
    assert tv < 0.07, (worst, rep.tv)
    assert sum(rep.tv.values()) / len(rep.tv) < 0.03
    # calibrated: on average no further apart than sampling noise alone would put them
    assert sum(rep.tv.values()) < 1.5 * sum(rep.null_tv.values())
    name, p = rep.min_pvalue
    assert p > 1e-3, (name, rep.pvalue)  # ~21 tests: Bonferroni at 2%
    assert rep.max_baseline_tv[1] > 0.2  # the check has power to see a sampler that ignores the level
    assert set(rep.summary()) >= {"max_tv", "min_pvalue", "acceptance", "level_blind_max_tv"}


def test_total_variation() -> None:
    assert null_total_variation(Counter("ab" * 500), Counter("ab" * 500)) == pytest.approx(
        0.5 * 2 * 0.5 * (2 / 1000 * 2 / math.pi) ** 0.5)
    assert total_variation(Counter("aabb"), Counter("abab")) == 0.0
    assert total_variation(Counter("aaaa"), Counter("bbbb")) == 1.0
    assert total_variation(Counter("aaab"), Counter("abbb")) == pytest.approx(0.5)
    assert total_variation(Counter(), Counter("a")) == 1.0


def test_coverage_on_an_imagenet_middle_level(imagenet_sampler: LevelSampler) -> None:
    """The paper space's 400 MFLOPs level (rejection keeps ~3% of uniform draws): looser, fewer draws."""
    rep = coverage_report(imagenet_sampler, 3, 700, random.Random(7))
    assert rep.n_rejection == 700
    worst, tv = rep.max_tv
    assert tv < 0.13, (worst, rep.tv)
    assert sum(rep.tv.values()) / len(rep.tv) < 0.05
    assert sum(rep.tv.values()) < 1.5 * sum(rep.null_tv.values())
    assert rep.min_pvalue[1] > 1e-3, rep.pvalue
    assert rep.max_baseline_tv[1] > 0.2
