"""Where images come from: scikit-learn's digits, a local ImageFolder tree, or S3.

A source does two things: `list()` names every candidate file (cheap, no decoding) and
`read(item, size)` returns one stored image or raises `BadImage`. Listing is separate
from reading so that layout problems (no train/, a val class missing from train) fail
in seconds, before a long decode pass, and so the split can be planned from names alone.

The directory layout is the ImageNet / torchvision ImageFolder one:

    <root>/train/<class>/<any/sub/dirs>/<image>
    <root>/val/<class>/<image>            (optional; held out from train when absent)

Paths recorded anywhere (items, exclusions, the manifest) are relative to <root>, so the
prepared data does not depend on where the source was mounted.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from evit.config import Params
from evit.data.images import BadImage, decode, is_image_name, to_stored
from evit.errors import DataError

log = logging.getLogger(__name__)

SOURCE_SPLITS = ("train", "val")
LAYOUT_HINT = "expected <root>/train/<class>/<image> and optionally <root>/val/<class>/<image>"


@dataclass(frozen=True, order=True)
class Item:
    split: str
    """The split in the source ('train' or 'val'), not the prepared split."""
    cls: str
    path: str
    """Relative to the source root, POSIX separators, e.g. 'train/cat/001.jpg'."""


@dataclass(frozen=True, order=True)
class Excluded:
    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class Listing:
    items: list[Item]
    excluded: list[Excluded]
    class_dirs: dict[str, set[str]] = field(default_factory=dict)
    """Split -> class directories seen, including empty ones (which are an error later).
    A split is a key here exactly when the source has that split directory."""

    @property
    def has_val(self) -> bool:
        return bool(self.class_dirs.get("val")) or any(i.split == "val" for i in self.items)


class Source:
    """Base of the three sources; `kind` and `uri` go into the manifest."""

    kind: str = ""
    uri: str = ""

    def list(self) -> Listing:
        raise NotImplementedError

    def read(self, item: Item, size: int) -> np.ndarray:
        raise NotImplementedError

    def read_bytes(self, item: Item, size: int) -> bytes:
        """The file's encoded bytes as stored at the source (`size`: digits' render side only).

        Raises `BadImage` when the file cannot be read at all.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release connections; the default has nothing to release."""


def classify(split: str, rel_paths: Iterable[str], class_dirs: Iterable[str] = ()) -> Listing:
    """Sort the files under one split directory into image items and exclusions.

    `rel_paths` are relative to the split directory ('cat/001.jpg'). Files directly in the
    split directory, hidden files and non-image extensions are excluded (with the reason),
    never read: a stray README or a 2 GB tarball must not be downloaded and decoded.
    """
    items: list[Item] = []
    excluded: list[Excluded] = []
    classes = {c for c in class_dirs if not c.startswith(".")}
    for rel in rel_paths:
        parts = PurePosixPath(rel).parts
        shown = f"{split}/{rel}"
        if any(p.startswith(".") for p in parts):
            excluded.append(Excluded(shown, "hidden file or directory"))
        elif len(parts) < 2:
            excluded.append(Excluded(shown, f"not inside a class directory ({split}/<class>/<image>)"))
        elif not is_image_name(rel):
            ext = PurePosixPath(rel).suffix or "no extension"
            excluded.append(Excluded(shown, f"not an image file ({ext})"))
        else:
            classes.add(parts[0])
            items.append(Item(split, parts[0], shown))
    return Listing(sorted(items), sorted(excluded), {split: classes})


def merge(listings: Iterable[Listing]) -> Listing:
    out = Listing([], [], {})
    for part in listings:
        out.items.extend(part.items)
        out.excluded.extend(part.excluded)
        for split, classes in part.class_dirs.items():
            out.class_dirs.setdefault(split, set()).update(classes)
    out.items.sort()
    out.excluded.sort()
    return out


# --- digits ----------------------------------------------------------------------------------

class DigitsSource(Source):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, no download).

    Values 0..16 are scaled to 0..255 and upsampled to the storage resolution with the same
    bicubic resize as every other source. The set has no val split of its own.
    """

    kind = "digits"
    uri = "digits"

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        self._images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        self._targets = bunch.target.astype(np.int64)

    def list(self) -> Listing:
        items = [Item("train", str(int(t)), f"digits/{i:04d}") for i, t in enumerate(self._targets)]
        return Listing(sorted(items), [], {"train": {i.cls for i in items}})

    def read(self, item: Item, size: int) -> np.ndarray:
        index = int(item.path.rsplit("/", 1)[1])
        return to_stored(Image.fromarray(self._images[index], mode="L"), size)

    def read_bytes(self, item: Item, size: int) -> bytes:
        """A PNG of the digit rendered at `size` (the digits have no file of their own)."""
        buf = io.BytesIO()
        Image.fromarray(self.read(item, size), mode="RGB").save(buf, format="PNG")
        return buf.getvalue()


# --- local directory -------------------------------------------------------------------------

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


def open_source(params: Params) -> Source:
    """The source named by `params.data.source`; layout and access problems raise DataError."""
    spec = params.data.source
    if spec == "digits":
        return DigitsSource()
    if spec.startswith("s3://"):
        from evit.data.s3 import S3Source

        return S3Source(spec, params.storage, threads=params.data.read_threads)
    if "://" in spec:
        raise DataError(
            f"data.source = {spec!r}: unsupported URL scheme; accepted: 'digits', a local directory or s3://bucket/prefix"
        )
    return FolderSource(spec)
