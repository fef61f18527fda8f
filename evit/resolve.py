"""From settings and files to the space objects the stages work on: one place for each lookup.

- `space_from_params`: the search space a validated `params.space` section describes (a
  preset, or the space of the paper's released supernet read from its config file);
- `space_for`: that space with the classifier width of the prepared data. The head's last
  linear layer (and so its latency and FLOPs) depends on the number of classes; stages
  that run without a checkpoint (lut) or must agree with one (search, export) all take it
  from the same place: the prepared data's manifest when it exists, else the preset's;
- `restore_space`: the space a checkpoint, LUT or card recorded (`SearchSpace.to_dict`),
  rebuilt and, for a preset, checked against this version's preset of that name;
- `check_params`: the checks of params.yaml that need the space itself (a
  `search.fixed_archs` entry lies in the configured space), made up front by the CLI and
  the flow. `evit.config` stays below the space, so it cannot make them.
"""

from __future__ import annotations

import logging
from typing import Any

from evit import paths
from evit.config import ConfigError, Params, SpaceParams
from evit.errors import CheckpointError, DataError, UserError
from evit.io import read_user_json
from evit.released import arch_label, resolve_arch
from evit.space import NON_STRUCTURAL, SearchSpace, get_space
from evit.space.reference import load_reference_space

log = logging.getLogger(__name__)


def space_from_params(space_params: SpaceParams, num_classes: int | None = None) -> SearchSpace:
    """The search space that a validated `params.space` section describes.

    `preset: reference` builds the space from the reference's own config file
    (`space.reference_config`, see `evit.space.reference`).
    """
    sp = space_params
    if sp.preset == "reference":
        space = load_reference_space(sp.reference_config, num_classes=num_classes)
        if sp.levels is not None or sp.tolerance is not None:
            space = space.with_levels(sp.levels if sp.levels is not None else space.levels, sp.tolerance)
        return space.with_convention(sp.flops_convention)
    return get_space(sp.preset, sp.levels, sp.tolerance, num_classes, sp.flops_convention)


def num_classes_for(params: Params) -> int | None:
    """Classes of the prepared data (manifest `num_classes`, or the length of `classes`), else None."""
    manifest = paths.manifest_path(params)
    if not manifest.is_file():
        return None
    data = read_user_json(manifest, "prepared data manifest", error=DataError,
                          expect="the JSON object `evit prepare` writes; re-run `evit prepare`")
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


def restore_space(d: dict[str, Any]) -> SearchSpace:
    """The space recorded as `d` (`SearchSpace.to_dict`) in a checkpoint, rebuilt.

    A preset's dict must match this version's preset of that name in every structural field
    (else the weights were shaped by another evit version: CheckpointError). A
    reference-variant space is not a preset (it comes from the reference's config file), so
    it is rebuilt from the dict itself.
    """
    if d.get("variant", "default") != "default":
        return SearchSpace.from_dict(d)
    space = get_space(str(d["name"]), levels=list(d.get("levels") or []) or None, tolerance=d.get("tolerance"),
                      flops_convention=d.get("flops_convention"),
                      num_classes=int(d["num_classes"]))
    if space.structure_dict() != {k: v for k, v in d.items() if k not in NON_STRUCTURAL}:
        raise CheckpointError(f"the checkpoint's search space '{d['name']}' differs from this version's preset "
                              "of that name; it was written by an incompatible evit version")
    return space


def check_fixed_archs(params: Params, source: str = "params") -> None:
    """Every `search.fixed_archs` entry resolves and lies in the configured space (any preset,
    `reference` included); ConfigError naming the entry otherwise."""
    if not params.search.fixed_archs:
        return
    space = space_from_params(params.space)
    labels: dict[str, str] = {}
    for spec in params.search.fixed_archs:
        try:
            name, arch = resolve_arch(spec)
            space.validate_computable(arch)
        except UserError as exc:
            raise ConfigError(f"{source}: search.fixed_archs entry {spec!r}: {exc}") from None
        label = arch_label(name)
        if label in labels:
            raise ConfigError(f"{source}: search.fixed_archs: {labels[label]!r} and {spec!r} share the label {label!r}")
        labels[label] = spec


def check_params(params: Params, source: str = "params") -> None:
    """The checks of `params` that need the search space (see the module docstring)."""
    check_fixed_archs(params, source)
