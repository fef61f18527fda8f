"""The int8 evidence table of docs/mobile.md from finished pipeline runs (issue #25).

    .venv/bin/python bench/int8_table.py /work/runs/int8-digits:digits /work/runs/int8-flowers:flowers32

For each run directory (`evit pipeline` / `evit export` with `export.quantize: [fp32, int8]`
and `export.formats` with pte and tflite) and each subnet it exported (exports/<device>/
index.json): fp32 vs int8 val top-1 through each runtime (read from the card: measured by
the export over the whole val split, through ExecuTorch and the LiteRT interpreter), the
int8 / fp32 latency ratio per runtime (timed here, 1 thread: the fp32 and the int8 file of
one runtime alternated over `--rounds` rounds and each one's samples pooled, p10, so load
that drifts during the run hits both), and the rank agreement the export measured
(`export.int8_rank_candidates`: Spearman of the float and the int8 val top-1 of the
budget's best search candidates, int8 through ExecuTorch). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evit.formats import bundle  # noqa: E402
from evit.formats.inputs import seeded_input  # noqa: E402

RUNTIMES = {"pte": "ExecuTorch", "tflite": "LiteRT"}


def _runner(path: Path, x: Any) -> Callable[[], Any]:
    """A zero-argument call running the file once on `x` (loaded once, 1 thread)."""
    if path.suffix == ".pte":
        from evit.formats.pte import load_program, set_threads

        set_threads(1)
        program = load_program(path)
        method = program.load_method("forward")
        run = method.execute

        def step() -> Any:
            return run((x,))

        step.keep = (program, method)  # type: ignore[attr-defined]
        return step
    from evit.formats.tflite import interpreter, signature_runner

    runner, name = signature_runner(interpreter(path, 1))
    arr = x.numpy()
    return lambda: runner(**{name: arr})


def _time_pair(fp32: Path, int8: Path, r: int, repeats: int, rounds: int) -> tuple[float, float]:
    """(fp32 p10 ms, int8 p10 ms), alternated rounds, pooled samples."""
    x = seeded_input((1, 3, r, r))
    steps = {"fp32": _runner(fp32, x), "int8": _runner(int8, x)}
    samples: dict[str, list[float]] = {"fp32": [], "int8": []}
    for step in steps.values():
        for _ in range(10):
            step()
    for _ in range(rounds):
        for k, step in steps.items():
            for _ in range(repeats):
                t = time.perf_counter()
                step()
                samples[k].append((time.perf_counter() - t) * 1e3)
    return float(np.percentile(samples["fp32"], 10)), float(np.percentile(samples["int8"], 10))


def _rows(run: Path, label: str, repeats: int, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for index in sorted((run / "exports").glob("*/index.json")):
        for s in json.loads(index.read_text())["subnets"]:
            folder = Path(s["folder"]) if Path(s["folder"]).is_absolute() else run / s["folder"]
            card = json.loads((folder / bundle.CARD).read_text())
            r = int(card["arch"]["resolution"])
            row: dict[str, Any] = {"data": label, "device": card["device"]["name"], "budget": s["label"],
                                   "flops_m": card["metrics"]["flops_m"], "float_top1": card["metrics"]["val_top1"],
                                   "ranking": card.get("int8_ranking")}
            for fmt, name in RUNTIMES.items():
                q = card.get(f"{fmt}_int8")
                if q is None:
                    continue
                fp32_ms, int8_ms = _time_pair(folder / bundle.MOBILE_FILES[fmt], folder / bundle.INT8_FILES[fmt], r,
                                              repeats, rounds)
                row[fmt] = {"fp32_top1": q["fp32_val_top1_runtime"], "int8_top1": q["val_top1_runtime"],
                            "drop": q["drop_points"], "flagged": q["flagged"], "fp32_ms": fp32_ms, "int8_ms": int8_ms}
                print(f"  {label} {row['device']} {s['label']} {name}: top-1 fp32 {q['fp32_val_top1_runtime']:.4f} "
                      f"int8 {q['val_top1_runtime']:.4f}; p10 fp32 {fp32_ms:.3f} ms int8 {int8_ms:.3f} ms", flush=True)
            rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    head = ["data", "device / budget", "MFLOPs", "float top-1 (PyTorch)"]
    for name in RUNTIMES.values():
        head += [f"{name} val top-1 fp32 / int8 (drop)", f"{name} p10 ms fp32 / int8 (ratio)"]
    head += ["rank agreement (Spearman, same best)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["data"], f"{row['device']} {row['budget']}", f"{row['flops_m']:.1f}", f"{row['float_top1']:.4f}"]
        for fmt in RUNTIMES:
            q = row.get(fmt)
            if q is None:
                cells += ["-", "-"]
                continue
            flag = " **flagged**" if q["flagged"] else ""
            cells += [f"{q['fp32_top1']:.4f} / {q['int8_top1']:.4f} ({0.0 - q['drop']:+.1f}){flag}",
                      f"{q['fp32_ms']:.3f} / {q['int8_ms']:.3f} ({q['int8_ms'] / q['fp32_ms']:.2f}x)"]
        rk = row["ranking"]
        if rk:
            rho = "undefined" if rk["spearman"] is None else f"{rk['spearman']:+.2f}"
            cells.append(f"{rho} over {rk['candidates']}, {'yes' if rk['same_best'] else 'no'}")
        else:
            cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="RUN_DIR[:LABEL]")
    ap.add_argument("--from-json", type=Path, nargs="*", default=[],
                    help="rows written by earlier --json runs, put first in the table (not timed again)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--ranking", type=Path, nargs="*", default=[],
                    help="rank checks made apart from the export (JSON: device, label and `rank_agreement`'s "
                    "fields), for subnets exported with int8_rank_candidates 0")
    args = ap.parse_args()
    rows = [row for f in args.from_json for row in json.loads(f.read_text())]
    print(f"load average at start: {os.getloadavg()}")
    for spec in args.runs:
        run, _, label = spec.partition(":")
        if not (Path(run) / "exports").is_dir():
            raise SystemExit(f"error: {run} has no exports/ (run `evit export` there first)")
        rows += _rows(Path(run), label or Path(run).name, args.repeats, args.rounds)
    print(f"load average at end: {os.getloadavg()}\n")
    for f in args.ranking:
        rk = json.loads(f.read_text())
        for row in rows:
            if (row["device"], row["budget"]) == (rk["device"], rk["label"]) and not row["ranking"]:
                row["ranking"] = rk
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
