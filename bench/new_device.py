"""A new device's latency table in N minutes, on the paper's space (issue 24; docs/mobile.md).

    nice -n 10 .venv/bin/python bench/new_device.py --workdir /tmp/evit-new-device \
        --devices ort-1t,et-1t,litert-1t --budgets 5,10,15

For each device (different runtimes and thread counts stand in for phones) and each
device-time budget (`lut.device_minutes`), with and without a prior device's table
(`lut.prior`), `evit.latency.stage.build_lut` builds the `imagenet` space's table (the
paper's space at its resolutions, 1000 classes); the table is then scored on `--heldout`
subnets of that space (another seed than the table's own validation) measured end to end
on the same device, outside any budget: share within +-10%, MAPE, Spearman. The row also
says the device minutes the build spent, the host minutes (lowering, exporting, fitting)
and, for the mobile kinds, how many files it converted and how many it reused.

How the rows share work (so the bench fits a shared 2-core machine):
- budgets grow on one device: the 10-minute build resumes the 5-minute one's measurements
  and its timing probe (the planner's order is the same, so a larger plan mostly extends a
  smaller one) and times only what its plan adds. Device minutes are cumulative: what
  growing the budget 5 -> 10 -> 15 cost, which is no more than building the larger table
  alone would;
- the prior rows reuse the measurements of the row without prior at the same budget (the
  partial table is kept per budget): same plan, same samples, only the transfer differs;
- the mobile kinds share converted files through `EVIT_MODEL_CACHE_REMOTE` (a folder under
  the workdir, standing for the DVC remote / S3 bucket): a second device of one runtime
  converts nothing.
`--repeat-heldout` measures each device's held-out subnets once more after its tables
(each run another: `-repeat`, `-repeat2`, ...): how far two sessions of one device agree
bounds what any table can reach (on a shared machine it is the load between the sessions,
not the method); the largest table is then scored against each measurement and their mean.
Each step leaves a marker (`<workdir>/rows/*.json`, `<workdir>/heldout-*.json`); a re-run
(a killed bench, another --devices) repeats only what is missing, and a killed row resumes
its own partial table (same probe, so the same plan and the same converted files).
Disk: the converted files of ExecuTorch and LiteRT took 30 GB in `<workdir>/model-cache` and
18 GB more in the stand-in store (47 GB in all); a build stops before the disk fills
(`converting.DISK_RESERVE`), and the workdir's two file folders can be deleted once the
rows are in (a re-run converts again).
The held-out subnets' files are all lowered before any of them is timed: a subnet timed
beside a lowering process (memory-heavy) measured ~18% slow here. `--rescore` measures
nothing and scores the saved tables against the held-out files as they are (after a
held-out set was measured again); the printed table holds every row of the workdir.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from evit.config import load_params  # noqa: E402
from evit.io import write_json_atomic, write_text_atomic  # noqa: E402
from evit.latency import lut as lut_module  # noqa: E402
from evit.latency.coverage import sample_subnets  # noqa: E402
from evit.latency.devices import get_device, torch_threads  # noqa: E402
from evit.latency.devices.converting import ConvertingDevice  # noqa: E402
from evit.latency.measure import VALIDATE_GROUP, quiet, subnet_item  # noqa: E402
from evit.latency.measurement import statistic  # noqa: E402
from evit.latency.predictor import LatencyPredictor  # noqa: E402
from evit.latency.report import error_metrics  # noqa: E402
from evit.latency.stage import build_lut  # noqa: E402
from evit.space import get_space  # noqa: E402

log = logging.getLogger("bench.new_device")
MARKER = "new-device"
"""The doc's section is between <!-- MARKER:start --> and <!-- MARKER:end --> (`--section`)."""
TIMING = {"warmup": 3, "repeats": 24, "rounds": 3, "estimator": "p10", "validate_subnets": 60, "seed": 0}
"""Every device's measurement settings (p10: the machine is shared)."""
DEVICES: dict[str, dict[str, Any]] = {
    "cpu-1t": {"kind": "torch-cpu", "threads": 1},
    "ort-1t": {"kind": "onnxruntime-cpu", "threads": 1, "rounds": 1},  # 1 round: sessions made once (host time)
    "ort-2t": {"kind": "onnxruntime-cpu", "threads": 2},
    "et-1t": {"kind": "executorch", "threads": 1},
    "et-2t": {"kind": "executorch", "threads": 2},
    "litert-1t": {"kind": "litert", "threads": 1},
}
PRIOR = {"ort-1t": "cpu-1t", "ort-2t": "ort-1t", "et-1t": "ort-1t", "et-2t": "et-1t", "litert-1t": "et-1t"}
"""The device whose table each one transfers from (built first, `--prior-minutes`)."""


