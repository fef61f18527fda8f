"""Where images come from: scikit-learn's digits, a local ImageFolder tree, or S3.

One module per source (`digits`, `folder`, `s3`), each a `Source` (`base`): `list()` names
every candidate file (cheap, no decoding) and `read(item, size)` returns one stored
image. `open_source(params)` picks the one `data.source` names.
"""

from __future__ import annotations

from evit.config import Params
from evit.data.sources.base import LAYOUT_HINT, SOURCE_SPLITS, Excluded, Item, Listing, Source, classify, merge
from evit.data.sources.digits import DigitsSource
from evit.data.sources.folder import FolderSource
from evit.data.sources.s3 import S3Source
from evit.errors import DataError

__all__ = ["LAYOUT_HINT", "SOURCE_SPLITS", "DigitsSource", "Excluded", "FolderSource", "Item", "Listing", "S3Source",
           "Source", "classify", "merge", "open_source"]


def open_source(params: Params) -> Source:
    """The source named by `params.data.source`; layout and access problems raise DataError."""
    spec = params.data.source
    if spec == "digits":
        return DigitsSource()
    if spec.startswith("s3://"):
        return S3Source(spec, params.storage, threads=params.data.read_threads)
    if "://" in spec:
        raise DataError(
            f"data.source = {spec!r}: unsupported URL scheme; accepted: 'digits', a local directory or s3://bucket/prefix"
        )
    return FolderSource(spec)
