"""The three subnet samplers: level walk, in-level draws, memory banks, determinism, state."""

from __future__ import annotations

import random
import zlib
from collections import Counter

import pytest

from evit import flops
from evit.arch import Arch
from evit.space import get_space
from evit.train.banks import BankEntry, MemoryBank, banks_to_json
from evit.train.samplers import (
    ComplexitySampler,
    ElasticSampler,
    ElasticSettings,
    FlatSampler,
    UniformSampler,
    make_sampler,
    preference_diff,
    walk_level,
    with_transformer,
)

SPACE = get_space("cpu", num_classes=10)


@pytest.fixture(scope="module")
def level_sampler():
    from evit.level_sampler import LevelSampler

    return LevelSampler(SPACE)


def test_level_walk_moves_by_one_and_stays_twice_as_likely_at_the_ends() -> None:
    rng = random.Random(0)
    n = 6
    for start, expect in ((0, {0: 2 / 3, 1: 1 / 3}), (n - 1, {n - 1: 2 / 3, n - 2: 1 / 3}),
                          (2, {1: 1 / 3, 2: 1 / 3, 3: 1 / 3})):
        counts = Counter(walk_level(start, n, rng) for _ in range(6000))
        assert set(counts) == set(expect)
        for lv, p in expect.items():
            assert counts[lv] / 6000 == pytest.approx(p, abs=0.03)
    assert walk_level(0, 1, rng) == 0


def test_uniform_sampler_is_the_sandwich_rule() -> None:
    draws = UniformSampler(SPACE, seed=0).step(0)
    assert [d.role for d in draws] == ["max", "min", "rand0", "rand1"]
    assert draws[0].arch == SPACE.largest() and draws[1].arch == SPACE.smallest()
    assert [d.distill for d in draws] == [False, True, True, True]
    assert all(SPACE.is_valid(d.arch) for d in draws)


def test_flat_control_has_complexity_step_structure_with_draws_over_the_whole_space(level_sampler) -> None:
    """The control differs from `complexity` only in where its 3 supervised draws come from."""
    flat, cx = FlatSampler(SPACE, seed=0), ComplexitySampler(SPACE, 0, level_sampler)
    f_draws, c_draws = flat.step(0), cx.step(0)
    assert [d.distill for d in f_draws] == [d.distill for d in c_draws] == [False, False, False, True]
    assert [d.role for d in f_draws] == ["rand0", "rand1", "rand2", "min"]
    assert f_draws[-1].arch == SPACE.smallest() and all(d.level is None for d in f_draws)
    # Over many steps the draws span the whole space's FLOPs range (not one level's window).
    fl = [flops.flops_m(d.arch, SPACE) for i in range(1, 60) for d in flat.step(i)[:3]]
    lo, hi = flops.flops_m(SPACE.smallest(), SPACE), flops.flops_m(SPACE.largest(), SPACE)
    assert min(fl) < lo + 0.25 * (hi - lo) and max(fl) > lo + 0.6 * (hi - lo)
    # Deterministic from the seed and resumable from its state.
    again = FlatSampler(SPACE, seed=0)
    assert [d.arch for d in again.step(0)] == [d.arch for d in f_draws]
    resumed = make_sampler("flat", SPACE, 0, 100)
    resumed.load_state_dict(flat.state_dict())
    assert [d.arch for d in resumed.step(60)] == [d.arch for d in flat.step(60)]


def test_complexity_sampler_draws_three_in_level_plus_the_level_min(level_sampler) -> None:
    s = ComplexitySampler(SPACE, 0, level_sampler)
    prev = 0
    levels = []
    for step in range(60):
        draws = s.step(step)
        lv = draws[0].level
        levels.append(lv)
        assert abs(lv - prev) <= 1
        prev = lv
        assert [d.role for d in draws] == ["level0", "level1", "level2", "min"]
        assert [d.distill for d in draws] == [False, False, False, True]
        lo, hi = SPACE.level_window(lv)
        for d in draws[:3]:
            assert lo <= flops.flops_m(d.arch, SPACE) <= hi
        assert draws[3].arch == level_sampler.min_arch(lv)
        assert all(d.arch != SPACE.largest() for d in draws)
    assert len(set(levels)) > 2  # the walk does move