def paper_space() -> Any:
    """The paper's space as params.imagenet.yaml declares it (levels in the reference FLOPs), 1000 classes."""
    sp = yaml.safe_load((REPO / "params.imagenet.yaml").read_text())["space"]
    return get_space("imagenet", levels=sp["levels"], tolerance=sp["tolerance"], num_classes=1000,
                     flops_convention=sp["flops_convention"])


def write_params(project: Path) -> Path:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["devices"] = [{"name": n, **TIMING, **d} for n, d in DEVICES.items()]
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def device_params(params: Any, name: str, minutes: float, prior: str | None) -> Any:
    devices = []
    for d in params.devices:
        if d.name == name:
            d = d.model_copy(update={"lut": d.lut.model_copy(update={"device_minutes": minutes, "prior": prior})})
        devices.append(d)
    return params.model_copy(update={"devices": devices})


def row_id(device: str, minutes: float, prior: str | None) -> str:
    """A row's name: its marker, partial and table files are `<row_id>.json`."""
    return f"{device}-{minutes:g}-{prior or 'none'}"


def heldout_archs(space: Any, n: int) -> list[Any]:
    return sample_subnets(space, n, random.Random("new-device-heldout"))


def heldout_path(workdir: Path, device: str, n: int, tag: str = "") -> Path:
    return workdir / f"heldout-{device}-{n}{tag}.json"


def repeat_tag(k: int) -> str:
    """The file tag of the k-th repeated measurement of the held-out subnets (1: '-repeat')."""
    return "-repeat" if k == 1 else f"-repeat{k}"


def measurements(workdir: Path, device: str, n: int) -> dict[str, Path]:
    """Every measurement of `device`'s held-out subnets, in order: 'first', 'repeat', 'repeat2', ..."""
    first = heldout_path(workdir, device, n)
    found = {"first": first} if first.is_file() else {}
    k = 1
    while (path := heldout_path(workdir, device, n, repeat_tag(k))).is_file():
        found[repeat_tag(k).lstrip("-")] = path
        k += 1
    return found


def heldout(params: Any, name: str, space: Any, n: int, workdir: Path,
            tag: str = "") -> tuple[list[Any], np.ndarray]:
    """`n` held-out subnets measured end to end on `name` (resumable: saved after every group).
    `tag` names a repeat of the same measurement (`--repeat-heldout`)."""
    archs = heldout_archs(space, n)
    path = heldout_path(workdir, name, n, tag)
    done: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
    dp = params.device(name)
    stat = statistic(dp)
    todo = [a for a in archs if a.key not in done]
    if todo:
        dev = get_device(dp)
        dev.check_available()
        t0 = time.monotonic()
        try:
            with quiet("evit.formats.onnx"), torch_threads(dp.threads):
                items = [subnet_item(a, space, 1) for a in todo]
                if isinstance(dev, ConvertingDevice):  # every file first: no lowering beside any timing
                    dev.prepare_ahead([items])
                for g in range(0, len(todo), VALIDATE_GROUP):
                    group = todo[g:g + VALIDATE_GROUP]
                    ms = dev.measure_many(items[g:g + VALIDATE_GROUP])
                    done.update({a.key: m.to_dict()[stat] for a, m in zip(group, ms)})
                    write_json_atomic(path, done)
                    log.info("held-out %s: %d/%d subnets, %.0f s", name, len(done), n, time.monotonic() - t0)
        finally:
            dev.close()
    return archs, np.array([done[a.key] for a in archs])


