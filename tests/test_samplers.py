"""The subnet samplers: level walk, in-level draws, shared mins, memory banks, determinism, state."""

from __future__ import annotations

import random
import zlib
from collections import Counter

import pytest

from evit import flops
from evit.arch import Arch
from evit.space import get_space
from evit.train.banks import BankEntry, MemoryBank, banks_to_json
from evit.train.elastic import (
    CompressedElasticSampler,
    CompressedSettings,
    ElasticSampler,
    ElasticSettings,
    bank_capacities,
    quarter_positions,
)
from evit.train.sampler_factory import make_sampler as _make_sampler
from evit.train.samplers import (
    SAMPLERS,
    ComplexitySampler,
    FlatSampler,
    UniformSampler,
    preference_diff,
    shared_min_level,
    walk_level,
    with_transformer,
)

SPACE = get_space("cpu", num_classes=10)


def make_sampler(name, space, seed, total_steps, steps_per_epoch=10, **kw):
    return _make_sampler(name, space, seed, steps_per_epoch=steps_per_epoch, total_steps=total_steps, **kw)


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
    for name in ("uniform", "complexity", "elastic", "elastic-compressed"):
        a = make_sampler(name, SPACE, 7, 100, level_sampler=level_sampler)
        b = make_sampler(name, SPACE, 7, 100, level_sampler=level_sampler)
        for step in range(15):
            da, db = a.step(step), b.step(step)
            assert da == db  # what every DDP rank relies on
            res = [(d, 1.0 + 0.01 * i + 0.001 * step) for i, d in enumerate(da)]
            fresh = {arch: 1.5 for arch in a.to_score(step)}
            assert list(fresh) == b.to_score(step)
            a.observe(step, res, fresh)
            b.observe(step, res, fresh)
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
        e.observe(step, [(d, 2.0 - 0.1 * i) for i, d in enumerate(de)], {a: 1.0 for a in e.to_score(step)})
        lc.append(dc[0].level)
        le.append(de[0].level)
    assert lc == le


def test_reference_exploit_schedule_counts_absolute_epochs(level_sampler) -> None:
    """+0.15 before every epoch e with (e + 1) a multiple of 100: a short run stays at 0.2."""
    s = ElasticSampler(SPACE, 0, level_sampler, steps_per_epoch=10)
    at_epoch = {e: s.exploit_p(10 * e + 5) for e in (0, 5, 19, 98, 99, 198, 199, 498, 499, 598, 599)}
    assert at_epoch == pytest.approx({0: 0.2, 5: 0.2, 19: 0.2, 98: 0.2, 99: 0.35, 198: 0.35, 199: 0.5,
                                      498: 0.8, 499: 0.95, 598: 0.95, 599: 1.0})
    assert s.exploit_p(0) == s.exploit_p(10 * 6 - 1) == pytest.approx(0.2)  # the photos profile's 6 epochs


def test_compressed_exploit_schedule_spans_the_run(level_sampler) -> None:
    s = CompressedElasticSampler(SPACE, 0, level_sampler, steps_per_epoch=10, total_steps=600)
    assert s.exploit_p(0) == pytest.approx(0.2)
    assert s.exploit_p(99) == pytest.approx(0.2)
    assert s.exploit_p(100) == pytest.approx(0.35)
    assert s.exploit_p(599) == pytest.approx(0.95)
    hot = CompressedElasticSampler(SPACE, 0, level_sampler, 10, 600, CompressedSettings(exploit_p_start=0.9))
    assert hot.exploit_p(599) == 1.0


def test_reference_bank_capacities() -> None:
    paper = (100, 200, 300, 400, 500, 700, 900, 1200)
    assert bank_capacities(paper, ElasticSettings()) == [150] * 4 + [50] * 4  # 50 from 500 MFLOPs up
    assert bank_capacities(paper, ElasticSettings(bank_big_from_m=500)) == [150] * 4 + [50] * 4
    # the cpu space: 5x its lowest level, like 500 over 100
    assert bank_capacities(SPACE.levels, ElasticSettings()) == [150 if lv < 5 * min(SPACE.levels) else 50
                                                                 for lv in SPACE.levels]
    s = ElasticSampler(SPACE, 0, level_sampler=None, steps_per_epoch=10)  # type: ignore[arg-type]
    assert [b.capacity for b in s.banks.values()] == bank_capacities(SPACE.levels, ElasticSettings())


