"""The `export@<device>` stage: each subnet the search chose -> deployable files + card.

Per feasible budget in `<search_dir>/result.json`, under `<export_dir>/<budget-label>/`:
- `model.onnx`: the static subnet (weights copied from the supernet), checked against
  the PyTorch module with onnxruntime before it is kept;
- `arch.json` + `model.safetensors`: the architecture and the static subnet's
  state_dict, enough to rebuild it with `evit.nn.static.load_static` (no pickles);
- `card.json` + `card.md`: the model card (evit.export.card), with the sha256 of the
  three model files.
A budget folder is built under a temporary name and swapped in whole, so an interrupted
export never leaves a half-written model. Then, when `export.register` is set, every
exported subnet is registered in MLflow (evit.registry).

Outputs: `<export_dir>/<label>/...`, `<export_dir>/index.json`, `metrics/export-<device>.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from evit import __version__, paths
from evit.arch import Arch
from evit.config import Params
from evit.errors import UserError
from evit.export.card import CARD_VERSION, file_hashes, git_commit, host_description, render_markdown
from evit.io import atomic_dir, read_json, sha256_file, write_json_atomic, write_text_atomic
from evit.search.stage import RESULT_FILE

log = logging.getLogger(__name__)

ONNX_TOLERANCE = 1e-3


class ExportError(UserError):
    """The search result to export is missing, or an exported file fails its check."""


def _input_info(params: Params) -> dict[str, Any]:
    """How inputs must be prepared (the data manifest's normalisation when it records one)."""
    info: dict[str, Any] = {"dtype": "float32", "layout": "NCHW", "normalization": "see the data manifest"}
    manifest = paths.manifest_path(params)
    if manifest.is_file():
        m = read_json(manifest)
        for key in ("mean", "std"):
            if key in m:
                info[key] = m[key]
        if "mean" in m and "std" in m:
            info["normalization"] = f"RGB in [0, 1], minus mean {m['mean']}, divided by std {m['std']}"
    return info


def check_onnx(onnx_path: Path, module: Any, resolution: int, seed: int = 0) -> float:
    """Max abs difference between onnxruntime and PyTorch on a random input (raises past tolerance)."""
    import onnxruntime as ort
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, resolution, resolution, generator=g)
    with torch.no_grad():
        ref = module(x).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    diff = float(np.max(np.abs(got - ref)))
    scale = max(1.0, float(np.max(np.abs(ref))))
    if diff > ONNX_TOLERANCE * scale:
        raise ExportError(f"{onnx_path}: onnxruntime output differs from PyTorch by {diff:.3g} "
                          f"(tolerance {ONNX_TOLERANCE * scale:.3g}); not exporting a wrong model")
    return diff


def export_subnet(
    static: Any,
    arch: Arch,
    folder: Path,
    *,
    card: dict[str, Any],
    opset: int,
) -> dict[str, Any]:
    """Write model.onnx, arch.json, model.safetensors, card.json, card.md into `folder` (atomic).

    `card` is completed with the file hashes and the ONNX check; the final card is returned.
    """
    import torch
    from safetensors.torch import save_file

    from evit.nn.export import export_onnx

    static = static.to("cpu").eval()
    with atomic_dir(folder) as tmp:
        export_onnx(static, arch.resolution, tmp / "model.onnx", opset=opset, batch_size=1)
        diff = check_onnx(tmp / "model.onnx", static, arch.resolution)
        write_text_atomic(tmp / "arch.json", arch.to_json(indent=2) + "\n")
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in static.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        save_file(state, str(tmp / "model.safetensors"),
                  metadata={"arch": arch.to_json(), "format": "evit-static-subnet", "evit_version": __version__})
        full = {**card, "files": file_hashes(tmp), "onnx": {**card.get("onnx", {}), "max_abs_diff_vs_torch": diff}}
        write_json_atomic(tmp / "card.json", full)
        write_text_atomic(tmp / "card.md", render_markdown(full))
    return full


def build_card(
    *,
    name: str,
    arch: Arch,
    space_dict: dict[str, Any],
    budget: dict[str, Any],
    entry: dict[str, Any],
    device: dict[str, Any],
    provenance: dict[str, Any],
    input_info: dict[str, Any],
    opset: int,
) -> dict[str, Any]:
    """The card of one chosen subnet (files/ONNX check are added by `export_subnet`)."""
    return {
        "card_version": CARD_VERSION,
        "name": name,
        "arch": arch.to_dict(),
        "arch_key": arch.key,
        "space": space_dict,
        "num_classes": space_dict["num_classes"],
        "budget": {**budget, "text": _budget_text(budget)},
        "metrics": {"val_top1": entry["val_top1"], "search_top1": entry["search_top1"],
                    "flops_m": entry["flops_m"], "params_m": entry["params_m"]},
        "latency": {"predicted_ms": entry["predicted_latency_ms"], "measured_ms": entry["measured_latency_ms"],
                    "measurement": entry.get("measurement", {})},
        "device": device,
        "input": {"shape": [1, 3, arch.resolution, arch.resolution], **input_info},
        "provenance": provenance,
        "onnx": {"opset": opset},
    }


