"""Decoding source images into the stored form: square uint8 RGB at the storage resolution.

Every source (digits, local folder, S3) goes through `to_stored` so that the stored bytes
depend only on the image content and `storage_resolution`, never on where it was read
from. Failures raise `BadImage` with a short, deterministic reason (no memory addresses,
no temp paths) because the reason ends up in manifest.json, which DVC hashes.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
"""What counts as an image file (case-insensitive); anything else is excluded unread."""

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class BadImage(Exception):
    """This one file cannot be used; the message is the reason recorded in the manifest."""


def is_image_name(path: str) -> bool:
    return PurePosixPath(path).suffix.lower() in IMAGE_EXTENSIONS


def to_stored(img: Image.Image, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to `size` (bicubic, antialiased) -> (size, size, 3) uint8.

    A centre crop keeps the aspect ratio (the ImageNet convention); the training transforms
    crop again from this square, so nothing is stretched twice.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(arr)


@contextlib.contextmanager
def _as_bad_image() -> Iterator[None]:
    """Whatever PIL raises on a bad file, as one `BadImage` naming why (decode and encode alike)."""
    try:
        yield
    except UnidentifiedImageError:
        raise BadImage("not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"image too large to decode safely: {_clean(exc)}") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        raise BadImage(f"corrupt or truncated image: {_clean(exc)}") from None


def decode(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> stored array, or `BadImage` naming why the file is unusable."""
    if not data:
        raise BadImage("empty file")
    with _as_bad_image(), Image.open(io.BytesIO(data)) as img:
        # JPEG only: decode at a reduced DCT scale that is still >= size (much faster on
        # large photos; deterministic for a given libjpeg).
        img.draft("RGB", (size, size))
        img.load()
        return to_stored(img, size)


JPEG_QUALITY = 95
"""Quality of the one re-encode of a downscaled JPEG (`max_side`); other formats go to PNG (lossless)."""


def encode_for_shard(data: bytes, max_side: int | None) -> tuple[bytes, str]:
    """Source bytes -> (bytes to store in a tar shard, extension 'jpg' or 'png'), or `BadImage`.

    A JPEG within `max_side` is kept byte for byte (no generation loss, no CPU spent);
    it is still decoded once (at 1/8 DCT scale, which parses all the entropy-coded data)
    so that truncated or corrupt files are excluded here, not in a training worker. Any
    other format is re-encoded once to PNG (lossless), and any image over `max_side` is
    downscaled (bicubic, antialiased) and re-encoded (JPEG at `JPEG_QUALITY` for JPEG
    sources, else PNG). Output bytes are a pure function of the input bytes.
    """
    if not data:
        raise BadImage("empty file")
    with _as_bad_image(), Image.open(io.BytesIO(data)) as img:
        is_jpeg = img.format == "JPEG"
        too_big = max_side is not None and max(img.size) > max_side
        if is_jpeg and not too_big:
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
            return data, "jpg"
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        if too_big:
            assert max_side is not None
            scale = max_side / max(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
        out = io.BytesIO()
        if is_jpeg:
            img.save(out, format="JPEG", quality=JPEG_QUALITY)
            return out.getvalue(), "jpg"
        img.save(out, format="PNG", optimize=False)
        return out.getvalue(), "png"


def decode_rgb(data: bytes) -> Image.Image:
    """Stored shard bytes -> an RGB PIL image in its upright orientation (full resolution)."""
    img = Image.open(io.BytesIO(data))
    img = ImageOps.exif_transpose(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def _clean(exc: BaseException) -> str:
    return _ADDRESS.sub("", str(exc)).strip() or type(exc).__name__
