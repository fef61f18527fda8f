"""Peak memory of `prepare` against the number of images (is the shards writer streaming?).

    .venv/bin/python bench/bench_prepare_memory.py                    # 5,000 and 50,000 images
    .venv/bin/python bench/bench_prepare_memory.py --counts 1000,10000 --formats shards

Generates an ImageFolder of small JPEGs (48x36, 100 classes) under a temporary directory,
runs the real `evit prepare` once per (format, count) in a fresh process and reads that
process's peak resident set size (`ru_maxrss`); deletes everything afterwards. Tiny images
keep generation fast: what is measured is how memory grows with the number of images
(listing, split, index: O(N) small records) beside the per-image payload, which a
streaming writer must not accumulate. Prints peak RSS per count and the growth in bytes
per added image.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import resource, sys, time
sys.path.insert(0, {root!r})
from evit.config import parse_params
from evit.data.prepare import prepare_data
t0 = time.perf_counter()
s = prepare_data(parse_params({params!r}))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter() - t0, s["bytes"])
"""


def write_tiny_jpegs(root: Path, count: int, classes: int = 100, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base = [rng.integers(0, 256, (36, 48, 3), dtype=np.uint8) for _ in range(16)]
    for i in range(count):
        d = root / "train" / f"c{i % classes:03d}"
        if i < classes:
            d.mkdir(parents=True, exist_ok=True)
        arr = base[i % 16].copy()
        arr[0, :8] = np.frombuffer(i.to_bytes(24, "little"), dtype=np.uint8).reshape(8, 3)  # distinct files
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=85)
        (d / f"{i:07d}.jpg").write_bytes(buf.getvalue())


def run_prepare(src: Path, out: Path, fmt: str) -> dict[str, float]:
    params = {"data": {"source": str(src), "out_dir": str(out), "format": fmt, "storage_resolution": 32,
                       "shard_size": 4096, "min_per_class": 1, "search_fraction": 0.02, "val_fraction": 0.02}}
    code = _CHILD.format(root=str(ROOT), params=params)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rss, seconds, nbytes = done.stdout.split()[-3:]
    return {"peak_rss_bytes": float(rss), "seconds": float(seconds), "output_bytes": float(nbytes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="5000,50000")
    ap.add_argument("--formats", default="shards,npy")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    formats = args.formats.split(",")
    results: dict[str, dict[int, dict[str, float]]] = {f: {} for f in formats}
    with tempfile.TemporaryDirectory(prefix="evit-bench-prepare-") as tmp:
        for n in counts:
            src = Path(tmp) / f"src-{n}"
            t0 = time.perf_counter()
            write_tiny_jpegs(src, n)
            print(f"generated {n} JPEGs in {time.perf_counter() - t0:.1f}s", flush=True)
            for fmt in formats:
                results[fmt][n] = r = run_prepare(src, Path(tmp) / f"out-{fmt}-{n}", fmt)
                print(f"  {fmt:<7} {n:>7} images: peak RSS {r['peak_rss_bytes'] / 2**20:7.1f} MiB, "
                      f"{r['seconds']:6.1f}s, output {r['output_bytes'] / 2**20:7.1f} MiB", flush=True)
    if len(counts) >= 2:
        lo, hi = min(counts), max(counts)
        for fmt in formats:
            grow = (results[fmt][hi]["peak_rss_bytes"] - results[fmt][lo]["peak_rss_bytes"]) / (hi - lo)
            payload = results[fmt][hi]["output_bytes"] / hi
            print(f"{fmt}: peak RSS grows {grow:.0f} bytes per added image (stored payload {payload:.0f} bytes/image)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