def test_shared_min_subnets_follow_the_reference_buckets(level_sampler) -> None:
    # the reference: keys 200/400/800 on levels 100..1200 -> {100, 200}, {300, 400}, {500, ..., 1200}
    assert [shared_min_level(i, (0, 2, 4)) for i in range(8)] == [0, 0, 2, 2, 4, 4, 4, 4]
    assert [shared_min_level(i, ()) for i in range(3)] == [0, 1, 2]
    c = ComplexitySampler(SPACE, 0, level_sampler, shared_min_levels=(0, 2, 4))
    for step in range(40):
        draws = c.step(step)
        lv = draws[0].level
        assert draws[3].arch == level_sampler.min_arch(shared_min_level(lv, (0, 2, 4)))
    # from params: the default is the reference's 3 shared mins
    assert make_sampler("complexity", SPACE, 0, 10, level_sampler=level_sampler).shared_min_levels == (0, 2, 4)


def test_sampler_names_agree_with_the_config() -> None:
    import typing

    from evit.config.schema import SamplerName

    assert set(typing.get_args(SamplerName)) == set(SAMPLERS)


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


def _observe(s, step, draws, ce_of) -> None:
    """Observe a step as the loop does: training CE per draw, fresh CE for what the sampler asks."""
    s.observe(step, [(d, ce_of(d.arch)) for d in draws], {a: ce_of(a) for a in s.to_score(step)})


def _ce(arch: Arch) -> float:
    return 1.0 + 0.1 * (zlib.crc32(arch.key.encode()) % 7) / 7


@pytest.mark.parametrize("name", ["elastic", "elastic-compressed"])
def test_banks_fill_then_exploit(level_sampler, name: str) -> None:
    if name == "elastic":
        s = ElasticSampler(SPACE, 0, level_sampler, 10, ElasticSettings(bank_capacity=4, bank_capacity_big=4,
                                                                        exploit_p_start=1.0, exploit_p_step=0.0))
    else:
        s = CompressedElasticSampler(SPACE, 0, level_sampler, 10, 200,
                                     CompressedSettings(bank_capacity=4, exploit_p_start=1.0, exploit_p_step=0.0))
    exploited_from_bank = 0
    for step in range(120):
        banks_before = {lv: set(b.entries) for lv, b in s.banks.items()}
        draws = s.step(step)
        lv = draws[0].level
        full = len(banks_before[lv]) > 4 // 2
        for d in draws[:3]:
            if full:  # exploit probability 1 and more than half full: every level draw is a bank draw
                assert d.arch in banks_before[lv]
                exploited_from_bank += 1
        _observe(s, step, draws, _ce)
        for b in s.banks.values():
            assert len(b) <= 4
    assert exploited_from_bank > 30
    for lv, bank in s.banks.items():
        lo, hi = SPACE.level_window(lv)
        assert all(lo <= flops.flops_m(a, SPACE) <= hi for a in bank.entries)


def test_reference_scores_come_from_one_shared_batch_at_the_reference_moments(level_sampler) -> None:
    """Epoch start: every entry of every bank; 1/4, 1/2, 3/4: the current bank; explored draws: inserted."""
    spe = 8
    assert quarter_positions(spe) == {1, 3, 5} and quarter_positions(40) == {9, 19, 29}
    assert quarter_positions(3) == set()  # under 4 steps an epoch: the reference's quarters do not exist
    s = ElasticSampler(SPACE, 0, level_sampler, spe, ElasticSettings(bank_capacity=6, bank_capacity_big=6))
    for step in range(3 * spe):
        draws = s.step(step)
        b = step % spe
        wanted = s.to_score(step)
        explored = set(s._explored.values())
        banked = {lv: set(bk.entries) for lv, bk in s.banks.items()}
        if b == 0:
            expect = {a for entries in banked.values() for a in entries}
        elif b in s.quarters and explored:
            expect = set(banked[draws[0].level])
        else:
            expect = set()
        # no mixup: explored draws are scored by a separate no-grad forward too
        assert set(wanted) == expect | explored
        fresh = {a: 0.5 + 0.01 * step for a in wanted}  # one batch, one moment: the same value
        s.observe(step, [(d, 9.0) for d in draws], fresh)  # training CEs (e.g. a mixed batch) are not used
        for lv, entries in banked.items():
            for a in entries & set(wanted):
                assert s.banks[lv].entries[a].score == pytest.approx(-(0.5 + 0.01 * step))
                assert s.banks[lv].entries[a].step == step
        for a in explored:
            e = s.banks[draws[0].level].entries.get(a)
            assert e is None or e.score == pytest.approx(-(0.5 + 0.01 * step))
        assert all(e.advantage == e.score for bk in s.banks.values() for e in bk.entries.values())
    # without mixup and drop-path, the training forward IS the scoring forward: its CE is reused
    s.scores_from_training = True
    step = 3 * spe + 2  # neither an epoch start nor a quarter
    draws = s.step(step)
    explored = set(s._explored.values())
    assert explored and s.to_score(step) == []
    s.observe(step, [(d, 0.25) for d in draws], {})
    for a in explored:
        e = s.banks[draws[0].level].entries.get(a)
        assert e is None or e.score == pytest.approx(-0.25)


