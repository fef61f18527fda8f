"""The search space a stage works on, with the classifier width of the prepared data.

The head's last linear layer (and so its latency and FLOPs) depends on the number of
classes. Stages that run without a checkpoint (lut) or must agree with one (search,
export) all take it from the same place: the prepared data's manifest when it exists,
else the preset's default. Keep that lookup here, in one function.
"""

from __future__ import annotations

import json
import logging

from evit import paths
from evit.config import Params
from evit.errors import DataError
from evit.space import SearchSpace, space_from_params

log = logging.getLogger(__name__)


def num_classes_for(params: Params) -> int | None:
    """Classes of the prepared data (manifest `num_classes`, or the length of `classes`), else None."""
    manifest = paths.manifest_path(params)
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"prepared data manifest {str(manifest)!r} is unreadable ({exc}); re-run `evit prepare`") \
            from None
    value = data.get("num_classes", data.get("classes"))
    if isinstance(value, list):
        value = len(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DataError(f"prepared data manifest {str(manifest)!r} has no usable 'num_classes'/'classes' "
                        f"(got {value!r}); re-run `evit prepare`")
    return value


def space_for(params: Params) -> SearchSpace:
    """`params.space` as a SearchSpace with the prepared data's classes (preset default without data)."""
    n = num_classes_for(params)
    space = space_from_params(params.space, n)
    if n is None:
        log.info("no prepared data at %s; using the '%s' preset's %d classes", paths.manifest_path(params),
                 space.name, space.num_classes)
    return space
