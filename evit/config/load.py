"""Reading params.yaml: merge the overrides, validate once, and say exactly what is wrong.

`load_params` turns the file (plus `--set` / $EVIT_OVERRIDES items) into a frozen
`Params` or raises `ConfigError` naming the key, the bad value and what is accepted,
before any expensive work starts.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from evit.config.base import ConfigError
from evit.config.schema import Params
from evit.io import read_user_yaml, yaml_problem

DEFAULT_PARAMS = "params.yaml"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The pydantic model class found by walking `loc` (field names / list indices) from Params."""
    model: type[BaseModel] = Params
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            break
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        for c in candidates:  # list[Model] | None
            nested += [a for a in getattr(c, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return model


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} invalid setting(s):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        inp = err.get("input")
        if err["type"] == "extra_forbidden":
            accepted = sorted(_model_at(err["loc"][:-1]).model_fields)
            close = difflib.get_close_matches(str(err["loc"][-1]), accepted, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"  - {loc}: unknown key (value {inp!r}){hint}; accepted keys here: {accepted}")
            continue
        msg = err["msg"]
        if err["type"] == "literal_error":
            msg = msg.replace("Input should be", "accepted:")
        if not loc:  # a check across sections: the message names the keys itself
            lines.append(f"  - {msg.removeprefix('Value error, ')}")
            continue
        value = "" if err["type"] == "missing" else f" = {inp!r}"
        lines.append(f"  - {loc}{value}: {msg}")
    if len(lines) == 2:  # one problem: one line
        return f"{source}: {lines[1].removeprefix('  - ')}"
    return "\n".join(lines)


def parse_params(data: Any, source: str = "params") -> Params:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


OVERRIDES_ENV = "EVIT_OVERRIDES"
"""Override items applied on top of every params file loaded, one per line (a YAML file or
KEY=VALUE). The CLI's `--set` appends to it, so `dvc`, torchrun and Prefect task processes
started from that command load the same settings."""


PARAMS_EXPECTED = "a YAML mapping of sections (data:, train:, ...) like the project's params.yaml"
OVERRIDE_EXPECTED = "a YAML mapping of params sections to merge on top (e.g. train: {epochs: 2})"


def _merge(base: Any, over: Any, where: str) -> Any:
    """`over` merged into `base`: mappings key by key, a mapping onto a list of named entries
    (`devices`) entry by name, anything else replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v, f"{where}.{k}" if where else str(k)) if k in base else v
        return out
    if isinstance(base, list) and isinstance(over, dict) and all(isinstance(e, dict) and "name" in e for e in base):
        names = [e["name"] for e in base]
        unknown = sorted(set(over) - set(names))
        if unknown:
            raise ConfigError(f"override of {where}: no entry named {unknown}; entries: {names}")
        return [_merge(e, over[e["name"]], f"{where}.{e['name']}") if e["name"] in over else e for e in base]
    return over


def _item_to_mapping(item: str) -> tuple[Any, str]:
    """One override item -> (nested mapping, description): `a.b=VALUE` (VALUE parsed as YAML) or a YAML file."""
    key, eq, value = item.partition("=")
    if eq and key.strip() and not os.path.lexists(item):
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({yaml_problem(exc)})") from None
        parts = [p for p in key.strip().split(".")]
        if not all(parts):
            raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted KEY, e.g. train.epochs=2")
        out: Any = parsed
        for part in reversed(parts):
            out = {part: out}
        return out, f"--set {key.strip()}"
    path = Path(item)
    if not os.path.lexists(path):
        raise ConfigError(f"override {item!r} is neither KEY=VALUE (e.g. train.epochs=2) nor an existing YAML file")
    return read_user_yaml(path, "override file", expect=OVERRIDE_EXPECTED, error=ConfigError), str(path)


def override_items(extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The override items in force: those of $EVIT_OVERRIDES, then `extra`."""
    env = [line.strip() for line in os.environ.get(OVERRIDES_ENV, "").splitlines() if line.strip()]
    return env + [x for x in extra if x.strip()]


def apply_overrides(data: dict[str, Any], items: list[str] | tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    """`data` with every override item merged on top, in order; also the items' descriptions."""
    described = []
    for item in items:
        mapping, desc = _item_to_mapping(item)
        data = _merge(data, mapping, "")
        described.append(desc)
    return data, described


def params_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The params file to read: `path`, else $EVIT_PARAMS, else params.yaml."""
    return Path(path or os.environ.get("EVIT_PARAMS", DEFAULT_PARAMS))


def load_params(path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read and validate params.yaml (or `path`); errors name key, value and what is accepted.

    Override items ($EVIT_OVERRIDES, then `overrides`: YAML files or KEY=VALUE) are merged on
    top before validation, so a budget profile (`tests/data/imagenet-smoke.yaml`) or a
    one-off `--set train.epochs=2` is checked like the file itself.
    """
    path = params_path(path)
    if not os.path.lexists(path):
        raise ConfigError(f"params file {str(path)!r} not found (pass --params PATH or run from the project root)")
    data = read_user_yaml(path, "params file", expect=PARAMS_EXPECTED, error=ConfigError)
    items = override_items(tuple(overrides))
    source = str(path)
    if items:
        data, described = apply_overrides(data, items)
        source = " + ".join([source, *described])
    return parse_params(data, source)