def test_reference_exploited_draws_are_not_rescored_or_reinserted(level_sampler) -> None:
    s = ElasticSampler(SPACE, 0, level_sampler, 1000, ElasticSettings(bank_capacity=4, bank_capacity_big=4,
                                                                       exploit_p_start=1.0, exploit_p_step=0.0))
    for step in range(1, 200):  # never an epoch start or quarter: no re-scoring
        draws = s.step(step)
        before = {a: e for bk in s.banks.values() for a, e in bk.entries.items()}
        exploited = [d.arch for d in draws[:3] if d.arch not in s._explored.values()]
        _observe(s, step, draws, lambda a: 0.1)
        for a in exploited:
            lv = draws[0].level
            assert s.banks[lv].entries[a] == before[a]
        if exploited:
            return
    raise AssertionError("no step exploited")


def test_compressed_scores_are_advantages_and_rescoring_uses_a_clean_min(level_sampler) -> None:
    s = CompressedElasticSampler(SPACE, 0, level_sampler, 4, 100, CompressedSettings(bank_capacity=10,
                                                                                     rescore_per_epoch=1))
    draws = s.step(0)
    lv = draws[0].level
    s.observe(0, [(draws[0], 1.0), (draws[1], 2.0), (draws[2], 3.0), (draws[3], 0.5)])
    assert s.baseline[lv] == pytest.approx(-0.5)  # the min subnet, same step
    entries = s.banks[lv].entries
    assert entries[draws[0].arch].advantage == pytest.approx(-0.5)
    assert entries[draws[2].arch].advantage == pytest.approx(-2.5)
    # training progress: every loss of a later step is lower, the advantages (ranking) stay put
    s.observe(1, [(draws[0], 0.5), (draws[1], 1.5), (draws[2], 2.5), (draws[3], 0.0)])
    assert entries[draws[0].arch].advantage == pytest.approx(-0.5) and entries[draws[0].arch].step == 1
    # re-scoring steps (the last of each epoch): stale entries + the min subnet on the same clean batch.
    # The bug this guards: the min's training CE comes from a MIXED batch (2.0 here); the entries are
    # re-scored on the clean batch, so their advantage must be taken against the clean min (1.0).
    checked = 0
    for step in range(2, 60):
        draws = s.step(step)
        wanted = s.to_score(step)
        if step % 4 != 3:
            assert wanted == []
            _observe(s, step, draws, lambda a: 1.0)
            continue
        level = draws[0].level
        stale = [a for a in wanted if a in s.banks[level].entries]
        if not stale:
            continue
        assert s.min_arch(level) in wanted
        s.observe(step, [(d, 2.0) for d in draws], {a: (1.0 if a == s.min_arch(level) else 0.5) for a in wanted})
        for a in stale:
            assert s.banks[level].entries[a].advantage == pytest.approx(-0.5 + 1.0)
        checked += 1
    assert checked >= 3
    exported = banks_to_json(s.state_dict(), SPACE)[str(lv)]
    assert exported[0]["score"] >= exported[-1]["score"]
    assert {r["arch"] for r in exported} == {a.key for a in entries}


def test_explore_applies_the_preference_rule_once_half_full(level_sampler) -> None:
    settings = ElasticSettings(bank_capacity=2, bank_capacity_big=2, exploit_p_start=0.0, exploit_p_step=0.0,
                               explore_candidates=5)
    e = ElasticSampler(SPACE, 1, level_sampler, 100, settings)
    c = ComplexitySampler(SPACE, 1, level_sampler)
    de, dc = [], []
    for step in range(40):
        a, b = e.step(step), c.step(step)
        _observe(e, step, a, lambda arch: 1.0)
        if step >= 10:
            de += [preference_diff(d.arch, e.anchor(d.level), SPACE) for d in a[:3]]
            dc += [preference_diff(d.arch, e.anchor(d.level), SPACE) for d in b[:3]]
    assert sum(de) / len(de) < sum(dc) / len(dc)