def score(table: Path, space: Any, archs: list[Any], measured: np.ndarray) -> dict[str, Any]:
    from scipy.stats import spearmanr

    pred = LatencyPredictor.load(table, space).predict_many(archs)
    m = error_metrics(pred, measured)
    return {"within_10pct": round(m["within_10pct"], 4), "mape_pct": round(m["mape_pct"], 2),
            "spearman": round(float(spearmanr(pred, measured).statistic), 4), "n": len(archs)}


class KeepPartials:
    """A finished build deletes its partial file; the bench keeps a copy (per budget) to grow or re-use."""

    def __init__(self) -> None:
        self.last: Path | None = None
        self._remove = lut_module.PartialLUT.remove
        keeper = self

        def remove(state: Any) -> None:
            if keeper.last is not None and state.path.is_file():
                shutil.copyfile(state.path, keeper.last)
            keeper._remove(state)

        lut_module.PartialLUT.remove = remove  # type: ignore[method-assign]


def build_row(params: Any, name: str, minutes: float, prior: str | None, space: Any, workdir: Path,
              keep: KeepPartials, start_from: Path | None) -> dict[str, Any]:
    partial = Path("luts") / f"{name}.partial.json"
    row = row_id(name, minutes, prior)
    current = workdir / "partials" / "in-progress.txt"
    current.parent.mkdir(parents=True, exist_ok=True)
    if not (current.is_file() and current.read_text() == row and partial.is_file()):
        # a new row starts from its base; the row a killed bench left resumes its own partial
        # (its probe, so the same plan and the same converted files)
        partial.unlink(missing_ok=True)
        if start_from is not None and start_from.is_file():
            shutil.copyfile(start_from, partial)
        current.write_text(row)
    keep.last = workdir / "partials" / f"{row}.json"
    t0 = time.monotonic()
    out = build_lut(device_params(params, name, minutes, prior), name, space=space, track=False, progress=False)
    out["wall_seconds"] = round(time.monotonic() - t0, 1)
    tables = workdir / "tables"
    tables.mkdir(exist_ok=True)
    shutil.copyfile(Path(out["lut"]), tables / f"{row}.json")
    return out


