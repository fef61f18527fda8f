"""The exported folder (a "bundle"): which files it holds, written and read back in one place.

An exported subnet is a folder (`exports/<device>/<budget>/`) that stands on its own:
- `arch.json` + `model.safetensors`: the architecture and the static subnet's state_dict,
  enough to rebuild the module with the space recorded on the card (no pickles);
- `model.onnx`, and the mobile formats that `export.formats` asked for (`model.tflite`,
  `model.pte`), plus `model.int8.pte` when `export.quantize` has int8;
- `card.json` + `card.md`: the model card, with the sha256 of every model file.
The export stage writes it, the registry uploads it file by file and fetch downloads it,
the LiteRT converter (in its own environment) and `evit fetch --format torchscript`
rebuild the module from it: all through the names and loaders here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from evit.arch import Arch, ArchError
from evit.io import read_user_json, write_text_atomic
from evit.space import SearchSpace

ONNX = "model.onnx"
ARCH = "arch.json"
WEIGHTS = "model.safetensors"
CARD = "card.json"
CARD_MD = "card.md"
MOBILE_FILES = {"tflite": "model.tflite", "pte": "model.pte"}
"""Mobile formats (export.formats) -> their file, present when the export made them."""
INT8_FILES = {"pte": "model.int8.pte", "tflite": "model.int8.tflite"}
"""Mobile formats with an int8 file (export.quantize: [fp32, int8]) -> that file, beside the fp32 one."""
PRECISIONS = ("fp32", "int8")


def mobile_file(fmt: str, precision: str = "fp32") -> str | None:
    """The bundle's file of a mobile format at a precision; None when no such file exists."""
    return (INT8_FILES if precision == "int8" else MOBILE_FILES).get(fmt)
MODEL_FILES = (ONNX, ARCH, WEIGHTS)
"""The files a card vouches for in every bundle (the card itself is hashed by whoever stores it)."""
CORE_FILES = (*MODEL_FILES, CARD, CARD_MD)
"""The files every bundle has."""
WEIGHTS_FORMAT = "evit-static-subnet"


def files_in(folder: Path) -> tuple[str, ...]:
    """The files of the bundle in `folder`: the core ones plus the mobile formats present."""
    mobile = (*MOBILE_FILES.values(), *INT8_FILES.values())
    return CORE_FILES + tuple(f for f in mobile if (Path(folder) / f).is_file())


def mobile_files_in(folder: Path) -> tuple[str, ...]:
    """The mobile files (fp32 and int8) present in `folder`."""
    return files_in(folder)[len(CORE_FILES):]


def write_arch(folder: Path, arch: Arch) -> Path:
    path = Path(folder) / ARCH
    write_text_atomic(path, arch.to_json(indent=2) + "\n")
    return path


def static_state(module: Any) -> dict[str, Any]:
    """The module's tensors as plain, contiguous CPU copies (what `write_weights` stores)."""
    import torch

    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()
            if isinstance(v, torch.Tensor)}


def write_weights(folder: Path, state: dict[str, Any], arch: Arch, version: str) -> Path:
    """`model.safetensors` with the arch in its metadata.

    One metadata key: safetensors writes a multi-key metadata map in hash order, which
    would make the file bytes (and its sha256) differ from run to run.
    """
    from safetensors.torch import save_file

    path = Path(folder) / WEIGHTS
    meta = json.dumps({"arch": arch.to_dict(), "format": WEIGHTS_FORMAT, "evit_version": version}, sort_keys=True)
    save_file(state, str(path), metadata={"evit": meta})
    return path


def weights_digest(state: dict[str, Any]) -> str:
    """sha256 over the tensors themselves (name, dtype, shape, bytes; sorted by name).

    Identifies the weights independently of how a file serialises them.
    """
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_card(folder: Path) -> dict[str, Any]:
    """The model card of a bundle folder (one written here, or downloaded: read as a user's file)."""
    card: dict[str, Any] = read_user_json(Path(folder) / CARD, "model card", expect="a model card JSON object")
    return card


def load_static_files(arch_json: str | Path, weights: str | Path, space: dict[str, Any]) -> Any:
    """The static subnet rebuilt from an arch JSON file, its safetensors and the space as a dict
    (`SearchSpace.to_dict`), in eval mode."""
    from safetensors.torch import load_file

    from evit.nn.static import load_static

    arch = Arch.from_dict(read_user_json(arch_json, "arch file", error=ArchError))
    return load_static(arch, SearchSpace.from_dict(space), load_file(str(weights))).eval()


def load_static(folder: Path) -> Any:
    """The static subnet of the bundle in `folder` (arch.json + model.safetensors + the card's space)."""
    folder = Path(folder)
    return load_static_files(folder / ARCH, folder / WEIGHTS, read_card(folder)["space"])