def test_same_seed_same_draws_and_state_round_trip(level_sampler) -> None:
    for name in ("uniform", "complexity", "elastic"):
        a = make_sampler(name, SPACE, 7, 100, level_sampler=level_sampler)
        b = make_sampler(name, SPACE, 7, 100, level_sampler=level_sampler)
        for step in range(15):
            da, db = a.step(step), b.step(step)
            assert da == db  # what every DDP rank relies on
            res = [(d, 1.0 + 0.01 * i + 0.001 * step) for i, d in enumerate(da)]
            a.observe(step, res)
            b.observe(step, res)
        state = a.state_dict()
        cont = [a.step(s) for s in range(15, 25)]
        c = make_sampler(name, SPACE, 7, 100, level_sampler=level_sampler)
        c.load_state_dict(state)
        assert [c.step(s) for s in range(15, 25)] == cont
        with pytest.raises(ValueError, match="sampler state"):
            make_sampler("uniform" if name != "uniform" else "complexity", SPACE, 7, 100,
                         level_sampler=level_sampler).load_state_dict(state)


def test_complexity_and_elastic_walk_the_same_levels(level_sampler) -> None:
    c = make_sampler("complexity", SPACE, 3, 50, level_sampler=level_sampler)
    e = make_sampler("elastic", SPACE, 3, 50, level_sampler=level_sampler)
    lc, le = [], []
    for step in range(40):
        dc, de = c.step(step), e.step(step)
        e.observe(step, [(d, 2.0 - 0.1 * i) for i, d in enumerate(de)])
        lc.append(dc[0].level)
        le.append(de[0].level)
    assert lc == le


def test_exploit_probability_schedule(level_sampler) -> None:
    s = ElasticSampler(SPACE, 0, level_sampler, total_steps=600)
    assert s.exploit_p(0) == pytest.approx(0.2)
    assert s.exploit_p(99) == pytest.approx(0.2)
    assert s.exploit_p(100) == pytest.approx(0.35)
    assert s.exploit_p(599) == pytest.approx(0.95)
    assert ElasticSampler(SPACE, 0, level_sampler, 600, ElasticSettings(exploit_p_start=0.9)).exploit_p(599) == 1.0


def _arch(i: int) -> Arch:
    return SPACE.sample_uniform(random.Random(i))


def test_memory_bank_replace_worst_and_softmax_draws() -> None:
    bank = MemoryBank(3)
    for i, adv in enumerate((0.0, -1.0, 0.5)):
        assert bank.offer(_arch(i), BankEntry(-1.0 + adv, adv, i))
    assert not bank.offer(_arch(10), BankEntry(-3.0, -2.0, 10))  # worse than the worst: rejected
    assert bank.offer(_arch(11), BankEntry(0.0, 0.2, 11))  # replaces the worst (adv -1.0)
    assert _arch(1) not in bank and _arch(11) in bank and len(bank) == 3
    assert bank.best() == _arch(2)
    two = MemoryBank(2)
    two.offer(_arch(0), BankEntry(0.0, 0.0, 0))
    two.offer(_arch(1), BankEntry(0.0, float(__import__("math").log(3.0)), 0))
    rng = random.Random(0)
    counts = Counter(two.draw(rng) for _ in range(8000))
    assert counts[_arch(1)] / 8000 == pytest.approx(0.75, abs=0.02)


def test_preference_rule_favours_wide_shallow_transformers() -> None:
    anchor = SPACE.smallest()
    wide = with_transformer(anchor, SPACE.largest(), "width")   # anchor depths, max widths
    deep = with_transformer(anchor, SPACE.largest(), "depth")   # anchor widths, max depths
    assert preference_diff(wide, anchor, SPACE) < 0 < preference_diff(deep, anchor, SPACE)


