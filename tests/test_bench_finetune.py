"""bench/fashion_mnist.py and bench/finetune.py's own logic (the runs themselves are the benchmark)."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_imagefolder_caps_classes_and_is_resumable(tmp_path: Path) -> None:
    import fashion_mnist as fm

    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("val", 20)):
        images_file, labels_file = fm.FILES[split]
        _idx(tmp_path / images_file, rng.integers(0, 255, (n, 28, 28)))
        _idx(tmp_path / labels_file, np.arange(n) % 10)
    out = tmp_path / "folder"
    assert fm.write_imagefolder(tmp_path, out, train_per_class=3, val_per_class=1) == {"train": 30, "val": 10}
    assert sorted(p.name for p in (out / "train").iterdir() if p.is_dir()) == sorted(fm.CLASSES)
    img = Image.open(next((out / "val" / "bag").glob("*.png")))
    assert img.size == (28, 28) and img.mode == "L"
    first = next((out / "train" / "coat").glob("*.png"))
    first.unlink()  # a finished split is not rewritten on a re-run...
    fm.write_imagefolder(tmp_path, out, train_per_class=3, val_per_class=1)
    assert not first.exists()
    fm.write_imagefolder(tmp_path, out, train_per_class=4, val_per_class=1)  # ...another cap rewrites it
    assert first.exists() and len(list((out / "train" / "coat").glob("*.png"))) == 4


def test_finetune_table_pairs_gains_by_seed_and_splices(tmp_path: Path) -> None:
    import finetune

    def run(mean: float, searched: float) -> dict:
        return {"top1_mean": mean, "searched": {"val_top1": searched}, "train_seconds": 100.0}

    report = {"seeds": [0, 1], "device": "cpu-1t", "budget_ms": 4.0,
              "runs": {"scratch": {0: run(0.50, 0.60), 1: run(0.40, 0.50)},
                       "init": {0: run(0.55, 0.60), 1: run(0.45, 0.55)},
                       "init-recipe": {0: run(0.50, 0.60), 1: run(0.40, 0.50)}}}
    text = finetune.table(report)
    assert "| from scratch | 45.0 ± 5.0 | 55.0 ± 5.0 |  |" in text
    assert "| 50.0 ± 5.0 | 57.5 ± 2.5 | 5.0 ± 0.0 / 2.5 ± 2.5 |" in text  # paired per seed, not mean - mean
    page = tmp_path / "results.md"
    page.write_text("# results\n\nbefore\n")
    finetune.splice(page, "one")
    finetune.splice(page, "two")
    body = page.read_text()
    assert body.count(finetune.START) == 1 and "two" in body and "one" not in body and "before" in body


def test_finetune_skips_without_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import finetune

    sys_argv = sys.argv
    sys.argv = ["finetune.py", "--pretrain-data", str(tmp_path / "absent"), "--workdir", str(tmp_path / "w")]
    try:
        assert finetune.main() == 0
    finally:
        sys.argv = sys_argv
    assert "skipped" in capsys.readouterr().out and not (tmp_path / "w").exists()
