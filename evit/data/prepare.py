"""The `prepare` stage: a data source -> stratified train/search/val shards + manifest.

`data.format` picks the storage: `npy` (decoded uint8 squares, evit/data/shards.py) or
`shards` (encoded images in WebDataset tars, evit/data/tarshards.py). Steps 2 and 4
differ; listing, checks, split, manifest and the atomic swap are shared.

Order of work, so that bad data fails early and nothing half-done is ever visible:

1. list the source (names only) and check the layout: a train/ split with images, no
   val class missing from train, a val share when the source has no val split;
2. inside `atomic_dir(out_dir)` (a hidden temporary directory), decode every listed image
   into a memory-mapped buffer (npy) or stream its encoded bytes into a staging tar
   (shards); unreadable files are recorded as excluded, not fatal;
3. check every class (empty, too few images, missing from val) and split;
4. write the shards, labels and manifest, drop the buffer, and swap the directory in.

Any error in 1-4 leaves the previous complete out_dir (or none) in place.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from evit import cancel, paths
from evit.config import DataParams, Params
from evit.data import tarshards
from evit.data.images import BadImage
from evit.data.shards import FORMAT, MANIFEST, labels_name, paths_name, shard_name
from evit.data.sources import SOURCE_SPLITS, LAYOUT_HINT, Excluded, Item, Listing, Source, open_source
from evit.data.split import SPLITS, ClassImages, cap_per_class, stratified_split
from evit.errors import DataError
from evit.io import atomic_dir, sha256_file, sha256_json, write_json_atomic

log = logging.getLogger(__name__)

_READ_CHUNK = 2048
"""Images decoded per batch of thread-pool work (bounds the number of queued futures)."""
_BUFFER = ".decoded.u8"


def prepare_data(params: Params) -> dict[str, Any]:
    """Run the prepare stage for `params.data`; return a JSON-able summary."""
    t0 = time.perf_counter()
    data = params.data
    out = paths.prepared_dir(params)
    source = open_source(params)
    try:
        listing = source.list()
        classes, items = _plan(listing, data, source)
        log.info("%s: %d classes, %d images listed, %d files excluded by name; storing as %s",
                 source.uri, len(classes), len(items), len(listing.excluded),
                 f"npy at {data.storage_resolution}px" if data.format == "npy" else "encoded tar shards")
        with atomic_dir(out) as tmp:
            if data.format == "npy":
                buffer_path = tmp / _BUFFER
                images, bad = _decode_all(source, items, data, buffer_path)
                write_split = _npy_writer(tmp, images, data)
            else:
                buffer_path = tmp / tarshards.STAGING
                threads = 1 if source.kind == "digits" else data.read_threads
                with _progress(len(items), f"reading {source.uri}") as advance:
                    where, exts, bad = tarshards.stage_encoded(source, items, data, buffer_path, advance, threads)
                write_split = _shard_writer(tmp, buffer_path, where, exts, data)
            excluded = sorted([*listing.excluded, *bad])
            by_class = _class_images(classes, items, {b.path for b in bad}, excluded)
            assignment = stratified_split(by_class, data, has_val=listing.has_val)
            manifest = _write_output(tmp, write_split, items, classes, assignment, excluded, data, source,
                                     listing.has_val)
            write_split = images = None  # drop the memmap (npy) before the buffer goes
            buffer_path.unlink()
    finally:
        source.close()
    seconds = time.perf_counter() - t0
    _log_excluded(excluded)
    summary = {
        "out_dir": str(out),
        "content_hash": manifest["content_hash"],
        "num_classes": len(classes),
        "totals": manifest["totals"],
        "excluded": len(excluded),
        "bytes": sum(f["bytes"] for f in manifest["files"]),
        "seconds": round(seconds, 3),
    }
    log.info("prepared %s in %.1fs: %s", out, seconds, manifest["totals"])
    return summary


def _plan(listing: Listing, data: DataParams, source: Source) -> tuple[list[str], list[Item]]:
    """Layout checks from names alone; returns (sorted class names, the items to decode)."""
    train_classes = sorted(listing.class_dirs.get("train", set()))
    if not any(i.split == "train" for i in listing.items):
        raise DataError(
            f"data.source {source.uri!r}: no image files under train/ "
            f"({len(listing.excluded)} other files excluded); {LAYOUT_HINT}"
        )
    if "val" in listing.class_dirs and not listing.has_val:
        raise DataError(
            f"data.source {source.uri!r}: val/ exists but has no class directories "
            f"({len([e for e in listing.excluded if e.path.startswith('val/')])} files excluded); sort it into "
            "val/<class>/<image> (as train/) or remove it to hold out val from train"
        )
    val_classes = listing.class_dirs.get("val", set()) | {i.cls for i in listing.items if i.split == "val"}
    stray = sorted(val_classes - set(train_classes))
    if stray:
        raise DataError(
            f"data.source {source.uri!r}: val/ has {len(stray)} class(es) that train/ does not: {stray[:20]}; "
            "every val class needs a train/<class>/ directory (rename or remove them)"
        )
    if not listing.has_val and data.val_fraction == 0:
        raise DataError(
            f"data.source {source.uri!r} has no val/ split and data.val_fraction = 0; "
            "set data.val_fraction > 0 (e.g. 0.15) or add <root>/val/<class>/<image>"
        )
    groups: dict[tuple[str, str], list[int]] = {}
    for index, item in enumerate(listing.items):
        groups.setdefault((item.split, item.cls), []).append(index)
    keep: list[int] = []
    for (split, cls), idx in sorted(groups.items()):
        keep.extend(cap_per_class(idx, data.max_per_class, seed=data.seed, key=f"{split}/{cls}"))
    return train_classes, [listing.items[i] for i in sorted(keep)]


def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def _decode_all(source: Source, items: Sequence[Item], data: DataParams, buffer_path: Path) -> tuple[np.ndarray, list[Excluded]]:
    """Decode every item into a (N, S, S, 3) uint8 memmap; unusable files become exclusions.

    A memmap (inside the temporary output directory) bounds memory on large sources; the
    row of an item is its index, whatever order the threads finish in.
    """
    size = data.storage_resolution
    images = np.lib.format.open_memmap(buffer_path, mode="w+", dtype=np.uint8, shape=(len(items), size, size, 3))
    bad: list[Excluded] = []

    def read(i: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return i, source.read(items[i], size), None
        except BadImage as exc:
            return i, None, str(exc)

    threads = 1 if source.kind == "digits" else data.read_threads
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="evit-read") if threads > 1 else None
    try:
        with _progress(len(items), f"decoding {source.uri}") as advance:
            for chunk in _chunks(len(items), _READ_CHUNK):
                results = pool.map(read, chunk) if pool else map(read, chunk)
                for i, arr, reason in results:
                    if arr is None:
                        bad.append(Excluded(items[i].path, reason or "unreadable"))
                    else:
                        images[i] = arr
                advance(len(chunk))
                cancel.check("while decoding images; nothing was published")
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    images.flush()
    return images, bad


class _progress:
    """`evit.progress.Progress` as an `advance(n)` callable (bar on a terminal, log lines elsewhere)."""

    def __init__(self, total: int, description: str) -> None:
        self.total, self.description = total, description
        self._progress: Any = None

    def __enter__(self) -> Any:
        from evit.progress import Progress

        self._progress = Progress(self.total, self.description, unit="img", logger=log)
        return self._progress.update

    def __exit__(self, *exc: Any) -> None:
        self._progress.close()


def _class_of(path: str) -> tuple[str, str] | None:
    parts = PurePosixPath(path).parts
    if len(parts) >= 3 and parts[0] in SOURCE_SPLITS:
        return parts[0], parts[1]
    return None


def _class_images(classes: Sequence[str], items: Sequence[Item], bad: set[str],
                  excluded: Sequence[Excluded]) -> dict[str, ClassImages]:
    excl = Counter(k for k in (_class_of(e.path) for e in excluded) if k is not None)
    train: dict[str, list[int]] = {c: [] for c in classes}
    val: dict[str, list[int]] = {c: [] for c in classes}
    for i, item in enumerate(items):
        if item.path not in bad:
            (train if item.split == "train" else val)[item.cls].append(i)
    return {
        c: ClassImages(train[c], val[c], excl[("train", c)], excl[("val", c)])
        for c in classes
    }


def _write_array(path: Path, array: np.ndarray) -> None:
    """One .npy file (no pickle: readable without trusting the writer)."""
    with open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


SplitWriter = Callable[[str, Sequence[int], np.ndarray], list[dict[str, Any]]]
"""(split, item rows, labels) -> the split's shard list [{"name", "rows"}]; writes the shard files."""


