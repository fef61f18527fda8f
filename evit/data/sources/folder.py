"""A local (or mounted) ImageFolder directory: <root>/train/<class>/..., optional <root>/val/<class>/...."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from evit.data.images import BadImage, decode
from evit.data.sources.base import LAYOUT_HINT, SOURCE_SPLITS, Item, Listing, Source, classify, merge
from evit.errors import DataError

log = logging.getLogger(__name__)


class FolderSource(Source):
    """An ImageFolder / ImageNet-layout directory on a local or mounted file system."""

    kind = "folder"

    def __init__(self, root: str) -> None:
        self.uri = root
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise DataError(
                f"data.source: directory {root!r} not found; accepted: 'digits', an existing "
                f"ImageFolder directory ({LAYOUT_HINT}), or s3://bucket/prefix"
            )
        if not self.root.is_dir():
            raise DataError(f"data.source: {root!r} is a file, not a directory; {LAYOUT_HINT}")
        if not (self.root / "train").is_dir():
            present = sorted(p.name for p in self.root.iterdir())[:10]
            raise DataError(
                f"data.source: no train/ directory in {root!r} (found: {present or 'nothing'}); {LAYOUT_HINT}"
            )

    def list(self) -> Listing:
        others = sorted(p.name for p in self.root.iterdir() if p.name not in SOURCE_SPLITS and not p.name.startswith("."))
        if others:
            log.info("ignoring %s in %s (only train/ and val/ are read)", others, self.uri)
        parts = []
        for split in SOURCE_SPLITS:
            base = self.root / split
            if not base.is_dir():
                continue
            dirs = [p.name for p in base.iterdir() if p.is_dir()]
            files: list[str] = []
            for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
                dirnames.sort()
                rel_dir = Path(dirpath).relative_to(base)
                files.extend((rel_dir / f).as_posix() for f in sorted(filenames))
            parts.append(classify(split, files, dirs))
        return merge(parts)

    def read(self, item: Item, size: int) -> np.ndarray:
        return decode(self.read_bytes(item, size), size)

    def read_bytes(self, item: Item, size: int) -> bytes:
        try:
            return (self.root / item.path).read_bytes()
        except OSError as exc:
            raise BadImage(f"unreadable file: {exc.strerror or type(exc).__name__}") from None
