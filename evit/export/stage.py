"""The `export@<device>` stage: each subnet the search chose -> deployable files + card.

Per feasible budget in `<search_dir>/result.json`, under `<export_dir>/<budget-label>/`:
- `model.onnx`: the static subnet (weights copied from the supernet), checked against
  the PyTorch module with onnxruntime before it is kept;
- `model.tflite` (LiteRT, fp32; converted in the converter venv from arch.json +
  model.safetensors) and `model.pte` (ExecuTorch, XNNPACK), as `export.formats` asks,
  each checked against PyTorch on a seeded input (max abs diff on the card; the export
  fails above the tolerance; the .pte's delegate partitions are on the card too);
- `model.int8.pte` / `model.int8.tflite` when `export.quantize` has int8 (evit.export.int8),
  beside each fp32 mobile file: the val top-1 of the int8 and the fp32 file through its
  runtime (ExecuTorch; the LiteRT interpreter), and the drop, on the card;
- `arch.json` + `model.safetensors`: the architecture and the static subnet's
  state_dict, enough to rebuild it with `evit.nn.static.load_static` (no pickles);
- `card.json` + `card.md`: the model card (evit.card), with the sha256 of the
  three model files.
The folder's layout (file names, how the weights are written and read back) is
`evit.formats.bundle`; the checks against PyTorch are `evit.export.checks`.
A budget folder is built under a temporary name and swapped in whole, so an interrupted
export never leaves a half-written model. Then, when `export.register_model` is set, every
exported subnet is registered in MLflow (evit.registry).

Outputs: `<export_dir>/<label>/...`, `<export_dir>/index.json`, `metrics/export-<device>.json`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from evit import __version__, cancel, paths
from evit.arch import Arch
from evit.card import CARD_VERSION, data_facts, file_hashes, render_markdown
from evit.config import Params
from evit.export.checks import ExportError, check_onnx, check_pte, check_tflite
from evit.export.int8 import (
    Int8Inputs,
    calibration_images,
    export_int8_pte,
    export_int8_tflite,
    final_candidates,
    runtime_top1,
    score_candidates,
)
from evit.formats import bundle
from evit.formats.onnx import export_onnx
from evit.formats.pte import export_pte
from evit.formats.tflite import LiteRTConverter
from evit.host import describe_host, git_commit
from evit.io import atomic_dir, read_json, sha256_file, write_json_atomic, write_text_atomic
from evit.search.stage import POPULATION_FILE, RESULT_FILE

log = logging.getLogger(__name__)

VAL_DRIFT_LIMIT = 0.01
"""Largest val top-1 difference between search and export tolerated (GPU vs CPU rounding)."""


def export_subnet(
    static: Any,
    arch: Arch,
    folder: Path,
    *,
    card: dict[str, Any],
    opset: int,
    formats: Sequence[str] = ("onnx",),
    converter: Any = None,
    int8: Int8Inputs | None = None,
) -> dict[str, Any]:
    """Write model.onnx, arch.json, model.safetensors, card.json, card.md into `folder` (atomic).

    Plus model.tflite / model.pte when `formats` names them (`converter`: a running
    `evit.formats.tflite.LiteRTConverter` to reuse; else one is started for this call), and
    model.int8.pte / model.int8.tflite when `int8` is given (beside each fp32 mobile file).
    `card` is completed with the file hashes and the format checks; the final card is returned.
    """
    static = static.to("cpu").eval()
    with atomic_dir(folder) as tmp, contextlib.ExitStack() as stack:
        if converter is None and "tflite" in formats:
            converter = stack.enter_context(LiteRTConverter())
        export_onnx(static, arch.resolution, tmp / bundle.ONNX, opset=opset, batch_size=1)
        diff = check_onnx(tmp / bundle.ONNX, static, arch.resolution)
        bundle.write_arch(tmp, arch)
        state = bundle.static_state(static)
        bundle.write_weights(tmp, state, arch, __version__)
        mobile = _export_mobile(static, arch, tmp, card["space"], formats, converter)
        if int8 is not None:
            if "pte" not in mobile and "tflite" not in mobile:
                raise ExportError("an int8 export needs its fp32 file beside it: add pte and/or tflite to "
                                  "export.formats")
            where = f"{card['name']} {card['budget']['label']}"
            if "pte" in mobile:
                fp32_fields, mobile["pte_int8"] = export_int8_pte(static, arch.resolution, tmp, int8, where)
                mobile["pte"].update(fp32_fields)
            if "tflite" in mobile:
                fp32_fields, mobile["tflite_int8"] = export_int8_tflite(converter, card["space"], arch.resolution,
                                                                        tmp, int8, where)
                mobile["tflite"].update(fp32_fields)
        names = bundle.MODEL_FILES + bundle.mobile_files_in(tmp)
        full = {**card, "files": file_hashes(tmp, names), "weights_sha256": bundle.weights_digest(state),
                "onnx": {**card.get("onnx", {}), "max_abs_diff_vs_torch": diff}, **mobile}
        write_json_atomic(tmp / bundle.CARD, full)
        write_text_atomic(tmp / bundle.CARD_MD, render_markdown(full))
    return full


def _export_mobile(static: Any, arch: Arch, folder: Path, space: dict[str, Any], formats: Sequence[str],
                   converter: Any) -> dict[str, dict[str, Any]]:
    """model.tflite / model.pte in `folder` (already holding arch.json + model.safetensors); card sections.
    `converter`: a running LiteRTConverter when `formats` has tflite."""
    out: dict[str, dict[str, Any]] = {}
    if "tflite" in formats:
        t0 = time.monotonic()
        converter.convert_subnet(folder / bundle.ARCH, folder / bundle.WEIGHTS, space,
                                 folder / bundle.MOBILE_FILES["tflite"])
        seconds = time.monotonic() - t0
        out["tflite"] = {"runtime": "LiteRT (ai-edge-litert), fp32, XNNPACK delegate",
                         "max_abs_diff_vs_torch": check_tflite(folder / bundle.MOBILE_FILES["tflite"], static,
                                                                              arch.resolution),
                         "convert_seconds": round(seconds, 1)}
    if "pte" in formats:
        t0 = time.monotonic()
        report = export_pte(static, torch.zeros(1, 3, arch.resolution, arch.resolution), folder / bundle.MOBILE_FILES["pte"])
        out["pte"] = {"runtime": "ExecuTorch, fp32, XNNPACK delegate", **report.to_dict(),
                      "max_abs_diff_vs_torch": check_pte(folder / bundle.MOBILE_FILES["pte"], static, arch.resolution),
                      "lower_seconds": round(time.monotonic() - t0, 1)}
    return out


def build_card(
    *,
    name: str,
    arch: Arch,
    space_dict: dict[str, Any],
    budget: dict[str, Any],
    entry: dict[str, Any],
    device: dict[str, Any],
    provenance: dict[str, Any],
    classes: list[str],
    opset: int,
) -> dict[str, Any]:
    """The card of one chosen subnet (files/ONNX check are added by `export_subnet`).

    `classes` are the class names in logit order (the prepared data's manifest)."""
    facts = data_facts(classes, arch.resolution)
    if facts["num_classes"] != space_dict["num_classes"]:
        raise ExportError(f"the data has {facts['num_classes']} classes but the supernet's head has "
                          f"{space_dict['num_classes']}; re-run `evit train` on this data")
    return {
        "card_version": CARD_VERSION,
        "name": name,
        "arch": arch.to_dict(),
        "arch_key": arch.key,
        "space": space_dict,
        "num_classes": space_dict["num_classes"],
        "classes": facts["classes"],
        "budget": {**budget, "text": _budget_text(budget)},
        "metrics": {"val_top1": entry["val_top1"], "search_top1": entry["search_top1"],
                    "flops_m": entry["flops_m"], "params_m": entry["params_m"]},
        "latency": {"predicted_ms": entry["predicted_latency_ms"], "measured_ms": entry["measured_latency_ms"],
                    "measurement": entry.get("measurement", {})},
        "device": device,
        "input": facts["input"],
        "provenance": provenance,
        "onnx": {"opset": opset},
    }


def _budget_text(budget: dict[str, Any]) -> str:
    value = budget["value"]
    if budget["kind"] == "arch":
        return f"arch {budget.get('name') or budget['label']}"
    return f"{value:g} ms" if budget["kind"] == "latency" else f"{value:g} MFLOPs"


def export_result(
    params: Params,
    device: str,
    result: dict[str, Any],
    supernet: Any,
    data: Any,
    *,
    supernet_sha256: str,
    out_root: Path,
    merge_index: bool = False,
) -> list[dict[str, Any]]:
    """Export every feasible budget of a search `result` (the parsed result.json).

    `merge_index` keeps the entries of `index.json` that this result does not replace (used by
    `evit export --arch`, which adds models beside the searched ones).

    The exported weights are the BN-calibrated static subnet (evit.search.fitness), checked
    to reproduce the search's val top-1 before anything is written.
    """
    name = params.export.model_name.format(device=device)
    sources = result.get("sources", {})
    provenance = {
        "data_version": sources.get("data_version", "unknown"),
        "supernet_sha256": supernet_sha256,
        "lut_sha256": sources.get("lut_sha256", "unknown"),
        "git_commit": git_commit(),
        "evit_version": __version__,
    }
    device_info = {"name": device, "params": result.get("device_params", params.device(device).model_dump(mode="json")),
                   "host": result.get("device_description") or describe_host()}
    exported: list[dict[str, Any]] = []
    formats = params.export.formats
    with contextlib.ExitStack() as stack:
        converter = None
        if "tflite" in formats:
            # one converter process for every budget, started first: a converter venv that cannot
            # be created stops the export before any subnet is calibrated
            converter = stack.enter_context(LiteRTConverter()).start()
        for entry in result["budgets"]:
            cancel.check(f"export@{device}: nothing registered")
            exported.extend(_export_entry(params, device, entry, supernet, data, name, device_info, provenance,
                                          out_root, formats, converter))
    entries = [{"label": e["label"], "folder": e["folder"], "arch_key": e["card"]["arch_key"],
                "files": e["card"]["files"]} for e in exported]
    index_path = out_root / "index.json"
    if merge_index and index_path.is_file():
        new = {e["label"] for e in entries}
        entries = [e for e in read_json(index_path).get("subnets", []) if e.get("label") not in new] + entries
    index = {"device": device, "model_name": name, "subnets": entries}
    write_json_atomic(out_root / "index.json", index)
    return exported


def _export_entry(params: Params, device: str, entry: dict[str, Any], supernet: Any, data: Any, name: str,
                  device_info: dict[str, Any], provenance: dict[str, Any], out_root: Path, formats: Sequence[str],
                  converter: Any) -> list[dict[str, Any]]:
    """Export one budget's subnet (none when the budget was infeasible)."""
    from evit.evaluate import calibrated_static, split_top1

    sp = params.search
    if not entry.get("feasible"):
        log.warning("skipping budget %s of %s: %s", entry["label"], device, entry.get("reason"))
        return []
    arch = supernet.space.validate_computable(Arch.from_dict(entry["arch"]))
    static = calibrated_static(supernet, arch, data, bn_batches=sp.bn_calib_batches,
                               batch_size=sp.eval_batch_size, seed=sp.seed)
    val = split_top1(static, data, "val", arch.resolution, sp.eval_batch_size)
    drift = abs(val - float(entry["val_top1"]))
    if drift > VAL_DRIFT_LIMIT:
        raise ExportError(
            f"the exported {device} {entry['label']} subnet scores {val:.4f} on val, but the search recorded "
            f"{entry['val_top1']:.4f}; the checkpoint, data or search settings changed since "
            f"`evit search -d {device}`: re-run it")
    if drift > 0:
        log.warning("%s %s: val top-1 %.4f at export vs %.4f at search (another compute device?); the card "
                    "records the exported model's %.4f", device, entry["label"], val, entry["val_top1"], val)
    entry = {**entry, "val_top1": val}
    card = build_card(name=name, arch=arch, space_dict=supernet.space.to_dict(), budget=entry["budget"],
                      entry=entry, device=device_info, provenance=provenance, classes=list(data.classes),
                      opset=params.export.onnx_opset)
    if params.export.int8_rank_candidates:
        card["int8_ranking"] = _int8_ranking(params, device, entry, supernet, data)
    folder = out_root / entry["label"]
    full = export_subnet(static, arch, folder, card=card, opset=params.export.onnx_opset, formats=formats,
                         converter=converter, int8=_int8_inputs(params, static, arch, data))
    log.info("exported %s %s -> %s (val top-1 %.4f, %.3f ms measured)", device, entry["label"], folder,
             val, entry["measured_latency_ms"])
    return [{"label": entry["label"], "folder": str(folder), "card": full}]


def _int8_ranking(params: Params, device: str, entry: dict[str, Any], supernet: Any, data: Any) -> dict[str, Any]:
    """Float vs int8 (through the runtime) val top-1 of the budget's best search candidates, and
    how their rankings agree (`export.int8_rank_candidates`)."""
    import tempfile

    from evit.evaluate import calibrated_static, split_top1

    sp, ep = params.search, params.export
    population = read_json(paths.search_dir(params, device) / POPULATION_FILE)["subnets"]
    candidates = final_candidates(population, entry["budget"], ep.int8_rank_candidates)
    with tempfile.TemporaryDirectory(prefix="evit-int8-rank-") as tmp:
        out = score_candidates(
            candidates,
            static_of=lambda row: calibrated_static(supernet, Arch.from_dict(row["arch"]), data,
                                                    bn_batches=sp.bn_calib_batches, batch_size=sp.eval_batch_size,
                                                    seed=sp.seed).to("cpu").eval(),
            float_top1=lambda static, r: split_top1(static, data, "val", r, sp.eval_batch_size),
            calibration_of=lambda r: calibration_images(data, r, ep.int8_calibration_images, sp.seed),
            top1_of=lambda static, r: runtime_top1(static, data, r, sp.eval_batch_size),
            workdir=Path(tmp))
    log.info("%s %s: float vs int8 ranking of %d candidates: Spearman %s, same best: %s", device, entry["label"],
             out["candidates"], out["spearman"], out["same_best"])
    return out


def _int8_inputs(params: Params, static: Any, arch: Arch, data: Any) -> Int8Inputs | None:
    """What the int8 export of one subnet needs (None unless `export.quantize` has int8)."""
    ep, sp = params.export, params.search
    if "int8" not in ep.quantize:
        return None
    return Int8Inputs(calibration=calibration_images(data, arch.resolution, ep.int8_calibration_images, sp.seed),
                      top1=runtime_top1(static, data, arch.resolution, sp.eval_batch_size),
                      max_drop_points=ep.int8_max_drop_points)


def export_device(params: Params, device: str, *, register: bool | None = None,
                  archs: list[str] | None = None) -> dict[str, Any]:
    """Stage entry point (evit.stages.export). `register` overrides `export.register_model`.

    `archs` (released names or arch JSON files; `evit export --arch`): export and register
    those architectures instead of the search result, evaluated the same way (search and val
    top-1, predicted and measured latency), beside the models already exported.
    """
    if archs:
        return _export_fixed(params, device, archs, register)
    from evit.data.loader import PreparedData
    from evit.resolve import space_for
    from evit.train.checkpoint import load_supernet

    params.device(device)
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
    supernet, _meta = load_supernet(ckpt, space=space_for(params))
    data = PreparedData(paths.prepared_dir(params))
    out_root = paths.export_dir(params, device)
    exported = export_result(params, device, result, supernet.eval(), data, supernet_sha256=ckpt_sha,
                             out_root=out_root)
    return _register_and_report(params, device, exported, register)


def _export_fixed(params: Params, device: str, archs: list[str], register: bool | None) -> dict[str, Any]:
    """`evit export --arch`: evaluate the named archs like search winners, export them beside the others."""
    from evit.released import resolve_arch
    from evit.search.stage import load_inputs, run_device_search

    params.device(device)
    for spec in archs:  # fail on a bad name before loading anything
        resolve_arch(spec)
    inputs = load_inputs(params, device)
    for spec in archs:
        inputs.space.validate_computable(resolve_arch(spec)[1])
    result = run_device_search(params, inputs, paths.search_dir(params, device), fixed_archs=archs, search=False)
    exported = export_result(params, device, result, inputs.supernet.eval(), inputs.data,
                             supernet_sha256=inputs.sources["checkpoint_sha256"],
                             out_root=paths.export_dir(params, device), merge_index=True)
    return _register_and_report(params, device, exported, register, merge_metrics=True)


def _register_and_report(params: Params, device: str, exported: list[dict[str, Any]],
                         register: bool | None, merge_metrics: bool = False) -> dict[str, Any]:
    registered: list[dict[str, Any]] = []
    if params.export.register_model if register is None else register:
        from evit.registry import register_export

        for e in exported:
            registered.append(register_export(params, Path(e["folder"])))
    metrics = export_metrics(exported, registered)
    metrics_path = paths.export_metrics_path(device)
    if merge_metrics and metrics_path.is_file():  # keep the searched models' entries
        old = read_json(metrics_path)
        merged = {k: {**old.get(k, {}), **metrics[k]} for k in ("budgets", "registered")}
        metrics = {**merged, "exported": len(merged["budgets"])}
    write_json_atomic(metrics_path, metrics)
    return {"device": device, "model_name": params.export.model_name.format(device=device),
            "exported": [e["folder"] for e in exported], "registered": registered, "metrics": metrics}


def _int8_metrics(card: dict[str, Any]) -> dict[str, Any]:
    """The runtime val top-1 of the fp32 and int8 file and the drop (points) per mobile format
    with an int8 file (`pte_*`, `tflite_*`), and the rank agreement."""
    out: dict[str, Any] = {}
    for fmt in bundle.INT8_FILES:
        q = card.get(f"{fmt}_int8")
        if q is not None:
            out |= {f"{fmt}_fp32_val_top1": q["fp32_val_top1_runtime"], f"{fmt}_int8_val_top1": q["val_top1_runtime"],
                    f"{fmt}_int8_drop_points": q["drop_points"]}
    ranking = card.get("int8_ranking") or {}
    if out and ranking.get("spearman") is not None:
        out["int8_rank_spearman"] = ranking["spearman"]
    return out


def export_metrics(exported: list[dict[str, Any]], registered: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics/export-<device>.json: the export checks and the registered version per budget
    (accuracy and latency are the search's, in metrics/search-<device>.json; the rest is on
    the card). Few keys: `dvc metrics show` makes a column of every key."""
    return {
        "exported": len(exported),
        "budgets": {e["label"]: {"onnx_max_abs_diff": e["card"]["onnx"]["max_abs_diff_vs_torch"],
                                 "onnx_bytes": (Path(e["folder"]) / "model.onnx").stat().st_size,
                                 **{f"{fmt}_max_abs_diff": e["card"][fmt]["max_abs_diff_vs_torch"]
                                    for fmt in ("tflite", "pte") if fmt in e["card"]},
                                 **_int8_metrics(e["card"])}
                    for e in exported},
        "registered": {r["label"]: {"version": r["version"]} for r in registered},
    }