def _budget_text(budget: dict[str, Any]) -> str:
    value = budget["value"]
    return f"{value:g} ms" if budget["kind"] == "latency" else f"{value:g} MFLOPs"


def export_device(params: Params, device: str, *, register: bool | None = None) -> dict[str, Any]:
    """Stage entry point (evit.stages.export). `register` overrides `export.register`."""
    from evit.nn.static import extract
    from evit.train.checkpoint import load_supernet

    dev = params.device(device)
    result_path = paths.search_dir(params, device) / RESULT_FILE
    if not result_path.is_file():
        raise ExportError(f"search result {str(result_path)!r} not found; run `evit search -d {device}` first")
    result = read_json(result_path)
    ckpt = paths.checkpoint_path(params)
    if not ckpt.is_file():
        raise ExportError(f"supernet checkpoint {str(ckpt)!r} not found; run `evit train` first")
    ckpt_sha = sha256_file(ckpt)
    if result.get("sources", {}).get("checkpoint_sha256") not in (None, ckpt_sha):
        raise ExportError(f"{result_path} was searched on another supernet checkpoint than {ckpt} "
                          f"(sha256 {ckpt_sha[:12]}...); re-run `evit search -d {device}`")
    supernet, _meta = load_supernet(ckpt)
    supernet = supernet.to("cpu").eval()
    name = params.export.model_name.format(device=device)
    provenance = {
        "data_version": result.get("sources", {}).get("data_version", "unknown"),
        "supernet_sha256": ckpt_sha,
        "lut_sha256": result.get("sources", {}).get("lut_sha256", "unknown"),
        "git_commit": git_commit(),
        "evit_version": __version__,
    }
    device_info = {"name": device, "params": dev.model_dump(mode="json"), "host": host_description()}
    input_info = _input_info(params)
    out_root = paths.export_dir(params, device)
    exported: list[dict[str, Any]] = []
    for entry in result["budgets"]:
        if not entry.get("feasible"):
            log.warning("skipping budget %s of %s: %s", entry["label"], device, entry.get("reason"))
            continue
        arch = supernet.space.validate(Arch.from_dict(entry["arch"]))
        static = extract(supernet, arch)
        card = build_card(name=name, arch=arch, space_dict=supernet.space.to_dict(), budget=entry["budget"],
                          entry=entry, device=device_info, provenance=provenance, input_info=input_info,
                          opset=params.export.onnx_opset)
        folder = out_root / entry["label"]
        full = export_subnet(static, arch, folder, card=card, opset=params.export.onnx_opset)
        log.info("exported %s %s -> %s (val top-1 %.4f, %.3f ms measured)", device, entry["label"], folder,
                 entry["val_top1"], entry["measured_latency_ms"])
        exported.append({"label": entry["label"], "folder": str(folder), "card": full})

    index = {"device": device, "model_name": name,
             "subnets": [{"label": e["label"], "folder": e["folder"], "arch_key": e["card"]["arch_key"],
                          "files": e["card"]["files"]} for e in exported]}
    write_json_atomic(out_root / "index.json", index)

    registered: list[dict[str, Any]] = []
    if params.export.register if register is None else register:
        from evit.registry import register_export

        for e in exported:
            registered.append(register_export(params, Path(e["folder"])))
    metrics = {
        "exported": len(exported),
        "budgets": {e["label"]: {"val_top1": e["card"]["metrics"]["val_top1"],
                                 "measured_latency_ms": e["card"]["latency"]["measured_ms"],
                                 "predicted_latency_ms": e["card"]["latency"]["predicted_ms"],
                                 "onnx_max_abs_diff": e["card"]["onnx"]["max_abs_diff_vs_torch"],
                                 "onnx_bytes": (Path(e["folder"]) / "model.onnx").stat().st_size}
                    for e in exported},
        "registered": {r["label"]: {"version": r["version"], "created": r["created"], "aliases": r["aliases"]}
                       for r in registered},
    }
    write_json_atomic(paths.export_metrics_path(device), metrics)
    return {"device": device, "model_name": name, "exported": [e["folder"] for e in exported],
            "registered": registered, "metrics": json.loads(json.dumps(metrics))}
