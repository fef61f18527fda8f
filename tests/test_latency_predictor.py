"""The predictor's arithmetic, its correction and fallback, and its speed."""

from __future__ import annotations

import random
import time
import zlib

import numpy as np
import pytest
from test_latency_helpers import TINY, all_archs

from evit.blocks import arch_blocks
from evit.errors import LUTError
from evit.latency.coverage import unique_blocks
from evit.latency.predictor import BlockRegression, Correction, LatencyPredictor, block_features, fit_affine
from evit.latency.report import choose_correction, error_metrics, flops_proxy
from evit.space import get_space


def _entries(space) -> dict[str, float]:
    """Distinct, reproducible per-block values (the arithmetic does not care what they are)."""
    return {b.key: 0.01 + (zlib.crc32(b.key.encode()) % 1000) / 1000 for b in unique_blocks(space)}


def test_prediction_is_the_sum_of_the_blocks_counting_overhead_once() -> None:
    entries = _entries(TINY)
    pred = LatencyPredictor(TINY, entries, overhead_ms=0.005)
    archs = all_archs(TINY)
    expected = [0.005 + sum(entries[b.key] - 0.005 for b in arch_blocks(a, TINY)) for a in archs]
    assert [pred.predict(a) for a in archs] == pytest.approx(expected, rel=1e-12)
    assert pred.predict_many(archs) == pytest.approx(expected, rel=1e-12)
    assert pred.predict_many(archs).dtype == np.float64


def test_correction_is_applied_only_when_used() -> None:
    entries = _entries(TINY)
    a = all_archs(TINY)[3]
    raw = LatencyPredictor(TINY, entries).predict(a)
    assert LatencyPredictor(TINY, entries, correction=Correction(2.0, 0.5, used=False)).predict(a) == raw
    used = LatencyPredictor(TINY, entries, correction=Correction(2.0, 0.5, used=True))
    assert used.predict(a) == pytest.approx(2 * raw + 0.5)
    assert used.predict_many([a])[0] == pytest.approx(2 * raw + 0.5)
    assert used.raw(a) == pytest.approx(raw)


def test_a_block_missing_from_a_full_table_is_an_error() -> None:
    entries = _entries(TINY)
    arch = all_archs(TINY)[0]
    gone = arch_blocks(arch, TINY)[2].key
    del entries[gone]
    with pytest.raises(LUTError, match=f"no entry '{gone.replace('|', '.')}'"):
        LatencyPredictor(TINY, entries, source="luts/x.json").predict(arch)


def test_fallback_regression_fills_blocks_a_sampled_table_lacks() -> None:
    cpu = get_space("cpu")
    blocks = unique_blocks(cpu)
    coef = {"first_conv": [0.01, 0.2, 0.0, 0.0, 0.0], "mbconv": [0.02, 0.3, 0.1, 0.0, 0.0],
            "attn": [0.03, 0.25, 0.0, 0.5, 0.2], "head": [0.01, 0.1, 0.0, 1.0, 0.0]}
    truth = {b.key: float(np.dot(coef[b.kind], block_features(b))) for b in blocks}
    # a sampled table: every first conv and head, half of the rest
    kept = {b.key: truth[b.key] for i, b in enumerate(blocks) if b.kind in ("first_conv", "head") or i % 2}
    by_key = {b.key: b for b in blocks}
    reg = BlockRegression.fit([by_key[k] for k in kept], list(kept.values()))
    for b in blocks:
        if b.kind in ("mbconv", "attn"):  # kinds with enough samples get their own exact fit
            assert reg.predict(b) == pytest.approx(truth[b.key], rel=1e-6, abs=1e-9)
    pred = LatencyPredictor(cpu, kept, fallback=reg)
    rng = random.Random(0)
    for _ in range(50):
        a = cpu.sample_uniform(rng)
        assert pred.predict(a) == pytest.approx(sum(truth[b.key] for b in arch_blocks(a, cpu)), rel=1e-6)


def test_fit_affine_recovers_scale_and_offset() -> None:
    raw = np.linspace(1.0, 5.0, 40)
    a, b = fit_affine(raw, 1.2 * raw + 0.3)
    assert (a, b) == (pytest.approx(1.2), pytest.approx(0.3))


def test_correction_kept_only_if_it_lowers_held_out_error() -> None:
    rng = np.random.default_rng(0)
    raw = rng.uniform(1.0, 5.0, 60)
    noise = 1 + rng.normal(0, 0.01, 60)
    scaled = choose_correction(raw, (1.25 * raw + 0.2) * noise)
    assert scaled.correction.form == "affine" and scaled.correction.a == pytest.approx(1.25, rel=0.05)
    assert error_metrics(scaled.predicted, (1.25 * raw + 0.2) * noise)["within_10pct"] == 1.0
    assert set(scaled.details["cv_mape_pct"]) == {"none", "affine"}
    # already right: a fitted line only adds variance, so none is used
    exact = choose_correction(raw, raw * noise)
    assert not exact.correction.used and np.array_equal(exact.predicted, raw)


