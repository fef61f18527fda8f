"""Reading prepared data for training, subnet ranking and evaluation.

    data = PreparedData("data/prepared")
    train = data.loader("train", resolution=48, batch_size=64, train=True, seed=0,
                        aug={"auto_augment": "rand-m5-n1", "re_prob": 0.1})
    x, y = data.tensors("search", resolution=40)       # whole split, normalised, in memory

Images are memory-mapped from the `.npy` shards (opened lazily in each process, so
DataLoader workers share the page cache instead of pickling arrays) and turned into
tensors by timm's `create_transform`. `shards` data (evit/data/tarshards.py) is read the
same way, by random access into memory-mapped tars through a 24-byte-per-image index, and
decoded from JPEG/PNG in the DataLoader worker; its transforms are timm's ImageNet ones
(`PHOTO_TRAIN_AUG_DEFAULTS`, eval resize + centre crop 0.875), on the original photo.

Choices for small images (the digits are 8x8 scans upsampled to the storage side):
- eval: resize to the target side with `crop_pct=1.0` (no centre crop: a 10% crop of a
  48 px digit cuts strokes) and bilinear interpolation;
- train: RandomResizedCrop with `scale=(0.6, 1.0)` (timm's default 0.08 would often keep
  a crop with no digit at all) and a near-square `ratio=(0.9, 1.1)`; no flips and no
  colour jitter by default (digits are not mirror-symmetric and are grey). Every knob can
  be overridden through `aug` (any of `AUG_KEYS`).
- normalisation: timm's ImageNet mean/std (exposed as `MEAN`/`STD` for export).

Reproducible augmentation: the training sampler draws, from a `torch.Generator` seeded by
(seed, epoch), both the permutation and one seed per sample; the dataset applies the
transform under that seed (Python, NumPy and torch RNGs, restored afterwards). The batches
of an epoch are therefore identical for any number of workers, and a resumed run gets the
same stream by calling `loader.sampler.set_epoch(epoch)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, Dataset, Sampler

from evit.data.images import decode_rgb
from evit.data.shards import FORMAT, MANIFEST
from evit.data.split import SPLITS
from evit.errors import DataError
from evit.io import read_json, sha256_file

MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # type: ignore[assignment]
STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)  # type: ignore[assignment]

TRAIN_AUG_DEFAULTS: dict[str, Any] = {
    "scale": (0.6, 1.0),
    "ratio": (0.9, 1.1),
    "hflip": 0.0,
    "vflip": 0.0,
    "color_jitter": 0.0,
    "auto_augment": None,
    "re_prob": 0.0,
    "interpolation": "bilinear",
}
AUG_KEYS = frozenset({*TRAIN_AUG_DEFAULTS, "re_mode", "re_count", "color_jitter_prob", "grayscale_prob",
                      "gaussian_blur_prob", "train_crop_mode"})
"""The `create_transform` arguments `aug` may set."""


PHOTO_TRAIN_AUG_DEFAULTS: dict[str, Any] = {
    "scale": (0.08, 1.0),
    "ratio": (3.0 / 4.0, 4.0 / 3.0),
    "hflip": 0.5,
    "vflip": 0.0,
    "color_jitter": 0.0,
    "auto_augment": None,
    "re_prob": 0.0,
    "interpolation": "bicubic",
}
"""timm's ImageNet recipe for `shards` data (original photos): RandomResizedCrop over the
whole image with the standard scale and aspect jitter, bicubic; eval is resize + centre
crop at timm's crop_pct 0.875."""
PHOTO_EVAL_CROP_PCT = 0.875


