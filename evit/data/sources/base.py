"""What every image source is: `list()` names the files, `read()` decodes one.

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

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np

from evit.data.images import is_image_name

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
