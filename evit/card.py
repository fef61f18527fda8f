"""Model cards: what an exported subnet is, how good and fast it is, and where it came from.

`card.json` is the machine-readable card (the registry turns it into tags and `fetch`
verifies downloads against its `files` hashes); `card.md` renders the same content for
people. A card lists the sha256 of every model file next to it, so a copied or
downloaded folder can be checked on its own.

The card also carries the search space (`space`), so the static subnet can be rebuilt
from `arch.json` + `model.safetensors` without this project's params.yaml
(`SearchSpace.from_dict`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evit.formats.bundle import MODEL_FILES
from evit.io import sha256_file

CARD_VERSION = 2
"""2: the card carries `classes` (logit index -> class name) and the full input spec."""


def input_spec(resolution: int) -> dict[str, Any]:
    """How an input must be prepared for this subnet: what `evit.data.loader`'s eval transform
    does. One place, so every export format's card states the same preprocessing."""
    from evit.data.loader import MEAN, STD

    return {"resolution": int(resolution), "shape": [1, 3, int(resolution), int(resolution)],
            "dtype": "float32", "layout": "NCHW", "color": "RGB", "resize": "bilinear", "scale": [0.0, 1.0],
            "mean": list(MEAN), "std": list(STD),
            "normalization": f"RGB resized (bilinear) to {resolution} x {resolution}, scaled to [0, 1], minus mean "
                             f"{[round(m, 4) for m in MEAN]}, divided by std {[round(x, 4) for x in STD]}"}


def data_facts(classes: list[str], resolution: int) -> dict[str, Any]:
    """The card fields a user needs to feed the model and read its output: the class names
    in logit order (from the prepared data's manifest) and the input spec."""
    return {"classes": [str(c) for c in classes], "num_classes": len(classes), "input": input_spec(resolution)}


def classes_text(classes: list[str], limit: int = 12) -> str:
    """A short rendering of the class list (all of them up to `limit`)."""
    shown = ", ".join(classes[:limit])
    return f"{len(classes)}: {shown}" + (f", ... (+{len(classes) - limit})" if len(classes) > limit else "")


def file_hashes(folder: Path, names: tuple[str, ...] = MODEL_FILES) -> dict[str, str]:
    return {name: sha256_file(folder / name) for name in names}


def render_markdown(card: dict[str, Any]) -> str:
    """card.md: the same facts as card.json, for people."""
    m, lat, prov = card["metrics"], card["latency"], card["provenance"]
    arch = card["arch"]
    lines = [
        f"# {card['name']}",
        "",
        f"ElasticViT subnet for device **{card['device']['name']}**, budget **{card['budget']['text']}** "
        f"(`{card['budget']['label']}`), extracted from the trained supernet with its weights (no retraining).",
        "",
        "| | |",
        "|---|---|",
        f"| val top-1 | {m['val_top1']:.4f} |",
        f"| search top-1 (held-out train split) | {m['search_top1']:.4f} |",
        f"| predicted latency (LUT) | {lat['predicted_ms']:.4f} ms |",
        f"| measured latency | {lat['measured_ms']:.4f} ms |",
        f"| FLOPs (MACs) | {m['flops_m']:.3f} M |",
        f"| params | {m['params_m']:.4f} M |",
        f"| input | 1 x 3 x {arch['resolution']} x {arch['resolution']} float32, "
        f"{card['input']['normalization']} |",
        f"| classes | {card['num_classes']} |",
        "",
        *_classes_section(card),
        *_int8_section(card),
        "## Architecture",
        "",
        f"`{card['arch_key']}`",
        "",
        "```json",
        _json(arch),
        "```",
        "",
        "## Provenance",
        "",
        f"- data version (manifest content_hash): `{prov['data_version']}`",
        f"- supernet checkpoint sha256: `{prov['supernet_sha256']}`",
        f"- git commit: `{prov['git_commit']}`",
        f"- evit version: `{prov['evit_version']}`",
        f"- device: `{_json(card['device']['params'], indent=None)}`",
        f"- measured on: {card['device']['host'].get('cpu') or card['device']['host'].get('processor', 'unknown')} "
        f"({card['device']['host'].get('platform', '')})",
        "",
        "## Files (sha256)",
        "",
        f"- weights (tensors, independent of the file format): `{card.get('weights_sha256', 'n/a')}`",
        *[f"- `{name}`: `{h}`" for name, h in sorted(card["files"].items())],
        "",
    ]
    return "\n".join(lines)


_INT8_RUNTIMES = {"pte": ("model.int8.pte", "ExecuTorch", ".pte"), "tflite": ("model.int8.tflite", "LiteRT", ".tflite")}


def _int8_section(card: dict[str, Any]) -> list[str]:
    """Each int8 file: its accuracy through the runtime beside the fp32 file's, the flag, what stayed float."""
    lines: list[str] = []
    for fmt, (name, runtime, ext) in _INT8_RUNTIMES.items():
        q = card.get(f"{fmt}_int8")
        if not q:
            continue
        quant = q.get("quantization", {})
        flag = (f"**FLAGGED: int8 loses {q['drop_points']:.2f} points (more than the {q['max_drop_points']:g} "
                f"allowed by export.int8_max_drop_points)**" if q["flagged"] else
                f"drop {q['drop_points']:.2f} points (within the {q['max_drop_points']:g} allowed)")
        floats = "; ".join(f"block {b or '-'}: " + ", ".join(f"{op} x{n}" for op, n in sorted(ops.items()))
                           for b, ops in quant.get("float_ops_by_block", {}).items())
        outside = q.get("outside_ops")
        lines += [f"## int8 ({name})", "",
                  f"- val top-1 through {runtime}: int8 {q['val_top1_runtime']:.4f}, fp32 {ext} "
                  f"{q['fp32_val_top1_runtime']:.4f}; {flag}",
                  f"- calibration: {q['calibration']['images']} images of the {q['calibration']['split']} split",
                  f"- policy: {quant.get('policy', 'n/a')}",
                  f"- ops left float: {floats or 'none'}",
                  *([f"- delegate: {q['partitions']} XNNPACK partition(s), ops outside: "
                     + (", ".join(f"{op} x{n}" for op, n in sorted(outside.items())) or "none")]
                    if outside is not None else []),
                  ""]
    if lines:
        lines[-1:-1] = _ranking_line(card.get("int8_ranking"))
    return lines


def _ranking_line(ranking: dict[str, Any] | None) -> list[str]:
    if not ranking:
        return []
    rho = "undefined" if ranking["spearman"] is None else f"{ranking['spearman']:+.2f}"
    return [f"- float vs int8 ranking of the budget's top {ranking['candidates']} search candidates (val top-1, "
            f"int8 through ExecuTorch): Spearman {rho}, same best: {ranking['same_best']}"]


def _classes_section(card: dict[str, Any]) -> list[str]:
    classes = card.get("classes")
    if not classes:
        return []
    return ["## Classes (logit index: name)", "", *[f"{i}. {c}" for i, c in enumerate(classes)], ""]


def _json(obj: Any, indent: int | None = 2) -> str:
    import json

    return json.dumps(obj, indent=indent, sort_keys=True)