def _npy_writer(tmp: Path, images: np.ndarray, data: DataParams) -> SplitWriter:
    def write(split: str, rows: Sequence[int], labels: np.ndarray) -> list[dict[str, Any]]:
        shards = []
        for k, chunk in enumerate(_chunks(len(rows), data.shard_size)):
            name = shard_name(split, k)
            _write_array(tmp / name, np.ascontiguousarray(images[[rows[j] for j in chunk]]))
            shards.append({"name": name, "rows": len(chunk)})
        return shards
    return write


def _shard_writer(tmp: Path, staging: Path, where: np.ndarray, exts: Sequence[str], data: DataParams) -> SplitWriter:
    def write(split: str, rows: Sequence[int], labels: np.ndarray) -> list[dict[str, Any]]:
        return tarshards.write_split_shards(tmp, split, rows, labels, staging, where, exts, data.shard_size)
    return write


def _write_output(tmp: Path, write_split: SplitWriter, items: Sequence[Item], classes: Sequence[str],
                  assignment: dict[str, list[int]], excluded: Sequence[Excluded], data: DataParams,
                  source: Source, has_val: bool) -> dict[str, Any]:
    class_index = {c: k for k, c in enumerate(classes)}
    splits: dict[str, Any] = {}
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        rows = assignment[split]
        labels = np.asarray([class_index[items[i].cls] for i in rows], dtype=np.int64)
        shards = write_split(split, rows, labels)
        _write_array(tmp / labels_name(split), labels)
        (tmp / paths_name(split)).write_text("".join(items[i].path + "\n" for i in rows), encoding="utf-8")
        per_class = Counter(items[i].cls for i in rows)
        counts[split] = {c: per_class[c] for c in classes}
        splits[split] = {"num": len(rows), "shards": shards, "labels": labels_name(split), "paths": paths_name(split)}
        if data.format == "shards":
            splits[split]["index"] = tarshards.index_name(split)

    files = [{"name": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(tmp.iterdir()) if not p.name.startswith(".")]
    hashed: dict[str, Any] = {
        "format": FORMAT,
        "classes": list(classes),
        "storage_resolution": data.storage_resolution,
        "files": {f["name"]: f["sha256"] for f in files},
    }
    if data.format != "npy":  # npy hashes stay what they were before the shards layout existed
        hashed["layout"] = data.format
    content_hash = sha256_json(hashed)
    image_info: dict[str, Any] = (
        {"image_shape": [data.storage_resolution, data.storage_resolution, 3], "dtype": "uint8"}
        if data.format == "npy" else {"image_encoding": "jpg|png (original size" + (
            f", longer side <= {data.max_side})" if data.max_side else ")")}
    )
    manifest = {
        "format": FORMAT,
        "layout": data.format,
        "source": {"kind": source.kind, "uri": source.uri, "has_val": has_val},
        "classes": list(classes),
        "num_classes": len(classes),
        "storage_resolution": data.storage_resolution,
        **image_info,
        "counts": counts,
        "totals": {s: splits[s]["num"] for s in SPLITS},
        "splits": splits,
        "files": files,
        "excluded": [e.to_dict() for e in excluded],
        "params": data.model_dump(mode="json"),
        "content_hash": content_hash,
    }
    write_json_atomic(tmp / MANIFEST, manifest)
    return manifest


def _log_excluded(excluded: Sequence[Excluded]) -> None:
    if not excluded:
        return
    reasons = Counter(e.reason.split(":")[0] for e in excluded)
    log.warning("excluded %d file(s) (listed in manifest.json 'excluded'): %s", len(excluded), dict(reasons))
    for e in excluded[:10]:
        log.warning("  excluded %s: %s", e.path, e.reason)
