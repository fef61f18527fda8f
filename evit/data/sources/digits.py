"""scikit-learn's bundled handwritten digits: the embedded default data set (no download)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from evit.data.images import to_stored
from evit.data.sources.base import Item, Listing, Source


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