def run(args: argparse.Namespace, workdir: Path, space: Any) -> list[dict[str, Any]]:
    project = workdir / "project"
    project.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("EVIT_MODEL_CACHE", str(workdir / "model-cache"))
    os.environ.setdefault("EVIT_MODEL_CACHE_REMOTE", str(workdir / "shared-models"))
    os.chdir(project)
    params = load_params(write_params(project))
    keep = KeepPartials()
    rows_dir = workdir / "rows"
    rows_dir.mkdir(exist_ok=True)
    budgets = sorted(float(b) for b in args.budgets.split(","))
    rows: list[dict[str, Any]] = []
    host_s: dict[tuple[str, float], float] = {}
    """(device, budget) -> host seconds of the measurements behind its row without prior (cumulative)."""
    for name in args.devices.split(","):
        prior = PRIOR.get(name) if not args.no_prior else None
        if prior and not (Path("luts") / f"{prior}.json").is_file():
            marker = rows_dir / f"prior-{prior}.json"
            log.info("prior %s: a %.0f-minute table first", prior, args.prior_minutes)
            out = build_row(params, prior, args.prior_minutes, None, space, workdir, keep, None)
            marker.write_text(json.dumps(out))
        archs, measured = heldout(params, name, space, args.heldout, workdir)
        log.info("%s: held-out subnets measure %.2f-%.2f ms", name, measured.min(), measured.max())
        for variant in ("none", prior) if prior else ("none",):
            for i, minutes in enumerate(budgets):
                marker = rows_dir / f"{row_id(name, minutes, variant)}.json"
                if marker.is_file():
                    rows.append(json.loads(marker.read_text()))
                    if variant == "none":
                        host_s[(name, minutes)] = rows[-1]["host_min"] * 60
                    continue
                if variant == "none":  # grow the previous budget's measurements
                    start = (workdir / "partials" / f"{row_id(name, budgets[i - 1], None)}.json") if i else None
                else:  # the same measurements as the row without prior
                    start = workdir / "partials" / f"{row_id(name, minutes, None)}.json"
                out = build_row(params, name, minutes, None if variant == "none" else variant, space, workdir, keep,
                                start)
                if variant == "none":  # a grown build: the host work of the smaller builds it resumed counts too
                    host_s[(name, minutes)] = out["host_seconds"] + (host_s.get((name, budgets[i - 1]), 0.0) if i
                                                                     else 0.0)
                    host = host_s[(name, minutes)]
                else:
                    host = out["host_seconds"] + host_s.get((name, minutes), 0.0)
                table = workdir / "tables" / f"{row_id(name, minutes, variant)}.json"
                row = {"device": name, "kind": DEVICES[name]["kind"], "threads": DEVICES[name]["threads"],
                       "budget_min": minutes, "prior": None if variant == "none" else variant,
                       **score(table, space, archs, measured),
                       "device_min": round(out["device_seconds"] / 60, 2),
                       "host_min": round(host / 60, 2),
                       "files_converted": out.get("files_converted"), "files_reused": out.get("files_reused"),
                       "table_source": out["table_source"], "entries": out["entries"], "carriers": out["carriers"],
                       "validation_n": out["n"], "validation_within_10pct": out["within_10pct"],
                       "load_avg": json.loads(table.read_text())["measurement"]["load"]}
                marker.write_text(json.dumps(row))
                rows.append(row)
                log.info("row %s", row)
        if args.repeat_heldout:  # another measurement each time: '-repeat', '-repeat2', ...
            tag = repeat_tag(len(measurements(workdir, name, args.heldout)))
            _, again = heldout(params, name, space, args.heldout, workdir, tag=tag)
            drift = again / measured - 1.0
            repeat = {"device": name, "within_10pct": round(float(np.mean(np.abs(drift) <= 0.10)), 4),
                      "mean_drift_pct": round(float(np.mean(drift) * 100), 2),
                      "median_abs_drift_pct": round(float(np.median(np.abs(drift)) * 100), 2)}
            (workdir / f"repeat-{name}.json").write_text(json.dumps(repeat))
            log.info("held-out %s measured again after the tables: %s", name, repeat)
    return rows


def rescore(workdir: Path, space: Any, n: int) -> None:
    """Score every row's saved table again against its device's held-out file as it is now
    (after a held-out set is measured again, e.g. alone on the machine)."""
    archs = heldout_archs(space, n)
    for row in all_rows(workdir):
        name = row_id(row["device"], row["budget_min"], row["prior"])
        held = heldout_path(workdir, row["device"], n)
        table = workdir / "tables" / f"{name}.json"
        if not (held.is_file() and table.is_file()):
            continue
        done = json.loads(held.read_text())
        row.update(score(table, space, archs, np.array([done[a.key] for a in archs])))
        (workdir / "rows" / f"{name}.json").write_text(json.dumps(row))


def all_rows(workdir: Path) -> list[dict[str, Any]]:
    """Every row the workdir holds (this run's and earlier runs' devices): by device, without
    prior before with, by budget."""
    rows = [json.loads(p.read_text()) for p in (workdir / "rows").glob("*.json") if not p.name.startswith("prior-")]
    order = list(DEVICES)
    return sorted(rows, key=lambda r: (order.index(r["device"]) if r["device"] in order else len(order),
                                       r["prior"] is not None, r["budget_min"]))


