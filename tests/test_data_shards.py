"""`data.format: shards`: encoded images in WebDataset tars, streamed in, decoded in workers."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evit.config import ConfigError, load_params, parse_params
from evit.data.loader import PreparedData
from evit.data.prepare import prepare_data
from evit.io import sha256_file

OUT = Path("data/prepared")


def _shard_params(tiny_params, src: Path, **data) -> Path:
    return tiny_params({"data": {"source": str(src), "format": "shards", "shard_size": 4, **data}})


def test_folder_to_shards_keeps_jpeg_bytes_and_excludes_bad_files(tiny_params, messy_image_folder,
                                                                 tmp_path: Path) -> None:
    src = messy_image_folder(tmp_path / "src")
    prepare_data(load_params(_shard_params(tiny_params, src)))
    m = json.loads((OUT / "manifest.json").read_text())
    assert m["layout"] == "shards"
    assert {e["path"] for e in m["excluded"]} >= {"train/bee/broken.jpg", "train/bee/garbage.png", "train/bee/empty.jpg"}
    for f in m["files"]:
        assert sha256_file(OUT / f["name"]) == f["sha256"]
    assert not any(p.name.startswith(".") for p in OUT.iterdir())  # no staging tar left
    data = PreparedData(OUT)
    for split, info in m["splits"].items():
        paths = (OUT / info["paths"]).read_text().splitlines()
        labels = np.load(OUT / info["labels"])
        assert [s["rows"] for s in info["shards"]] == [min(4, info["num"] - k) for k in range(0, info["num"], 4)]
        ds = data.split(split)
        # the index agrees with what tarfile itself reads, and the standard member names
        for shard_no, shard in enumerate(info["shards"]):
            with tarfile.open(OUT / shard["name"]) as tar:
                members = {t.name: t for t in tar.getmembers()}
                for r in range(shard_no * 4, shard_no * 4 + shard["rows"]):
                    cls = tar.extractfile(members[f"{r:08d}.cls"]).read()
                    assert int(cls) == labels[r]
        for r, rel in enumerate(paths):
            raw = (src / rel).read_bytes()
            if rel.endswith(".jpg"):
                assert ds.encoded(r) == raw  # JPEG kept byte for byte
            with Image.open(io.BytesIO(raw)) as im:
                assert np.array_equal(ds.image(r), np.asarray(im.convert("RGB")))  # PNG/BMP: lossless
    # any WebDataset pipeline reads the shards as they are
    import webdataset as wds

    urls = [str(OUT / s["name"]) for s in m["splits"]["train"]["shards"]]
    got = [(int(c)) for _img, c in wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png", "cls")]
    assert got == np.load(OUT / "train-labels.npy").tolist()


def test_shards_are_reproducible_and_max_side_downscales(tiny_params, image_folder, tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", train={"ant": 8, "bee": 8}, size=(90, 40))
    path = _shard_params(tiny_params, src, max_side=45)
    first = prepare_data(load_params(path))
    again = prepare_data(load_params(path))
    assert first["content_hash"] == again["content_hash"]
    ds = PreparedData(OUT).split("train")
    assert {ds.image(i).shape for i in range(len(ds))} == {(20, 45, 3)}
    npy = prepare_data(load_params(tiny_params({"data": {"source": str(src), "storage_resolution": 16}})))
    assert npy["content_hash"] != first["content_hash"]


def test_loader_uses_photo_transforms_and_is_seeded(tiny_params, image_folder, tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", train={"ant": 10, "bee": 10}, size=(60, 40))
    prepare_data(load_params(_shard_params(tiny_params, src)))
    data = PreparedData(OUT)
    loader = data.loader("train", resolution=32, batch_size=4, train=True, seed=3,
                         aug={"auto_augment": "rand-m5-n1-mstd0.5", "re_prob": 0.2})
    a = [(x.clone(), y.clone()) for x, y in loader]
    loader.sampler.set_epoch(0)
    b = [(x.clone(), y.clone()) for x, y in loader]
    assert a and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    assert a[0][0].shape == (4, 3, 32, 32)
    ops = [type(t).__name__ for t in data.transform(32, train=True).transforms]
    assert "RandomResizedCropAndInterpolation" in ops and "RandomHorizontalFlip" in ops
    assert data.transform(32, train=False).transforms[1].__class__.__name__ == "CenterCrop"
    x, y = data.tensors("val", 32)
    xe, ye = next(iter(data.loader("val", resolution=32, batch_size=len(y), train=False, seed=0)))
    assert torch.allclose(x, xe) and torch.equal(y, ye)


def test_max_side_needs_shards() -> None:
    with pytest.raises(ConfigError, match="max_side"):
        parse_params({"data": {"max_side": 256}})


def test_workers_and_ranks_read_disjoint_rows_and_same_batches(tiny_params, image_folder, tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", train={"ant": 12, "bee": 12}, size=(40, 30))
    prepare_data(load_params(_shard_params(tiny_params, src)))
    data = PreparedData(OUT)
    kw = {"resolution": 24, "batch_size": 4, "train": True, "seed": 5}
    solo = [x for x, _ in data.loader("train", workers=0, **kw)]
    multi = [x for x, _ in data.loader("train", workers=2, **kw)]
    assert len(solo) == len(multi) > 1 and all(torch.equal(a, b) for a, b in zip(solo, multi, strict=True))
    ranks = [list(data.loader("train", rank=r, world_size=2, **kw).sampler) for r in (0, 1)]
    rows = [{i for i, _seed in r} for r in ranks]
    assert not rows[0] & rows[1] and len(rows[0] | rows[1]) == len(data.split("train"))


@pytest.mark.slow
def test_training_runs_on_shards(tiny_params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evit.train.loop import Trainer
    from train_helpers import SMALL_PER_CLASS, tiny_overrides

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    prepared = tmp_path / "prepared-shards"
    prepare_data(parse_params({"data": {"out_dir": str(prepared), "format": "shards",
                                        "max_per_class": SMALL_PER_CLASS}}))
    assert PreparedData(prepared).layout == "shards"
    params = load_params(tiny_params(tiny_overrides(prepared, epochs=1, steps_per_epoch=2, checkpoint_every=1,
                                                    workers=2, hflip=0.5, reprob=0.2)))
    result = Trainer(params, resume=False, progress=False).fit()
    assert (tmp_path / "models/supernet.pt").is_file()
    assert result is not None
