"""Fashion-MNIST (Debian's `dataset-fashion-mnist`) as an ImageFolder, the pretraining data of bench/finetune.py.

    apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb fm   # no root needed
    .venv/bin/python bench/fashion_mnist.py fm/usr/share/datasets/fashion-mnist /tmp/fashion-mnist

Why this dataset: the fine-tuning evidence needs a supernet trained on a larger dataset that
is *different* from flowers32 and available offline here; Debian ships Fashion-MNIST
(Zalando, MIT licence; 60,000 train / 10,000 test 28x28 grayscale images of 10 clothing
classes). Images are written as PNG (grayscale; `evit prepare` converts them to RGB at its
storage resolution), `train/<class>/` from the train set, `val/<class>/` from the test set,
the first N of each class in file order.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: magic, dims as big-endian uint32, then uint8 data)."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_imagefolder(source: Path, out: Path, train_per_class: int, val_per_class: int) -> dict[str, int]:
    """Writes `out/{train,val}/<class>/<index>.png`; returns images written per split.

    Complete splits are skipped on a re-run (a `.done` marker per split, written last)."""
    counts: dict[str, int] = {}
    for split, (images_file, labels_file) in FILES.items():
        done = out / split / ".done"
        cap = train_per_class if split == "train" else val_per_class
        if done.is_file() and done.read_text().strip() == str(cap):
            counts[split] = cap * len(CLASSES)
            continue
        images, labels = read_idx(source / images_file), read_idx(source / labels_file)
        taken = [0] * len(CLASSES)
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            if taken[label] >= cap:
                continue
            folder = out / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="L").save(folder / f"{i:05d}.png")
            taken[label] += 1
        done.write_text(str(cap))
        counts[split] = sum(taken)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", type=Path, help="folder with the four *-ubyte.gz files")
    ap.add_argument("out", type=Path, help="ImageFolder to write (outside the repository)")
    ap.add_argument("--train-per-class", type=int, default=1500)
    ap.add_argument("--val-per-class", type=int, default=200)
    args = ap.parse_args()
    missing = [f for pair in FILES.values() for f in pair if not (args.source / f).is_file()]
    if missing:
        raise SystemExit(f"error: {args.source} lacks {', '.join(missing)}; extract Debian's dataset-fashion-mnist "
                         "package (see this file's docstring)")
    print(write_imagefolder(args.source, args.out, args.train_per_class, args.val_per_class))
    return 0


if __name__ == "__main__":
    sys.exit(main())
