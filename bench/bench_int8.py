"""fp32 vs int8 latency per runtime, one subnet per space (1 thread), measured in one run.

    .venv/bin/python bench/bench_int8.py                  # cpu largest @48, imagenet smallest @224
    .venv/bin/python bench/bench_int8.py --repeats 50 --spaces cpu

Each runtime that has an int8 path is timed through its latency device at `precision:
fp32` and `precision: int8` (evit.latency: warm-up, inner repeats, the thread clock), on
the same static subnet (random weights: latency does not depend on their values; the int8
program is quantized by the export's own function, evit.formats.quantize, calibrated on
seeded random inputs; LiteRT's in the converter venv with LiteRT's int8 forms). The two
precisions are timed alternately, `--rounds` times, and each one's samples pooled, so load
that drifts during the run hits both. Printed: p10 ms of each and the int8 / fp32 ratio,
and what lowering / converting each file cost.
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
from evit.latency.measurement import Measurement  # noqa: E402
from evit.nn.static import StaticSubnet  # noqa: E402
from evit.space import CPU, IMAGENET  # noqa: E402

RUNTIMES = [("ExecuTorch", "executorch"), ("LiteRT", "litert")]
"""Runtimes with an int8 latency device."""


def _cases(spaces: list[str]) -> list[tuple[str, object, object]]:
    imagenet = IMAGENET.with_classes(1000)
    cases = {"cpu": ("cpu space, largest, 48 px", CPU, CPU.largest()),
             "imagenet": ("imagenet space, smallest, 224 px", imagenet, replace(imagenet.smallest(), resolution=224))}
    return [cases[s] for s in spaces]


def _time_pair(kind: str, space: object, arch: object, repeats: int, rounds: int) -> dict[str, tuple[float, float]]:
    """precision -> (p10 ms over the pooled samples, seconds spent making the file)."""
    shape = (1, 3, arch.resolution, arch.resolution)  # type: ignore[attr-defined]

    def item() -> Item:
        return Item(functools.partial(StaticSubnet, arch, space), shape, key="subnet")

    devices, made = {}, {}
    for precision in ("fp32", "int8"):
        dev = get_device(DeviceParams(name=f"{kind}-{precision}", kind=kind, precision=precision, threads=1,
                                      warmup=5, repeats=max(1, repeats // rounds), rounds=1, convert_jobs=1))
        dev.check_available()
        t0 = time.monotonic()
        dev.prepare(item())
        made[precision] = time.monotonic() - t0
        devices[precision] = dev
    samples: dict[str, list[float]] = {"fp32": [], "int8": []}
    try:
        for _ in range(rounds):
            for precision, dev in devices.items():
                samples[precision].extend(dev.measure_many([item()])[0].samples)
    finally:
        for dev in devices.values():
            dev.close()
    return {p: (Measurement.from_samples(s).p10_ms, made[p]) for p, s in samples.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--spaces", nargs="+", default=["cpu", "imagenet"], choices=["cpu", "imagenet"])
    ap.add_argument("--runtimes", nargs="+", default=[n for n, _ in RUNTIMES], choices=[n for n, _ in RUNTIMES])
    args = ap.parse_args()
    os.environ.setdefault("EVIT_MODEL_CACHE", tempfile.mkdtemp(prefix="evit-bench-int8-"))
    print(f"load average at start: {os.getloadavg()}")
    rows = []
    for label, space, arch in _cases(args.spaces):
        for name, kind in [(n, k) for n, k in RUNTIMES if n in args.runtimes]:
            r = _time_pair(kind, space, arch, args.repeats, args.rounds)
            rows.append((label, name, r))
            print(f"  {label} / {name}: fp32 p10 {r['fp32'][0]:.3f} ms, int8 p10 {r['int8'][0]:.3f} ms "
                  f"(making the files: {r['fp32'][1]:.0f} s / {r['int8'][1]:.0f} s)", flush=True)
    print(f"load average at end: {os.getloadavg()}\n")
    print("| model | runtime | fp32 p10 ms | int8 p10 ms | int8 / fp32 | making the file s (fp32 / int8) |")
    print("|---|---|---|---|---|---|")
    for label, name, r in rows:
        print(f"| {label} | {name} | {r['fp32'][0]:.3f} | {r['int8'][0]:.3f} | {r['int8'][0] / r['fp32'][0]:.2f}x | "
              f"{r['fp32'][1]:.0f} / {r['int8'][1]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
