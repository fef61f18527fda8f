"""One subnet per space across runtimes: torch eager, onnxruntime, LiteRT, ExecuTorch (1 thread).

    .venv/bin/python bench/bench_mobile.py                 # cpu largest @48, imagenet smallest @224
    .venv/bin/python bench/bench_mobile.py --repeats 50

Every runtime is timed through its latency device (evit.latency: the same warm-up,
inner repeats, interleaved rounds and thread clock the tables use), on the same static
subnet (random weights: latency does not depend on their values). LiteRT and ExecuTorch
run the XNNPACK kernels a phone runs. Printed: p10 and median ms per runtime, the ratio
of each to LiteRT within this run, and what making the file cost (conversion seconds).
The first run creates the LiteRT converter venv (minutes).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evit.config import DeviceParams  # noqa: E402
from evit.latency.devices import Item, get_device  # noqa: E402
from evit.nn.static import StaticSubnet  # noqa: E402
from evit.space import CPU, IMAGENET  # noqa: E402

RUNTIMES = [("torch eager", "torch-cpu"), ("onnxruntime", "onnxruntime-cpu"), ("LiteRT", "litert"),
            ("ExecuTorch", "executorch")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    imagenet = IMAGENET.with_classes(1000)
    cases = [("cpu space, largest, 48 px", CPU, CPU.largest()),
             ("imagenet space, smallest, 224 px", imagenet, replace(imagenet.smallest(), resolution=224))]
    os.environ.setdefault("EVIT_MODEL_CACHE", tempfile.mkdtemp(prefix="evit-bench-mobile-"))
    print(f"load average at start: {os.getloadavg()}")
    rows = []
    for label, space, arch in cases:
        shape = (1, 3, arch.resolution, arch.resolution)
        result = {}
        for name, kind in RUNTIMES:
            dp = DeviceParams(name=kind, kind=kind, threads=1, warmup=5, repeats=args.repeats, rounds=5)
            dev = get_device(dp)
            dev.check_available()
            t0 = time.monotonic()
            try:
                dev.prepare(Item(functools.partial(StaticSubnet, arch, space), shape, key="subnet"))
                prep = time.monotonic() - t0
                m = dev.measure_many([Item(functools.partial(StaticSubnet, arch, space), shape, key="subnet")])[0]
            finally:
                dev.close()
            result[name] = (m.p10_ms, m.median_ms, prep)
            print(f"  {label} / {name}: p10 {m.p10_ms:.3f} ms, median {m.median_ms:.3f} ms "
                  f"(making the file: {prep:.1f} s)", flush=True)
        rows.append((label, result))
    print(f"load average at end: {os.getloadavg()}\n")
    print("| model | " + " | ".join(f"{n} p10 ms (x LiteRT)" for n, _ in RUNTIMES) + " |")
    print("|---|" + "---|" * len(RUNTIMES))
    for label, result in rows:
        ref = result["LiteRT"][0]
        print(f"| {label} | " + " | ".join(f"{result[n][0]:.2f} ({result[n][0] / ref:.2f}x)" for n, _ in RUNTIMES)
              + " |")
    print("\nmaking the file (s): " + "; ".join(
        f"{label}: " + ", ".join(f"{n} {result[n][2]:.0f}" for n, _ in RUNTIMES) for label, result in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
