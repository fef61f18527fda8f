"""The seeded, class-stratified train / search / val split, and the checks that guard it.

Per class, the readable source-train images (sorted by path) are shuffled with a
`random.Random` seeded by (seed, class name); the first `round(n * search_fraction)` go to
`search`, the next `round(n * val_fraction)` to `val` (only when the source has no val split
of its own), the rest to `train`. Each hold-out takes at least one image, so every class is
present in every split. Seeding per class means adding or removing one class leaves the
other classes' splits unchanged, and nothing depends on listing order or hash seeds.

Class problems (empty, too few images, missing from val) are collected for all classes
and raised as one `DataError`, so a user fixes the dataset in one pass.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from evit.config import DataParams
from evit.errors import DataError

SPLITS = ("train", "search", "val")
_MAX_LISTED = 20


def _round(x: float) -> int:
    return int(x + 0.5)


def holdout_sizes(n: int, data: DataParams, *, has_val: bool) -> tuple[int, int]:
    """(search, val) images to hold out of a class with `n` readable train images."""
    n_search = max(1, _round(n * data.search_fraction))
    n_val = 0 if has_val else max(1, _round(n * data.val_fraction))
    return n_search, n_val


@dataclass(frozen=True)
class ClassImages:
    """Indices (into the item list) of one class's readable images, plus what was excluded."""

    train: Sequence[int]
    val: Sequence[int] = ()
    train_excluded: int = 0
    val_excluded: int = 0


def check_classes(classes: Mapping[str, ClassImages], data: DataParams, *, has_val: bool) -> None:
    """Raise one DataError listing every class that cannot be split as configured."""
    problems: list[str] = []
    if len(classes) < 2:
        raise DataError(
            f"data.source {data.source!r}: found {len(classes)} class(es) {sorted(classes)}; "
            "a classifier needs at least 2 class directories under train/"
        )
    for name in sorted(classes):
        c = classes[name]
        n = len(c.train)
        excl = f" ({c.train_excluded} excluded as unreadable or not images)" if c.train_excluded else ""
        if n == 0:
            problems.append(f"class {name!r} has no readable images in train/{excl}; add images or remove the directory")
            continue
        n_search, n_val = holdout_sizes(n, data, has_val=has_val)
        n_train = n - n_search - n_val
        if n_train < data.min_per_class:
            held = f"{n_search} for search" + ("" if has_val else f" and {n_val} for val")
            problems.append(
                f"class {name!r}: {n} readable train images{excl}; after holding out {held}, "
                f"{n_train} remain for train, fewer than data.min_per_class = {data.min_per_class} "
                "(add images, or lower data.min_per_class / data.search_fraction / data.val_fraction)"
            )
        if has_val and not c.val:
            vexcl = f" ({c.val_excluded} excluded)" if c.val_excluded else ""
            problems.append(f"class {name!r} has no readable images in val/{vexcl}; every class needs at least one")
    if problems:
        shown = problems[:_MAX_LISTED]
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(
            f"data.source {data.source!r}: {len(problems)} class problem(s):\n  - " + "\n  - ".join(shown) + more
        )


def stratified_split(classes: Mapping[str, ClassImages], data: DataParams, *, has_val: bool) -> dict[str, list[int]]:
    """Assign item indices to train / search / val; each split's indices come back sorted."""
    check_classes(classes, data, has_val=has_val)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for name in sorted(classes):
        c = classes[name]
        order = sorted(c.train)
        random.Random(f"evit-split:{data.seed}:{name}").shuffle(order)
        n_search, n_val = holdout_sizes(len(order), data, has_val=has_val)
        out["search"].extend(order[:n_search])
        if has_val:
            out["val"].extend(c.val)
        else:
            out["val"].extend(order[n_search:n_search + n_val])
        out["train"].extend(order[n_search + n_val:])
    return {s: sorted(v) for s, v in out.items()}


def cap_per_class(indices: Sequence[int], cap: int | None, *, seed: int, key: str) -> list[int]:
    """A seeded subset of at most `cap` indices (all of them when cap is None), sorted."""
    if cap is None or len(indices) <= cap:
        return sorted(indices)
    return sorted(random.Random(f"evit-cap:{seed}:{key}").sample(sorted(indices), cap))