def build_transform(resolution: int, *, train: bool, aug: dict[str, Any] | None = None,
                    photos: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """timm's train or eval transform at `resolution`.

    photos=False: the small pre-squared images of `npy` data (module docstring);
    photos=True: original photos from `shards` data (`PHOTO_TRAIN_AUG_DEFAULTS`).
    """
    if not train:
        if aug:
            raise ValueError("aug is only used with train=True")
        if photos:
            return create_transform(resolution, is_training=False, crop_pct=PHOTO_EVAL_CROP_PCT,
                                    interpolation="bicubic", mean=MEAN, std=STD)
        return create_transform(resolution, is_training=False, crop_pct=1.0, interpolation="bilinear",
                                mean=MEAN, std=STD)
    unknown = sorted(set(aug or {}) - AUG_KEYS)
    if unknown:
        raise ValueError(f"unknown augmentation key(s) {unknown}; accepted: {sorted(AUG_KEYS)}")
    kwargs = {**(PHOTO_TRAIN_AUG_DEFAULTS if photos else TRAIN_AUG_DEFAULTS), **(aug or {})}
    if kwargs["color_jitter"] in (0, 0.0, None):
        kwargs["color_jitter"] = None  # timm: None disables the ColorJitter op entirely
    return create_transform(resolution, is_training=True, mean=MEAN, std=STD, **kwargs)


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global RNGs for one transform call, then restore them.

    timm and torchvision transforms draw from those globals; scoping the seed keeps the
    caller's RNG streams untouched.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ShardDataset(Dataset):
    """One split: memory-mapped uint8 shards + labels; items are (image, label).

    An index is an int, or (int, seed) from `SeededSampler` to apply the transform under
    that seed. Without a transform the image is a uint8 (3, S, S) tensor.
    """

    def __init__(self, shard_files: list[Path], labels: np.ndarray,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None) -> None:
        self.shard_files = list(shard_files)
        self.labels = labels
        self.transform = transform
        self._arrays: list[np.ndarray] | None = None
        self._pid = -1
        rows = [int(np.load(f, mmap_mode="r").shape[0]) for f in self.shard_files]
        self._offsets = np.cumsum([0, *rows])
        if self._offsets[-1] != len(labels):
            raise DataError(f"shards {[f.name for f in self.shard_files]} hold {self._offsets[-1]} images "
                            f"but there are {len(labels)} labels; re-run `evit prepare`")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = None  # reopen in the worker: pickling a memmap would copy the data
        return state

    def _shards(self) -> list[np.ndarray]:
        if self._arrays is None or self._pid != os.getpid():
            self._arrays = [np.load(f, mmap_mode="r") for f in self.shard_files]
            self._pid = os.getpid()
        return self._arrays

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> np.ndarray:
        """The stored (S, S, 3) uint8 image at `index` (a read-only view)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self._shards()[k][index - self._offsets[k]]

    def images(self) -> np.ndarray:
        """All images of the split as one (N, S, S, 3) uint8 array (copied into memory)."""
        return np.concatenate([np.asarray(a) for a in self._shards()]) if self.shard_files else np.zeros((0,), np.uint8)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        arr = self.image(int(index))
        label = int(self.labels[index])
        if self.transform is None:
            return torch.from_numpy(np.array(arr)).permute(2, 0, 1), label
        img = Image.fromarray(np.asarray(arr), mode="RGB")
        if seed is None:
            return self.transform(img), label
        with seeded_rngs(int(seed)):
            return self.transform(img), label


class EncodedShardDataset(Dataset):
    """One split of `shards` data: images decoded from memory-mapped tar shards in the worker.

    Same item contract as `ShardDataset` (int or (int, seed) keys); without a transform the
    image is a uint8 (3, H, W) tensor at its stored size. Each process maps the shards
    lazily (pickling to a worker copies only paths and the small index handle).
    """

    def __init__(self, shard_files: list[Path], index_file: Path, labels: np.ndarray,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None) -> None:
        self.shard_files = list(shard_files)
        self.index_file = index_file
        self.labels = labels
        self.transform = transform
        self._maps: list[mmap.mmap] | None = None
        self._index: np.ndarray | None = None
        self._pid = -1
        if len(self._rows()) != len(labels):
            raise DataError(f"{index_file.name} lists {len(self._rows())} images but there are {len(labels)} "
                            "labels; re-run `evit prepare`")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = state["_index"] = None
        return state

    def _rows(self) -> np.ndarray:
        if self._index is None or self._pid != os.getpid():
            self._index = np.load(self.index_file, mmap_mode="r")
            self._maps = None
            self._pid = os.getpid()
        return self._index

    def _shards(self) -> list[mmap.mmap]:
        self._rows()
        if self._maps is None:
            maps = []
            for f in self.shard_files:
                with open(f, "rb") as fh:
                    maps.append(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
            self._maps = maps
        return self._maps

    def __len__(self) -> int:
        return len(self.labels)

    def encoded(self, index: int) -> bytes:
        """The stored (JPEG or PNG) bytes of row `index`."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard, offset, size = (int(v) for v in self._rows()[index])
        return self._shards()[shard][offset:offset + size]

    def pil(self, index: int) -> Image.Image:
        return decode_rgb(self.encoded(index))

    def image(self, index: int) -> np.ndarray:
        """The decoded (H, W, 3) uint8 image at `index`, at its stored size."""
        return np.asarray(self.pil(index))

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        img = self.pil(int(index))
        label = int(self.labels[index])
        if self.transform is None:
            return torch.from_numpy(np.array(img)).permute(2, 0, 1), label
        if seed is None:
            return self.transform(img), label
        with seeded_rngs(int(seed)):
            return self.transform(img), label


def _mix(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"evit-loader:{seed}:{epoch}".encode()).digest()[:8], "little") >> 1


