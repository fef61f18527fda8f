"""`evit import-reference`: the paper's released supernet -> a normal evit checkpoint.

The reference implementation (microsoft/Moonlit `ElasticViT`) saves a dict with `epoch`,
`state_dict`, `optimizer`, `bank`, `arch`, `extras` and `model_ema`; when it loads one it
takes `model_ema` whenever present, so we do too (`prefer="auto"`). Reading is safe:
`.pth`/`.pt`/`.tar` go through `torch.load(weights_only=True)` with only numpy's scalar and
array types allowed besides torch's own (nothing else is ever unpickled); `.safetensors`
holds plain tensors. `module.` prefixes (DataParallel/DDP) are stripped.

Every key and shape is checked against `ReferenceSupernet(space)`, the module that holds
the reference layout for the space built from the reference's own YAML
(`evit.space.reference`); a mismatch is one error naming the missing, unexpected and
mis-shaped keys. The result is written with `evit.train.checkpoint.save_checkpoint`, so
`load_supernet(path)` returns a module whose `forward(x, arch)` runs any subnet, and
`evit lut/search/export` (with `space.preset: reference`) take it like a trained one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from evit.errors import UserError
from evit.io import (
    MAX_CHECKPOINT_BYTES,
    check_input_file,
    check_output_file,
    sha256_file,
)
from evit.retry import short
from evit.space import SearchSpace

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
_MAX_LISTED = 8


class ReferenceImportError(UserError, ValueError):
    """A reference checkpoint that cannot be imported as it is; says which keys or why."""


def _numpy_globals() -> list[Any]:
    """numpy types a plain training checkpoint may hold in its bookkeeping (scalars, arrays)."""
    import numpy as np

    names = [("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
             ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")]
    found: list[Any] = [np.dtype, np.ndarray, *{type(np.dtype(t)) for t in ("f4", "f8", "i4", "i8", "u1", "b1")}]
    import importlib

    for mod, attr in names:
        try:
            found.append(getattr(importlib.import_module(mod), attr))
        except (ImportError, AttributeError):
            continue
    return found


def read_weights_file(path: Path) -> Any:
    """The object stored in `path` (.safetensors or a torch file), loaded without arbitrary unpickling."""
    check_input_file(path, "reference weights", max_bytes=MAX_CHECKPOINT_BYTES, error=ReferenceImportError)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ReferenceImportError(f"{path}: not a readable safetensors file ({short(exc)})") from None
    if suffix not in TORCH_SUFFIXES:
        raise ReferenceImportError(f"{path}: unknown weights format {suffix!r}; accepted: "
                                   f"{', '.join((*TORCH_SUFFIXES, SAFETENSORS_SUFFIX))}")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or a legacy pickle
        got = "is empty" if not head else "is neither the zip archive torch.save writes nor a legacy pickle"
        raise ReferenceImportError(f"{path} {got}: not a PyTorch checkpoint; expected the released .pth, or "
                                   ".safetensors")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and EOF errors all end here
        unsafe = []
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - not a zip checkpoint at all
            pass
        if unsafe:
            raise ReferenceImportError(
                f"{path} holds Python objects that a safe load refuses ({', '.join(unsafe[:5])}); evit never "
                "unpickles arbitrary objects. Save just the weights where that code is installed, e.g. "
                "torch.save(ckpt['model_ema'], 'weights.pth'), or convert them to .safetensors") from None
        raise ReferenceImportError(f"{path} is not a readable PyTorch checkpoint "
                                   f"({type(exc).__name__}: {short(exc)[:200]})") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def select_state_dict(obj: Any, prefer: Literal["auto", "ema", "raw"] = "auto") -> tuple[dict[str, Tensor], str]:
    """(state_dict, "ema" | "raw") out of what the reference saved; EMA first, like the reference."""
    if _is_state_dict(obj):
        if prefer == "ema":
            raise ReferenceImportError("the file holds one plain state_dict, no 'model_ema'; drop --prefer ema")
        return dict(obj), "raw"
    if not isinstance(obj, Mapping):
        raise ReferenceImportError(f"expected a dict (state_dict or the reference's checkpoint dict), "
                                   f"got {type(obj).__name__}")
    order = {"auto": ("model_ema", "state_dict", "model"), "ema": ("model_ema",),
             "raw": ("state_dict", "model")}[prefer]
    for key in order:
        sub = obj.get(key)
        while isinstance(sub, Mapping) and not _is_state_dict(sub) and len(sub) == 1:
            sub = next(iter(sub.values()))  # e.g. {"state_dict": {...}} or {"module": {...}}
        if isinstance(sub, Mapping) and isinstance(sub.get("state_dict"), Mapping):
            sub = sub["state_dict"]
        if _is_state_dict(sub):
            return dict(sub), ("ema" if key == "model_ema" else "raw")
    raise ReferenceImportError(f"no weights found: the checkpoint has keys {sorted(map(str, obj))[:10]}; "
                               f"expected one of {list(order)} holding a state_dict")


def strip_prefix(state: dict[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    return {(k.removeprefix(prefix)): v for k, v in state.items()}


def _listing(keys: list[str]) -> str:
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def check_layout(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], source: str) -> None:
    """Raise one ReferenceImportError naming every missing, unexpected and mis-shaped key."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} mis-shaped: {_listing(shapes)}")
    raise ReferenceImportError(f"{source} does not match the reference supernet of this space config: "
                               + "; ".join(parts) + ". Use the space YAML the checkpoint was trained with.")