def test_per_resolution_offsets_when_the_error_depends_on_the_input_size() -> None:
    rng = np.random.default_rng(1)
    raw = rng.uniform(1.0, 5.0, 90)
    res = np.array([32, 40, 48] * 30)
    offset = {32: -0.3, 40: 0.0, 48: 0.4}
    measured = (raw + np.array([offset[r] for r in res])) * (1 + rng.normal(0, 0.005, 90))
    choice = choose_correction(raw, measured, res)
    c = choice.correction
    assert c.form == "affine+resolution" and c.a == pytest.approx(1.0, abs=0.02)
    assert {r: round(v, 1) for r, v in c.b_by_resolution.items()} == offset
    assert error_metrics(choice.predicted, measured)["within_5pct"] == 1.0
    assert Correction.from_dict(c.to_dict()) == c
    # the predictor applies it per arch, scalar and vectorised alike
    entries = _entries(TINY)
    tiny_c = Correction(1.1, 0.0, used=True, b_by_resolution={16: 0.5, 24: -0.1})
    pred = LatencyPredictor(TINY, entries, correction=tiny_c)
    base = LatencyPredictor(TINY, entries)
    archs = all_archs(TINY)
    want = [1.1 * base.predict(a) + (0.5 if a.resolution == 16 else -0.1) for a in archs]
    assert [pred.predict(a) for a in archs] == pytest.approx(want)
    assert pred.predict_many(archs) == pytest.approx(want)


def test_per_kind_scales_when_block_kinds_carry_over_differently() -> None:
    """A runtime whose attention blocks cost the same inside a whole subnet as alone, but whose
    MBConv blocks cost half (what LiteRT shows): one scale for the sum cannot fit it; a scale
    per kind can, is chosen on held-out error, and the predictor applies it in both paths."""
    cpu = get_space("cpu")
    entries = _entries(cpu)
    base = LatencyPredictor(cpu, entries, overhead_ms=0.004)
    rng = random.Random(5)
    archs = [cpu.sample_uniform(rng) for _ in range(60)]
    kinds = base.kind_costs(archs)
    assert kinds.shape == (60, 4) and base.raw_many(archs) == pytest.approx(0.004 + kinds.sum(axis=1))
    truth = {"first_conv": 1.0, "mbconv": 0.5, "attn": 1.0, "head": 1.2}
    noise = 1 + np.random.default_rng(0).normal(0, 0.003, 60)
    measured = (0.004 + 0.02 + kinds @ np.array([truth[k] for k in ("first_conv", "mbconv", "attn", "head")])) * noise
    choice = choose_correction(base.raw_many(archs), measured, kind_costs=kinds, overhead_ms=0.004)
    c = choice.correction
    assert c.form == "per-kind" and choice.details["cv_mape_pct"]["per-kind"] < choice.details["cv_mape_pct"]["affine"]
    assert {k: round(v, 1) for k, v in c.kind_scale.items()} == truth
    assert error_metrics(choice.predicted, measured)["within_5pct"] == 1.0  # held-out predictions
    assert Correction.from_dict(c.to_dict()) == c
    pred = LatencyPredictor(cpu, entries, overhead_ms=0.004, correction=c)
    assert pred.predict_many(archs) == pytest.approx([pred.predict(a) for a in archs], rel=1e-12)
    assert pred.predict_many(archs) == pytest.approx(measured, rel=0.02)
    # a kind the data cannot pin down (a scale <= 0) rules the form out
    flat = 0.004 + kinds[:, 2] + 0.05 - 0.9 * kinds[:, 1]
    assert choose_correction(base.raw_many(archs), np.maximum(flat, 0.01), kind_costs=kinds,
                             overhead_ms=0.004).correction.form != "per-kind"


def test_flops_proxy_scale() -> None:
    f = np.array([1.0, 2.0, 4.0])
    assert flops_proxy(f, 3 * f) == pytest.approx(3 * f)


def test_vectorised_tables_agree_with_the_scalar_path() -> None:
    cpu = get_space("cpu")
    pred = LatencyPredictor(cpu, _entries(cpu), overhead_ms=0.002)
    rng = random.Random(3)
    archs = [cpu.sample_uniform(rng) for _ in range(500)]
    assert pred.predict_many(archs) == pytest.approx([pred.predict(a) for a in archs], rel=1e-12)
    assert pred.predict_many([]).shape == (0,)


def test_subnet_outside_the_table_is_an_error_in_both_paths() -> None:
    from dataclasses import replace

    pred = LatencyPredictor(TINY, _entries(TINY))
    bad = replace(all_archs(TINY)[0], resolution=20)
    with pytest.raises(LUTError, match="no entry 'first_conv.r20"):
        pred.predict(bad)
    with pytest.raises(LUTError, match="no entry 'first_conv.r20"):
        pred.predict_many([all_archs(TINY)[1], bad])


def test_predict_many_is_fast() -> None:
    cpu = get_space("cpu")
    pred = LatencyPredictor(cpu, _entries(cpu))
    rng = random.Random(0)
    archs = [cpu.sample_uniform(rng) for _ in range(20000)]
    pred.predict_many(archs[:2000])  # fill the per-stage caches
    t = time.perf_counter()
    pred.predict_many(archs)
    rate = len(archs) / (time.perf_counter() - t)
    # bench/bench_predictor.py measures ~400k/s; leave room for a loaded shared machine
    assert rate > 100_000, f"{rate:.0f} subnets/s"
