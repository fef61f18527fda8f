"""The on-disk format of prepared data: names shared by the writer (prepare) and the reader (loader).

    <out_dir>/manifest.json          classes, counts, exclusions, params, file hashes
    <out_dir>/<split>-00000.npy      uint8 (N, S, S, 3) images, at most shard_size rows each
    <out_dir>/<split>-labels.npy     int64 (N,) class indices into manifest["classes"]
    <out_dir>/<split>-paths.txt      one source path per row (which file each image came from)

`.npy` because numpy can memory-map it (no decoding, no copies, cheap in DataLoader
workers) and its bytes are a pure function of the array (no timestamps), so the same data
always hashes the same for DVC and Prefect's cache.
"""

from __future__ import annotations

FORMAT = "evit-prepared/1"
MANIFEST = "manifest.json"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.npy"


def labels_name(split: str) -> str:
    return f"{split}-labels.npy"


def paths_name(split: str) -> str:
    return f"{split}-paths.txt"
