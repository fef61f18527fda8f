"""`data.format: shards`: WebDataset tar shards of encoded images, written in streaming fashion.

    <out_dir>/<split>-00000.tar      WebDataset samples '<row:08d>.jpg|png' + '<row:08d>.cls'
    <out_dir>/<split>-index.npy      int64 (N, 3): shard number, byte offset, byte size of each image
    <out_dir>/<split>-labels.npy     as for npy
    <out_dir>/<split>-paths.txt      as for npy

The shards are plain USTAR tars written by webdataset's `TarWriter` (fixed mtime/owner,
so equal content gives equal bytes and DVC/Prefect hashes), readable by any WebDataset
pipeline (`wds.WebDataset(urls).decode("pil").to_tuple("jpg;png", "cls")`). Training
reads them by random access instead: the index (offsets reported by the standard
library's `tarfile` stream position while writing) lets a DataLoader worker slice one image out of a
memory-mapped shard, so the existing seeded sampler, DDP rank split and exact mid-epoch
resume apply unchanged, and the index is 24 bytes per image, shared through the page
cache by all workers.

Why two passes: which images are readable is only known after reading them, and the
stratified split (as for npy) is computed over readable images. Pass 1 streams every
source image, in listing order, through `encode_for_shard` into one staging tar; pass 2
copies each split's rows (sorted, so the staging tar is read front to back) into the
split's shards. Memory holds one image at a time (plus the listing); disk needs the
staging tar besides the output until pass 2 ends.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from webdataset import TarWriter

from evit.config import DataParams
from evit.data.images import BadImage, encode_for_shard
from evit.data.sources import Excluded, Item, Source

STAGING = ".staging.tar"
_CHUNK = 256
"""Images read per batch of thread-pool work (bounds the bytes in flight)."""


def tar_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


def index_name(split: str) -> str:
    return f"{split}-index.npy"


class _IndexedTarWriter:
    """webdataset's TarWriter with reproducible headers, reporting where each image's bytes start.

    `tarfile` keeps a TarInfo per member while writing; they are dropped after each sample
    so memory stays flat however many images a shard holds.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer = TarWriter(str(path), encoder=False, user="evit", group="evit", mtime=0)

    def write(self, key: str, ext: str, data: bytes, extra: dict[str, bytes] | None = None) -> tuple[int, int]:
        """Write one sample; returns (offset, size) of its image bytes in the file."""
        if any(name >= ext for name in extra or {}):
            raise ValueError(f"extra members {sorted(extra or {})} must sort before {ext!r}")
        tar = self.writer.tarstream
        self.writer.write({"__key__": key, ext: data, **(extra or {})})  # members in sorted order: image last
        del tar.members[:]
        blocks = -(-len(data) // tarfile.BLOCKSIZE)
        return tar.offset - blocks * tarfile.BLOCKSIZE, len(data)

    def close(self) -> None:
        self.writer.close()


def stage_encoded(source: Source, items: Sequence[Item], data: DataParams, staging: Path,
                  advance: Callable[[int], Any], threads: int) -> tuple[np.ndarray, list[str], list[Excluded]]:
    """Pass 1: every item's shard bytes into `staging`, in item order.

    Returns (int64 (N, 2) offset/size, -1 for excluded items; per-item extension; exclusions).
    """
    where = np.full((len(items), 2), -1, dtype=np.int64)
    exts = [""] * len(items)
    bad: list[Excluded] = []

    def read(i: int) -> tuple[int, bytes | None, str]:
        try:
            raw = source.read_bytes(items[i], data.storage_resolution)
            encoded, ext = encode_for_shard(raw, data.max_side)
            return i, encoded, ext
        except BadImage as exc:
            return i, None, str(exc) or "unreadable"

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="evit-read") if threads > 1 else None
    writer = _IndexedTarWriter(staging)
    try:
        for start in range(0, len(items), _CHUNK):
            chunk = range(start, min(len(items), start + _CHUNK))
            for i, encoded, info in (pool.map(read, chunk) if pool else map(read, chunk)):
                if encoded is None:
                    bad.append(Excluded(items[i].path, info))
                    continue
                where[i] = writer.write(f"{i:09d}", info, encoded)
                exts[i] = info
            advance(len(chunk))
    finally:
        writer.close()
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    return where, exts, bad


def write_split_shards(out: Path, split: str, rows: Sequence[int], labels: np.ndarray, staging: Path,
                       where: np.ndarray, exts: Sequence[str], shard_size: int) -> list[dict[str, Any]]:
    """Pass 2 for one split: copy `rows` (item indices, sorted) from staging into its shards.

    Row r of the split is sample key '<r:08d>' in shard r // shard_size; writes
    `<split>-index.npy`. Returns the shard list for the manifest.
    """
    index = np.zeros((len(rows), 3), dtype=np.int64)
    shards: list[dict[str, Any]] = []
    with open(staging, "rb") as src:  # plain reads, not mmap: touched mmap pages would count as RSS
        writer: _IndexedTarWriter | None = None
        for r, item in enumerate(rows):
            k = r // shard_size
            if r % shard_size == 0:
                if writer is not None:
                    writer.close()
                writer = _IndexedTarWriter(out / tar_name(split, k))
                shards.append({"name": tar_name(split, k), "rows": min(shard_size, len(rows) - r)})
            offset, size = (int(v) for v in where[item])
            assert writer is not None
            src.seek(offset)
            pos, n = writer.write(f"{r:08d}", exts[item], src.read(size),
                                  {"cls": str(int(labels[r])).encode()})
            index[r] = (k, pos, n)
        if writer is not None:
            writer.close()
    with open(out / index_name(split), "wb") as fh:
        np.save(fh, index, allow_pickle=False)
    return shards
