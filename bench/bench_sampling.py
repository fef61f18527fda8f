"""In-level subnet sampling and FLOPs counting: throughput, and coverage against rejection.

    .venv/bin/python bench/bench_sampling.py            # both presets, all levels
    .venv/bin/python bench/bench_sampling.py --quick    # fewer draws (a minute on 2 cores)

Prints, per preset:
- FLOPs counts/s of `evit.flops.flops_m` on fresh random subnets, on a cold table (first
  pass) and warm, `flops_many`, and the slow definition (sum over `arch_blocks`) for the
  ratio; goal >= 100,000 counts/s.
- Per level: `LevelSampler.sample` subnets/s (goal >= 1,000) against rejection sampling
  (`space.sample_uniform` + the exact window test) in-window subnets/s, and their ratio.
- Coverage: per level where rejection is affordable, the total-variation distance
  between the two samplers' marginals (resolution, stem, every stage field, and the
  FLOPs position inside the window), the smallest chi-square p-value over those
  marginals, and, for scale, the TV of a level-blind sampler (plain uniform draws).

Rates are CPU seconds of this process (one core; `time.process_time`), best of a few
repeats, so a busy shared machine disturbs them less; ratios within one run are what
to compare across machines.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evit import blocks as blocks_mod  # noqa: E402
from evit import flops  # noqa: E402
from evit.level_coverage import coverage_report  # noqa: E402
from evit.level_sampler import LevelSampler  # noqa: E402
from evit.space import SearchSpace, get_space  # noqa: E402


def cpu_rate(fn: Callable[[], object], n: int, repeats: int = 3) -> float:
    """Best-of-`repeats` items per CPU second."""
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return n / max(best, 1e-9)


def bench_counter(space: SearchSpace, n: int) -> dict[str, float]:
    rng = random.Random(0)
    archs = [space.sample_uniform(rng) for _ in range(n)]
    # a space equal in structure but new to the counter: its tables start empty
    fresh = get_space(space.name, num_classes=space.num_classes + 1)
    fresh_archs = [fresh.sample_uniform(rng) for _ in range(n)]
    t = time.process_time()
    for a in fresh_archs:
        flops.flops_m(a, fresh)
    cold = n / max(time.process_time() - t, 1e-9)
    for a in archs:  # warm
        flops.flops_m(a, space)
    warm = cpu_rate(lambda: [flops.flops_m(a, space) for a in archs], n)
    many = cpu_rate(lambda: flops.flops_many(archs, space), n)
    counts = cpu_rate(lambda: [flops.count(a, space) for a in archs], n)
    k = max(1, n // 20)

    def reference() -> None:
        for a in archs[:k]:
            sum(map(flops.block_flops, blocks_mod.arch_blocks(a, space)))

    ref = cpu_rate(reference, k, repeats=1)
    return {"flops_m_cold_per_s": cold, "flops_m_warm_per_s": warm, "flops_many_per_s": many,
            "count_per_s": counts, "block_sum_reference_per_s": ref, "speedup_vs_reference": warm / ref}


def rejection_rate(space: SearchSpace, level: int, seconds: float, rng: random.Random) -> tuple[float, int, int]:
    """In-window subnets per CPU second by uniform draws + the exact window test."""
    lo, hi = space.level_window(level)
    t = flops.cost_tables(space)
    hits = tried = 0
    start = time.process_time()
    while time.process_time() - start < seconds:
        for _ in range(200):
            a = space.sample_uniform(rng)
            tried += 1
            if lo <= t.macs(a) / 1e6 <= hi:
                hits += 1
    return hits / (time.process_time() - start), hits, tried


Row = dict[str, object]


def bench_levels(space: SearchSpace, draws: int, rejection_s: float) -> tuple[LevelSampler, list[Row], float]:
    t = time.process_time()
    ls = LevelSampler(space)
    build = time.process_time() - t
    rows = []
    for lv in range(len(space.levels)):
        rng = random.Random(lv)
        ls.sample(lv, rng)
        rate = cpu_rate(lambda: [ls.sample(lv, rng) for _ in range(draws)], draws)
        rej, hits, tried = rejection_rate(space, lv, rejection_s, random.Random(1000 + lv))
        rows.append({"level": space.levels[lv], "window": list(space.level_window(lv)),
                     "subnets_per_s": round(rate), "rejection_in_window_per_s": round(rej, 1),
                     "rejection_acceptance": round(hits / max(1, tried), 5),
                     "speedup": round(rate / rej, 1) if rej > 0 else None,
                     "in_window_subnets": float(f"{ls.count_in_window(lv):.3g}"),
                     "min_arch": ls.min_arch(lv).key,
                     "min_arch_flops_m": round(flops.flops_m(ls.min_arch(lv), space), 3)})
    return ls, rows, build


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer draws: a rough run in about a minute")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args, _unknown = ap.parse_known_args()  # bench/run_all.py passes its arguments to every bench
    quick = args.quick
    n_count = 10_000 if quick else 50_000
    draws = 300 if quick else 2000
    rej_s = 0.5 if quick else 2.0
    n_cov = 600 if quick else 3000
    results: dict[str, object] = {}
    coverage_levels = {"cpu": None, "imagenet": [1, 3, 5] if not quick else [3]}
    for name in ("cpu", "imagenet"):
        space = get_space(name)
        print(f"\n## space {name}: levels {list(space.levels)} MFLOPs, tolerance {space.tolerance}")
        c = bench_counter(space, n_count)
        print("FLOPs counter (counts per CPU second): "
              + ", ".join(f"{k} {v:,.0f}" if k != "speedup_vs_reference" else f"{k} {v:.1f}x" for k, v in c.items()))
        ls, rows, build = bench_levels(space, draws, rej_s)
        print(f"LevelSampler built in {build:.2f} CPU s")
        print(f"{'level':>6} {'subnets/s':>10} {'rejection/s':>12} {'accept':>8} {'speedup':>8} "
              f"{'#in window':>11}  min arch")
        for r in rows:
            print(f"{r['level']:>6} {r['subnets_per_s']:>10,} {r['rejection_in_window_per_s']:>12,.1f} "
                  f"{r['rejection_acceptance']:>8.4f} {str(r['speedup']) + 'x':>8} {r['in_window_subnets']:>11.3g}  "
                  f"{r['min_arch']} ({r['min_arch_flops_m']} M)")
        cov = []
        levels = coverage_levels[name] if coverage_levels[name] is not None else range(len(space.levels))
        print(f"coverage vs rejection sampling (up to {n_cov} draws each; 'noise' = the mean TV two samples "
              "of one distribution would show at these sizes):")
        for lv in levels:
            rep = coverage_report(ls, lv, n_cov, random.Random(500 + lv), max_uniform_draws=60 * n_cov)
            s = rep.summary()
            cov.append(s)
            print(f"  level {space.levels[lv]:>5}: rejection kept {rep.n_rejection}/{rep.uniform_draws}; "
                  f"mean TV {s['mean_tv']:.3f} (noise {s['mean_null_tv']:.3f}), "
                  f"max TV {s['max_tv'][1]:.3f} ({s['max_tv'][0]}), "
                  f"min p {s['min_pvalue'][1]:.4f} ({s['min_pvalue'][0]}; x{s['marginals']} marginals: "
                  f"{s['min_pvalue_bonferroni']:.3f}); "
                  f"level-blind sampler: max TV {s['level_blind_max_tv'][1]:.3f} ({s['level_blind_max_tv'][0]})")
        results[name] = {"counter": c, "levels": rows, "build_cpu_s": build, "coverage": cov,
                         "restarts": ls.stats.restarts, "draws": ls.stats.draws}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
