"""Loader throughput per worker at 224 px: `npy` against `shards` data, train and eval transforms.

    .venv/bin/python bench/bench_loader.py                    # 256 generated photos, ~1 min on 1 core
    .venv/bin/python bench/bench_loader.py --images 1000 --gpu-images-per-s 3000

A DataLoader worker is one process turning stored images into tensors, so the rate of
one process (1 torch thread) over a split is the per-worker rate; a GPU step that consumes
G images/s needs ceil(G / rate) workers. The photos are generated ImageNet-like JPEGs
(500x375, quality 90, smooth structure + noise, so their size and decode cost are close to
ImageNet's ~110 KB average), prepared once per format with the real `prepare` stage:
npy at `--storage-resolution` (the imagenet profile's 288) and shards (JPEG kept as is).
Transforms are what training uses: timm's train transform with the imagenet profile's
augmentation (RandomResizedCrop, flip, RandAugment m5 n1, random erasing 0.2) and its eval
transform. Prints images/s per worker for each (format, transform) and the shards / npy
ratio; with --gpu-images-per-s, the workers per GPU each format needs.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evit.config import parse_params  # noqa: E402
from evit.data.loader import PreparedData  # noqa: E402
from evit.data.prepare import prepare_data  # noqa: E402

PAPER_AUG = {"auto_augment": "rand-m5-n1-mstd0.5", "re_prob": 0.2, "hflip": 0.5}
"""params.imagenet.yaml's train augmentation."""


def write_photos(root: Path, images: int, classes: int = 4, size: tuple[int, int] = (500, 375),
                 quality: int = 90, seed: int = 0) -> Path:
    """An ImageFolder of ImageNet-like JPEGs: low-frequency colour fields plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(images):
        d = root / "train" / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        noise = rng.normal(0, 12, (h, w, 3))
        arr = np.clip(field + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=quality)
        (d / f"{i:06d}.JPEG").write_bytes(buf.getvalue())
    return root


def prepare(src: Path, out: Path, fmt: str, storage_resolution: int) -> PreparedData:
    params = parse_params({"data": {"source": str(src), "out_dir": str(out), "format": fmt,
                                    "storage_resolution": storage_resolution, "search_fraction": 0.05,
                                    "val_fraction": 0.05, "min_per_class": 1, "shard_size": 4096}})
    prepare_data(params)
    return PreparedData(out)


def per_worker_rate(data: PreparedData, resolution: int, *, train: bool, limit: int) -> float:
    """Images/s of one process applying the (seeded) transform to the train split's images."""
    ds = data.split("train", data.transform(resolution, train=train, aug=PAPER_AUG if train else None))
    n = min(limit, len(ds))
    ds[(0, 0)]  # open the shards, warm the page cache path
    t0 = time.perf_counter()
    for i in range(n):
        x, _ = ds[(i, i)] if train else ds[i]
        assert x.shape[-1] == resolution
    return n / (time.perf_counter() - t0)


def measure(workdir: Path, images: int, resolution: int = 224, storage_resolution: int = 288) -> dict[str, Any]:
    """Generate photos, prepare both formats, time both transforms; returns the table as a dict."""
    src = write_photos(workdir / "src", images)
    out: dict[str, Any] = {"resolution": resolution, "images": images, "formats": {}}
    jpeg_bytes = sum(p.stat().st_size for p in (workdir / "src").rglob("*.JPEG"))
    for fmt in ("npy", "shards"):
        data = prepare(src, workdir / f"prepared-{fmt}", fmt, storage_resolution)
        stored = sum(f["bytes"] for f in data.manifest["files"])
        out["formats"][fmt] = {
            "bytes_per_image": stored / images,
            "train_images_per_s": per_worker_rate(data, resolution, train=True, limit=images),
            "eval_images_per_s": per_worker_rate(data, resolution, train=False, limit=images),
        }
    out["source_jpeg_bytes_per_image"] = jpeg_bytes / images
    return out


def workers_needed(gpu_images_per_s: float, rate: float) -> int:
    return max(1, math.ceil(gpu_images_per_s / rate))


def report(res: dict[str, Any], gpu_images_per_s: float | None = None) -> str:
    lines = [f"loader, one worker (1 thread), {res['resolution']} px, {res['images']} generated 500x375 JPEGs "
             f"(~{res['source_jpeg_bytes_per_image'] / 1e3:.0f} KB each)",
             f"  {'format':<8}{'train img/s':>13}{'eval img/s':>12}{'bytes/img':>12}"
             + (f"{'workers/GPU':>13}" if gpu_images_per_s else "")]
    for fmt, r in res["formats"].items():
        line = (f"  {fmt:<8}{r['train_images_per_s']:13.1f}{r['eval_images_per_s']:12.1f}"
                f"{r['bytes_per_image'] / 1e3:10.1f}KB")
        if gpu_images_per_s:
            line += f"{workers_needed(gpu_images_per_s, r['train_images_per_s']):13d}"
        lines.append(line)
    f = res["formats"]
    lines.append(f"  shards / npy: train {f['shards']['train_images_per_s'] / f['npy']['train_images_per_s']:.2f}x, "
                 f"eval {f['shards']['eval_images_per_s'] / f['npy']['eval_images_per_s']:.2f}x, "
                 f"bytes {f['shards']['bytes_per_image'] / f['npy']['bytes_per_image']:.2f}x")
    if gpu_images_per_s:
        lines.append(f"  workers per GPU for {gpu_images_per_s:.0f} train images/s: see the last column")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--storage-resolution", type=int, default=288)
    ap.add_argument("--gpu-images-per-s", type=float, default=None,
                    help="a GPU's training throughput (bench/gpu.py) to size the workers for")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="evit-bench-loader-") as tmp:
        res = measure(Path(tmp), args.images, args.resolution, args.storage_resolution)
    print(report(res, args.gpu_images_per_s))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
