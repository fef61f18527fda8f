"""Loading prepared shards: datasets, timm-transform loaders, whole-split tensors, seeding."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from evit.data.loader import MEAN, STD, PreparedData, SeededSampler, build_transform
from evit.errors import DataError



@pytest.fixture(scope="module")
def data(prepared_digits: Path) -> PreparedData:
    return PreparedData(prepared_digits)


def _denormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def test_metadata_and_raw_split(data: PreparedData) -> None:
    assert data.classes == [str(d) for d in range(10)] and data.num_classes == 10
    assert data.storage_resolution == 48 and len(data.content_hash) == 64
    train = data.split("train")
    assert len(train) == sum(data.counts("train").values()) == 1259
    img, label = train[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 48, 48) and 0 <= label < 10
    assert np.array_equal(np.bincount(np.asarray(train.labels), minlength=10), list(data.counts("train").values()))
    with pytest.raises(DataError, match="unknown split 'test'"):
        data.split("test")


@pytest.mark.parametrize("resolution", [32, 48])
def test_eval_loader_matches_tensors(data: PreparedData, resolution: int) -> None:
    loader = data.loader("val", resolution=resolution, batch_size=100, train=False, seed=0)
    batches = list(loader)
    xb = torch.cat([b[0] for b in batches])
    yb = torch.cat([b[1] for b in batches])
    assert xb.shape == (269, 3, resolution, resolution) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    x, y = data.tensors("val", resolution)
    assert x.shape == xb.shape and x.dtype == torch.float32 and torch.equal(y, yb)
    # same pixels up to one grey level (PIL vs torch antialiased bilinear rounding)
    assert (x - xb).abs().max() <= 1.01 / 255 / min(STD)
    # normalised with timm's ImageNet mean/std: undoing it gives [0, 1] images, mostly dark
    raw = _denormalise(x)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5 and 0.05 < raw.mean() < 0.5
    if resolution == 48:  # stored side: no resampling at all
        stored = data.split("val").images()
        assert torch.allclose(raw, torch.from_numpy(stored).permute(0, 3, 1, 2).float() / 255, atol=1e-5)


def test_train_loader_shapes_and_determinism(data: PreparedData) -> None:
    aug = {"auto_augment": "rand-m5-n1", "re_prob": 0.25}

    def first_batch(seed: int, workers: int = 0, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        loader = data.loader("train", resolution=40, batch_size=32, train=True, seed=seed, workers=workers, aug=aug)
        if epoch is not None:
            loader.sampler.set_epoch(epoch)
        return next(iter(loader))

    x, y = first_batch(0)
    assert x.shape == (32, 3, 40, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    state = random.getstate(), torch.get_rng_state()
    x2, y2 = first_batch(0)
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])  # globals untouched
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, y3 = first_batch(0, workers=1)  # same stream in a worker process
    assert torch.equal(x, x3) and torch.equal(y, y3)
    x4, _ = first_batch(1)
    assert not torch.equal(x, x4)
    x5, _ = first_batch(0, epoch=1)
    assert not torch.equal(x, x5)


def test_train_loader_epochs_and_drop_last(data: PreparedData) -> None:
    loader = data.loader("search", resolution=32, batch_size=64, train=True, seed=0)
    assert len(loader) == 269 // 64
    epoch0 = torch.cat([y for _, y in loader])
    epoch1 = torch.cat([y for _, y in loader])
    assert len(epoch0) == 4 * 64 and not torch.equal(epoch0, epoch1)
    loader.sampler.set_epoch(1)
    assert torch.equal(torch.cat([y for _, y in loader]), epoch1)  # resume reproduces epoch 1
    # a split smaller than one batch still yields it
    small = data.loader("search", resolution=32, batch_size=512, train=True, seed=0)
    assert [len(y) for _, y in small] == [269]


def test_augmentation_changes_pixels_but_not_labels(data: PreparedData) -> None:
    plain = data.loader("train", resolution=48, batch_size=16, train=True, seed=3)
    heavy = data.loader("train", resolution=48, batch_size=16, train=True, seed=3,
                        aug={"scale": (0.3, 0.5), "re_prob": 1.0})
    (xa, ya), (xb, yb) = next(iter(plain)), next(iter(heavy))
    assert torch.equal(ya, yb) and not torch.allclose(xa, xb)
    with pytest.raises(ValueError, match="unknown augmentation key"):
        build_transform(48, train=True, aug={"mixup": 0.2})


def test_sampler_shards_across_ranks() -> None:
    ranks = [list(SeededSampler(10, seed=0, rank=r, world_size=3)) for r in range(3)]
    assert all(len(r) == 4 for r in ranks)
    indices = [i for r in ranks for i, _ in r]
    assert set(indices) == set(range(10)) and len(indices) == 12


def test_broken_prepared_dir_is_a_clear_error(prepared_digits: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run `evit prepare` first"):
        PreparedData(tmp_path / "nothing")
    copy = tmp_path / "copy"
    shutil.copytree(prepared_digits, copy)
    shard = copy / "val-00000.npy"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match="val-00000.npy: missing or of the wrong size"):
        PreparedData(copy)
    shutil.copy(prepared_digits / "val-00000.npy", shard)
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="does not match manifest"):
        PreparedData(copy).verify()
    m = json.loads((copy / "manifest.json").read_text())
    m["format"] = "something-else/9"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="format"):
        PreparedData(copy)