def test_elastic_banks_fill_then_exploit(level_sampler) -> None:
    settings = ElasticSettings(bank_capacity=4, exploit_p_start=1.0, exploit_p_step=0.0)
    s = ElasticSampler(SPACE, 0, level_sampler, 200, settings)
    exploited_from_bank = 0
    for step in range(120):
        banks_before = {lv: set(b.entries) for lv, b in s.banks.items()}
        draws = s.step(step)
        lv = draws[0].level
        full = len(banks_before[lv]) > settings.bank_capacity // 2
        for d in draws[:3]:
            if full:  # exploit probability 1 and more than half full: every level draw is a bank draw
                assert d.arch in banks_before[lv]
                exploited_from_bank += 1
        s.observe(step, [(d, 1.0 + 0.1 * (zlib.crc32(d.arch.key.encode()) % 7) / 7) for d in draws])
        for b in s.banks.values():
            assert len(b) <= settings.bank_capacity
    assert exploited_from_bank > 30
    for lv, bank in s.banks.items():
        lo, hi = SPACE.level_window(lv)
        assert all(lo <= flops.flops_m(a, SPACE) <= hi for a in bank.entries)


def test_elastic_scores_are_advantages_over_the_level_baseline(level_sampler) -> None:
    s = ElasticSampler(SPACE, 0, level_sampler, 100, ElasticSettings(bank_capacity=10))
    draws = s.step(0)
    lv = draws[0].level
    s.observe(0, [(draws[0], 1.0), (draws[1], 2.0), (draws[2], 3.0), (draws[3], 0.5)])
    assert s.baseline[lv] == pytest.approx(-0.5)  # the level's min subnet, same step
    entries = s.banks[lv].entries
    assert entries[draws[0].arch].advantage == pytest.approx(-0.5)
    assert entries[draws[2].arch].advantage == pytest.approx(-2.5)
    assert draws[3].arch not in entries or draws[3].arch in {d.arch for d in draws[:3]}  # min is not banked
    # training progress: every loss of a later step is lower, the advantages (ranking) stay put
    s.observe(1, [(draws[0], 0.5), (draws[1], 1.5), (draws[2], 2.5), (draws[3], 0.0)])
    assert entries[draws[0].arch].advantage == pytest.approx(-0.5) and entries[draws[0].arch].step == 1
    # a re-measured entry is compared with the reference of the step that re-measured it
    stale = s.stale_entries(lv, 2)
    assert len(stale) == 2
    s.rescore(1, lv, stale[0], 0.3)
    assert entries[stale[0]].step == 1 and entries[stale[0]].score == pytest.approx(-0.3)
    assert entries[stale[0]].advantage == pytest.approx(-0.3)
    exported = banks_to_json(s.state_dict(), SPACE)[str(lv)]
    assert exported[0]["score"] >= exported[-1]["score"]
    assert {r["arch"] for r in exported} == {a.key for a in entries}


def test_explore_applies_the_preference_rule_once_half_full(level_sampler) -> None:
    settings = ElasticSettings(bank_capacity=2, exploit_p_start=0.0, exploit_p_step=0.0, explore_candidates=5)
    e = ElasticSampler(SPACE, 1, level_sampler, 100, settings)
    c = ComplexitySampler(SPACE, 1, level_sampler)
    de, dc = [], []
    for step in range(40):
        a, b = e.step(step), c.step(step)
        e.observe(step, [(d, 1.0) for d in a])
        if step >= 10:
            de += [preference_diff(d.arch, e.anchor(d.level), SPACE) for d in a[:3]]
            dc += [preference_diff(d.arch, e.anchor(d.level), SPACE) for d in b[:3]]
    assert sum(de) / len(de) < sum(dc) / len(dc)