class SeededSampler(Sampler[tuple[int, int]]):
    """Shuffled (index, augmentation seed) pairs from a torch.Generator seeded by (seed, epoch).

    Each `iter()` uses the current epoch and then advances it; `set_epoch` jumps (resume).
    With `world_size > 1` each rank takes every world_size-th index of the same permutation
    (padded by wrapping so all ranks see the same number of samples), as DistributedSampler.
    """

    def __init__(self, num_samples: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        self.epoch += 1
        perm = torch.randperm(self.num_samples, generator=g)
        seeds = torch.randint(0, 2**62, (self.num_samples,), generator=g, dtype=torch.int64)
        total = len(self) * self.world_size
        if total > self.num_samples:
            perm = torch.cat([perm, perm[: total - self.num_samples]])
            seeds = torch.cat([seeds, seeds[: total - self.num_samples]])
        mine = slice(self.rank, total, self.world_size)
        return iter(zip(perm[mine].tolist(), seeds[mine].tolist(), strict=True))


class PreparedData:
    """The output of `evit prepare`: manifest + shards, validated on open."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        manifest_file = self.path / MANIFEST
        if not manifest_file.is_file():
            raise DataError(f"no prepared data at {str(self.path)!r} (missing {MANIFEST}); run `evit prepare` first")
        try:
            self.manifest: dict[str, Any] = read_json(manifest_file)
        except ValueError as exc:
            raise DataError(f"{manifest_file}: not valid JSON ({exc}); re-run `evit prepare`") from None
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{manifest_file}: format {self.manifest.get('format')!r}, expected {FORMAT!r}; "
                            "re-run `evit prepare` with this version of evit")
        for f in self.manifest["files"]:
            p = self.path / f["name"]
            if not p.is_file() or p.stat().st_size != f["bytes"]:
                raise DataError(f"{p}: missing or of the wrong size (manifest says {f['bytes']} bytes); "
                                "the prepared data is incomplete, re-run `evit prepare`")
        self._splits: dict[str, ShardDataset] = {}

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])

    @property
    def storage_resolution(self) -> int:
        return int(self.manifest["storage_resolution"])

    def counts(self, split: str) -> dict[str, int]:
        return dict(self.manifest["counts"][self._check(split)])

    def verify(self) -> None:
        """Re-hash every file against the manifest (slow on big data; catches bit rot and edits)."""
        for f in self.manifest["files"]:
            if sha256_file(self.path / f["name"]) != f["sha256"]:
                raise DataError(f"{self.path / f['name']}: content does not match manifest.json; re-run `evit prepare`")

    def _check(self, split: str) -> str:
        if split not in self.manifest["splits"]:
            raise DataError(f"unknown split {split!r}; accepted: {list(SPLITS)}")
        return split

    @property
    def layout(self) -> str:
        """'npy' (decoded squares) or 'shards' (encoded images in tar shards)."""
        return str(self.manifest.get("layout", "npy"))

    def split(self, name: str, transform: Callable[[Image.Image], torch.Tensor] | None = None
              ) -> ShardDataset | EncodedShardDataset:
        """The split as a Dataset of (uint8 (3,H,W) tensor, label), or transformed images if given a transform."""
        info = self.manifest["splits"][self._check(name)]
        labels = np.load(self.path / info["labels"], mmap_mode="r")
        files = [self.path / s["name"] for s in info["shards"]]
        if self.layout == "shards":
            return EncodedShardDataset(files, self.path / info["index"], labels, transform)
        return ShardDataset(files, labels, transform)

    def transform(self, resolution: int, *, train: bool, aug: dict[str, Any] | None = None
                  ) -> Callable[[Image.Image], torch.Tensor]:
        """timm's train/eval transform suited to this data's layout (`build_transform`)."""
        return build_transform(resolution, train=train, aug=aug, photos=self.layout == "shards")

    def loader(self, split: str, *, resolution: int, batch_size: int, train: bool, seed: int,
               workers: int = 0, aug: dict[str, Any] | None = None, rank: int = 0, world_size: int = 1,
               pin_memory: bool = False, drop_last: bool | None = None) -> DataLoader:
        """A DataLoader of (float (B,3,R,R) normalised, int64 (B,)) batches at `resolution`.

        train=True: shuffled by a `SeededSampler` (reachable as `.sampler`), timm train
        transform with `aug`, and the last incomplete batch dropped when the split holds
        more than one batch (`drop_last` overrides). train=False: in order, eval transform.
        """
        if resolution < 1 or batch_size < 1:
            raise ValueError(f"resolution ({resolution}) and batch_size ({batch_size}) must be positive")
        ds = self.split(split, self.transform(resolution, train=train, aug=aug))
        # Own generator: DataLoader draws its workers' base seed from it (else from torch's global RNG).
        common: dict[str, Any] = {"batch_size": batch_size, "num_workers": workers, "pin_memory": pin_memory,
                                  "persistent_workers": workers > 0,
                                  "generator": torch.Generator().manual_seed(_mix(seed, -1))}
        if train:
            sampler = SeededSampler(len(ds), seed=seed, rank=rank, world_size=world_size)
            if drop_last is None:
                drop_last = len(sampler) > batch_size
            return DataLoader(ds, sampler=sampler, drop_last=drop_last, **common)
        if world_size > 1:
            raise ValueError("evaluation loaders are not sharded; evaluate on one rank or gather results")
        return DataLoader(ds, shuffle=False, drop_last=bool(drop_last), **common)

    def tensors(self, split: str, resolution: int, *, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as (normalised (N,3,R,R) float, int64 (N,)) tensors, for fast eval on small data.

        Resizes with torch's antialiased bilinear interpolation, which matches the eval
        transform's PIL bilinear resize to within rounding (about 1/255 per pixel).
        Memory is N*3*R*R*4 bytes: use `loader` for large splits.
        """
        if self.layout == "shards":  # photos of any size: the eval transform, image by image
            ds = self.split(split, self.transform(resolution, train=False))
            if len(ds) == 0:
                return torch.zeros((0, 3, resolution, resolution), dtype=dtype), torch.zeros((0,), dtype=torch.int64)
            x = torch.stack([ds[i][0] for i in range(len(ds))]).to(dtype)
            return x.contiguous(), torch.from_numpy(np.array(ds.labels, dtype=np.int64))
        ds = self.split(split)
        assert isinstance(ds, ShardDataset)
        x = torch.from_numpy(ds.images()).permute(0, 3, 1, 2).to(torch.float32)
        if x.shape[-1] != resolution or x.shape[-2] != resolution:
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
        x = x.div_(255.0)
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(dtype).contiguous()
        y = torch.from_numpy(np.array(ds.labels, dtype=np.int64))
        return x, y