def against_each_measurement(workdir: Path, space: Any, n: int) -> list[str]:
    """Per device measured more than once: its largest table without prior scored against each
    measurement of the held-out subnets and against their mean (the ground truth moves
    between sessions on a shared machine; how far is what these say)."""
    archs = heldout_archs(space, n)
    every_row = all_rows(workdir)
    lines = []
    for device in DEVICES:
        sets = measurements(workdir, device, n)
        rows = [r for r in every_row if r["device"] == device and r["prior"] is None]
        if len(sets) < 2 or not rows:
            continue
        budget = max(r["budget_min"] for r in rows)
        table_path = workdir / "tables" / f"{row_id(device, budget, None)}.json"
        ms = {name: np.array([json.loads(p.read_text())[a.key] for a in archs]) for name, p in sets.items()}
        ms["their mean"] = np.mean(list(ms.values()), axis=0)
        scores = [f"{name} {s['within_10pct'] * 100:.0f}% (MAPE {s['mape_pct']:.1f}%, Spearman {s['spearman']:.3f})"
                  for name, s in ((name, score(table_path, space, archs, m)) for name, m in ms.items())]
        lines.append(f"The {budget:g}-minute {device} table without prior against each measurement of its held-out "
                     f"subnets (mean {', '.join(f'{m.mean():.2f}' for m in list(ms.values())[:-1])} ms): "
                     + ", ".join(scores) + ".")
    return lines


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| device | budget (min) | prior | within +-10% | MAPE | Spearman | device min | host min "
            "| files converted / reused | unmeasured blocks from | carriers | load avg |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        files = "-" if r["files_converted"] is None else f"{r['files_converted']} / {r['files_reused']}"
        lines.append(f"| {r['device']} ({r['kind']}, {r['threads']} thread{'s' if r['threads'] > 1 else ''}) "
                     f"| {r['budget_min']:g} | {r['prior'] or 'none'} | {r['within_10pct'] * 100:.0f}% "
                     f"| {r['mape_pct']:.1f}% | {r['spearman']:.3f} | {r['device_min']:.1f} | {r['host_min']:.1f} "
                     f"| {files} | {r['table_source']} | {r['carriers']} "
                     f"| {r['load_avg']['load_1m_mean']:.1f} |")
    return "\n".join(lines)


def splice(doc: Path, text: str, section: str = MARKER) -> None:
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    body = doc.read_text()
    if start not in body or end not in body:
        raise SystemExit(f"{doc} has no {start} ... {end} section")
    head, rest = body.split(start, 1)
    _, tail = rest.split(end, 1)
    write_text_atomic(doc, f"{head}{start}\n{text}\n{end}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/evit-new-device")
    ap.add_argument("--devices", default="ort-1t,et-1t,litert-1t")
    ap.add_argument("--budgets", default="5,10,15")
    ap.add_argument("--prior-minutes", type=float, default=5.0)
    ap.add_argument("--no-prior", action="store_true")
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--repeat-heldout", action="store_true",
                    help="after a device's rows, measure its held-out subnets again: how far two sessions of "
                         "the same device agree is the floor of any table's error")
    ap.add_argument("--rescore", action="store_true",
                    help="measure nothing: score the workdir's saved tables against its held-out files as they are")
    ap.add_argument("--section", default=MARKER, help="the marked section of --out to replace")
    ap.add_argument("--out", default=None, help="splice the table into this file (docs/mobile.md)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    workdir, space = Path(args.workdir).resolve(), paper_space()
    if args.rescore:
        rescore(workdir, space, args.heldout)
    else:
        run(args, workdir, space)
    rows = all_rows(workdir)
    text = table(rows)
    for path in sorted(workdir.glob("repeat-*.json")):
        r = json.loads(path.read_text())
        text += (f"\n\nHeld-out subnets of {r['device']} measured again after its tables: "
                 f"{r['within_10pct'] * 100:.0f}% within +-10% of the first measurement, mean drift "
                 f"{r['mean_drift_pct']:+.1f}%, median |drift| {r['median_abs_drift_pct']:.1f}%.")
    for line in against_each_measurement(workdir, space, args.heldout):
        text += f"\n\n{line}"
    print(text)
    (workdir / "new_device.json").write_text(json.dumps(rows, indent=1))
    if args.out:
        splice(REPO / args.out, text, args.section)


if __name__ == "__main__":
    main()