def import_reference(weights: str | Path, config: str | Path, out: str | Path, *,
                     prefer: Literal["auto", "ema", "raw"] = "auto") -> dict[str, Any]:
    """Convert a reference checkpoint into an evit supernet checkpoint at `out`; returns a summary."""
    from evit.nn.reference import ReferenceSupernet
    from evit.space.reference import load_reference_space
    from evit.train.checkpoint import save_checkpoint

    weights, out = Path(weights), Path(out)
    space: SearchSpace = load_reference_space(config)  # config errors before reading a large file
    check_input_file(weights, "reference weights", max_bytes=MAX_CHECKPOINT_BYTES, error=ReferenceImportError)
    check_output_file(out, "--out checkpoint", error=ReferenceImportError)
    raw = read_weights_file(weights)
    try:
        state, which = select_state_dict(raw, prefer)
    except ReferenceImportError as exc:
        raise ReferenceImportError(f"{weights}: {exc}") from None
    state = strip_prefix(state)
    net = ReferenceSupernet(space)
    expected = net.state_dict()
    check_layout(state, expected, str(weights))
    for k, v in expected.items():
        if k.endswith("relative_position_index") and not torch.equal(state[k].long(), v):
            raise ReferenceImportError(f"{weights}: {k} differs from the index of a {space.name} space; the "
                                       "resolutions of the space config do not match the checkpoint")
    net.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    payload = {
        "kind": "final",
        "space": space.to_dict(),
        "params_hash": None,
        "data_hash": None,
        "sampler_name": None,
        "step": 0,
        "model": net.state_dict(),
        "weights": which,
        "evaluation": {},
        "imported": {"source": str(weights), "source_sha256": sha256_file(weights), "config": str(config),
                     "weights": which, "format": "reference"},
    }
    save_checkpoint(out, payload)
    summary = {"checkpoint": str(out), "weights": which, "tensors": len(state), "space": space.name,
               "num_classes": space.num_classes, "resolutions": list(space.resolutions),
               "params_m": round(sum(v.numel() for v in net.parameters()) / 1e6, 3)}
    log.info("imported %s (%s weights, %d tensors) into %s", weights, which, len(state), out)
    return summary


def imported_checkpoint(path: Path) -> bool:
    """Whether `path` is a checkpoint written by `import_reference` (memory-mapped: cheap on a large file)."""
    if not path.is_file():
        return False
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable files are the loader's business, not this check's
        return False
    return isinstance(ckpt, dict) and "imported" in ckpt


def refuse_training_over_import(path: Path, resume: bool) -> None:
    """`evit train` would replace an imported supernet with one trained here: only on `--fresh`."""
    if resume and imported_checkpoint(path):
        raise ReferenceImportError(
            f"{path} is the reference supernet imported by `evit import-reference`; training would replace it. "
            "Run only the later stages (`evit pipeline -s lut -s search -s export`), or `evit train --fresh` "
            "to train a supernet over it")

