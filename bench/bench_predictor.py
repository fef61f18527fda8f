"""Latency predictor throughput: subnets scored per second, scalar and vectorised, vs FLOPs.

    .venv/bin/python bench/bench_predictor.py                     # cpu and imagenet spaces
    .venv/bin/python bench/bench_predictor.py --lut luts/cpu-1t.json --space cpu

Search scores whole populations with `LatencyPredictor.predict_many`; the goal is at
least 100,000 subnets/s. The counter it is compared with is `evit.flops.count` (the
analytic FLOPs counter with its own per-stage cache), which search would otherwise use.

Without --lut the table's values are each block's MFLOPs (timing only: the predictor's
speed does not depend on the numbers, and a real table of the paper space takes hours
on a CPU). Caches are warmed on a separate set first, as in a search after its first
generation; the timed subnets are fresh random draws, so most lookups still hit the
per-stage caches exactly as in search. Ratios within one run are what to compare.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evit import flops  # noqa: E402
from evit.latency.coverage import unique_blocks  # noqa: E402
from evit.latency.predictor import LatencyPredictor  # noqa: E402
from evit.space import get_space  # noqa: E402


def rate(fn, n: int, repeats: int = 3) -> float:
    """Best-of-`repeats` items per second (the least disturbed run on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def bench_space(name: str, n: int, lut: Path | None) -> dict[str, float]:
    space = get_space(name)
    if lut is not None:
        predictor = LatencyPredictor.load(lut, space)
        source = str(lut)
    else:
        predictor = LatencyPredictor(space, {b.key: flops.block_flops(b) / 1e6 for b in unique_blocks(space)})
        source = "synthetic (block MFLOPs)"
    rng = random.Random(0)
    warm = [space.sample_uniform(rng) for _ in range(n)]
    archs = [space.sample_uniform(rng) for _ in range(n)]
    predictor.predict_many(warm)
    for a in warm:
        flops.count(a, space)
    out = {
        "predict_many_per_s": rate(lambda: predictor.predict_many(archs), n),
        "predict_per_s": rate(lambda: [predictor.predict(a) for a in archs], n),
        "flops_count_per_s": rate(lambda: [flops.count(a, space) for a in archs], n),
    }
    print(f"\n{name} space ({len(unique_blocks(space))} LUT entries; table: {source}; {n} subnets)")
    for k, v in out.items():
        print(f"  {k:22s} {v:12,.0f}")
    print(f"  vectorised / FLOPs counter: {out['predict_many_per_s'] / out['flops_count_per_s']:.2f}x; "
          f"goal >= 100,000/s: {'met' if out['predict_many_per_s'] >= 100_000 else 'NOT met'}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", action="append", choices=["cpu", "imagenet"], help="default: both")
    ap.add_argument("--n", type=int, default=50_000, help="subnets per timing")
    ap.add_argument("--lut", type=Path, default=None, help="a built LUT of the (single) --space")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    spaces = args.space or ["cpu", "imagenet"]
    if args.lut is not None and len(spaces) != 1:
        ap.error("--lut needs exactly one --space")
    results = {s: bench_space(s, args.n, args.lut) for s in spaces}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r["predict_many_per_s"] >= 100_000 for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
