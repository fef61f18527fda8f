"""What a pipeline run ends with: the chosen subnet per device and budget, and how to fetch it.

`subnet_rows` / `subnets_table` are the table `evit pipeline` prints; `subnets_markdown`
is the same as the Prefect artifact `evit-subnets` and `subnets.md` on the MLflow
pipeline run. They read what the search and export stages wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evit import paths
from evit.config import Params
from evit.io import read_json


def subnets_markdown(params: Params, devices: Sequence[str]) -> str:
    """The discovered subnets per device and budget, as a markdown table."""
    lines = ["# evit: subnets per device and budget", "",
             "| device | budget | arch | FLOPs (M) | params (M) | predicted ms | measured ms | search top-1 "
             "| val top-1 | registered |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for device in devices:
        result_path = paths.search_dir(params, device) / "result.json"
        if not result_path.is_file():
            lines.append(f"| {device} | - | (no search result) | | | | | | | |")
            continue
        result = read_json(result_path)
        registered: dict[str, Any] = {}
        export_metrics = paths.export_metrics_path(device)
        if export_metrics.is_file():
            registered = read_json(export_metrics).get("registered", {})
        model = params.export.model_name.format(device=device)
        for b in result.get("budgets", []):
            label = b.get("label", "?")
            if not b.get("feasible"):
                lines.append(f"| {device} | {label} | infeasible: {b.get('reason', '')} | | | | | | | |")
                continue
            reg = registered.get(label)
            reg_text = f"{model} v{reg['version']}" if reg else "-"
            lines.append(
                f"| {device} | {label} | `{b.get('key', '')}` | {b.get('flops_m', 0):.2f} | {b.get('params_m', 0):.3f} "
                f"| {b.get('predicted_latency_ms', 0):.3f} "
                f"| {measured_cell(b.get('measured_latency_ms'), b.get('predicted_latency_ms'))} "
                f"| {b.get('search_top1', 0):.4f} | {b.get('val_top1', 0):.4f} | {reg_text} |")
    return "\n".join(lines) + "\n"


def subnet_rows(params: Params, devices: Sequence[str],
                restored: dict[str, list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """The chosen subnet per device and budget, for the end-of-run table: top-1, predicted and
    measured latency, and the registry reference to fetch it with (`restored`: versions just
    registered again on this registry, which win over the numbers the export recorded)."""
    rows: list[dict[str, Any]] = []
    for device in devices:
        result_path = paths.search_dir(params, device) / "result.json"
        if not result_path.is_file():
            continue
        export_metrics = paths.export_metrics_path(device)
        exported = read_json(export_metrics) if export_metrics.is_file() else {}
        registered = dict(exported.get("registered", {}))
        registered.update({r["label"]: r for r in (restored or {}).get(device, [])})
        model = params.export.model_name.format(device=device)
        for b in read_json(result_path).get("budgets", []):
            label = b.get("label", "?")
            if not b.get("feasible"):
                rows.append({"device": device, "budget": label, "feasible": False})
                continue
            reg = registered.get(label)
            rows.append({"device": device, "budget": label, "feasible": True, "val_top1": b.get("val_top1"),
                         "predicted_ms": b.get("predicted_latency_ms"), "measured_ms": b.get("measured_latency_ms"),
                         "fetch": f"{model}/{reg['version']}" if reg else None,
                         "aliases": sorted(reg.get("aliases", [])) if reg else [],
                         "int8": _int8_cell(exported.get("budgets", {}).get(label, {}))})
    return rows


def _int8_cell(budget_metrics: dict[str, Any]) -> str | None:
    """`ExecuTorch int8 0.912 / fp32 0.921 (-0.9 pts); LiteRT ...`: each runtime's int8 and fp32
    file's val top-1 through the runtime (export.quantize int8); None when no int8 file was exported."""
    cells = [f"{runtime} int8 {budget_metrics[f'{fmt}_int8_val_top1']:.4f} / fp32 "
             f"{budget_metrics[f'{fmt}_fp32_val_top1']:.4f} ({0.0 - budget_metrics[f'{fmt}_int8_drop_points']:+.1f} pts)"
             for fmt, runtime in (("pte", "ExecuTorch"), ("tflite", "LiteRT")) if f"{fmt}_int8_val_top1" in budget_metrics]
    return "; ".join(cells) or None


def measured_cell(measured: float | None, predicted: float | None) -> str:
    """`0.241 (+18%)`: the measured latency and how far it is from the table's prediction, so a
    gap is read next to the number rather than worked out (one measurement of one subnet moves
    by ~10% between runs on a shared machine; the table's own error is in its metrics)."""
    if measured is None:
        return "-"
    if not predicted:
        return f"{measured:.3f}"
    return f"{measured:.3f} ({measured / predicted - 1:+.0%})"


def subnets_table(rows: Sequence[dict[str, Any]]) -> str:
    """`subnet_rows` as the plain-text table `evit pipeline` ends with."""
    if not rows:
        return "no subnets chosen yet (run the search and export stages)"
    int8 = any(r.get("int8") for r in rows)  # a column only when some subnet has an int8 .pte
    head = ("device", "budget", "val top-1", "predicted ms", "measured ms", "fetch with") + (
        ("int8 vs fp32 val top-1 (runtime)",) if int8 else ())
    body = []
    for r in rows:
        if not r["feasible"]:
            body.append((r["device"], r["budget"], "infeasible", "", "", "") + (("",) if int8 else ()))
            continue
        fetch = f"evit fetch {r['fetch']}" if r["fetch"] else "(not registered)"
        body.append((r["device"], r["budget"], f"{r['val_top1']:.4f}", f"{r['predicted_ms']:.3f}",
                     measured_cell(r["measured_ms"], r["predicted_ms"]), fetch) + ((r.get("int8") or "-",) if int8 else ()))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
                     for line in (head, tuple("-" * w for w in widths), *body))
