"""params.yaml, validated once and up front (the lowest layer above the plain helpers).

- `evit.config.schema`: the sections and their knobs (`Params`);
- `evit.config.devices`: a latency device's settings and what each device kind is (`KINDS`);
- `evit.config.load`: reading the file, overrides, and error messages that name the key,
  the bad value and what is accepted.

Everything a caller needs is re-exported here (`from evit.config import Params, load_params`).
"""

from evit.config.base import ConfigError, Section
from evit.config.devices import KINDS, THREAD_CLOCK_KINDS, DeviceParams, KindTraits
from evit.config.load import (
    DEFAULT_PARAMS,
    OVERRIDES_ENV,
    apply_overrides,
    load_params,
    override_items,
    params_path,
    parse_params,
)
from evit.config.schema import (
    AblateParams,
    BaselinesParams,
    DataParams,
    ExportParams,
    Params,
    SearchParams,
    SpaceParams,
    StorageParams,
    TeacherParams,
    TrackingParams,
    TrainParams,
)

__all__ = [
    "DEFAULT_PARAMS", "KINDS", "OVERRIDES_ENV", "THREAD_CLOCK_KINDS", "AblateParams", "BaselinesParams", "ConfigError",
    "DataParams", "DeviceParams", "ExportParams", "KindTraits", "Params", "SearchParams", "Section", "SpaceParams",
    "StorageParams", "TeacherParams", "TrackingParams", "TrainParams", "apply_overrides", "load_params",
    "override_items", "params_path", "parse_params",
]
