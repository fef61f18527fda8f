"""`evit baselines`: the standalone models a user would train instead, measured like the subnets.

For every timm name in `baselines.models`: train it from scratch on the prepared `train`
split with the supernet's recipe and epoch budget (`evit.baselines.train`), take top-1 on
the `search` and `val` splits, and time it on every device of `devices:` with the same
device code and estimator as the search's final measurement (`evit.latency.devices`,
`evit.latency.stage.statistic`).

Outputs: `baselines.results` (results/baselines.json: per model its cost, top-1 and
per-device latency), `metrics/baselines.json` (val top-1 per model, for `dvc metrics`),
`plots/baselines-<device>.csv` (latency vs val top-1, a second series for `dvc plots`
beside the search's front), model files under `baselines.out_dir`, and an MLflow run
`baselines` with the same numbers. The search stage reads the results file, when present,
to draw the baselines into its plot and to write the comparison table into its result.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Any

from evit import paths
from evit.config import Params
from evit.io import write_json_atomic, write_text_atomic
from evit.tracking import log_stage, numeric_metrics

log = logging.getLogger(__name__)


def baseline_resolution(params: Params, space: Any) -> int:
    return int(params.baselines.resolution or max(space.resolutions))


def baseline_epochs(params: Params) -> int:
    return int(params.baselines.epochs or params.train.epochs)


def _plots_csv(rows: list[dict[str, Any]], device: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "latency_ms", "val_top1", "macs_m"])
    for r in sorted(rows, key=lambda r: r["latency_ms"][device]):
        w.writerow([r["model"], round(r["latency_ms"][device], 6), round(r["val_top1"], 6), round(r["macs_m"], 4)])
    return buf.getvalue()


def run_baselines(params: Params, *, track: bool = True) -> dict[str, Any]:
    """Stage entry point: train, evaluate and time every baseline; returns a compact summary."""
    from evit.baselines.models import build_model, check_model_names, model_cost
    from evit.baselines.train import baseline_hash, train_baseline
    from evit.data.loader import PreparedData
    from evit.evaluate import split_top1
    from evit.latency.devices import get_device
    from evit.latency.measurement import statistic
    from evit.resolve import space_from_params

    b = params.baselines
    check_model_names(b.models)
    devices = [get_device(dp, opset=params.export.onnx_opset) for dp in params.devices]
    for dev in devices:
        dev.check_available()
    data = PreparedData(paths.prepared_dir(params))
    space = space_from_params(params.space, data.num_classes)
    resolution, epochs = baseline_resolution(params, space), baseline_epochs(params)
    t0 = time.perf_counter()

    rows: list[dict[str, Any]] = []
    for name in b.models:
        model = build_model(name, data.num_classes)
        cost = model_cost(model, resolution)
        h = baseline_hash(params.section("train"), name, resolution, epochs, str(data.content_hash))
        tb = train_baseline(model, name, data, params.train, resolution=resolution, epochs=epochs,
                            out_dir=paths.baselines_dir(params), expect_hash=h)
        val = split_top1(tb.model, data, "val", resolution, 256)
        latency: dict[str, float] = {}
        for dp, dev in zip(params.devices, devices, strict=True):
            m = dev.measure(tb.model.cpu().eval(), (dp.batch_size, 3, resolution, resolution))
            latency[dp.name] = float(getattr(m, statistic(dp)))
        rows.append({"model": name, "macs_m": round(cost.macs_m, 4), "params_m": round(cost.params_m, 4),
                     "search_top1": tb.search_top1, "val_top1": val, "latency_ms": latency,
                     "weights": tb.weights, "train_seconds": round(tb.train_seconds, 2), "steps": tb.steps,
                     "reused": tb.reused})
        log.info("baseline %s: %.2f MMACs, val top-1 %.4f, latency %s", name, cost.macs_m, val,
                 {k: round(v, 4) for k, v in latency.items()})
    for dev in devices:
        dev.close()

    doc = {"resolution": resolution, "epochs": epochs, "split": "val", "models": rows,
           "devices": {dp.name: {"estimator": statistic(dp), "description": dev.describe()}
                       for dp, dev in zip(params.devices, devices, strict=True)},
           "seconds": round(time.perf_counter() - t0, 2)}
    write_json_atomic(paths.baselines_result_path(params), doc)
    metrics = {"models": {r["model"]: {"val_top1": round(r["val_top1"], 6), "macs_m": r["macs_m"],
                                       **{f"latency_ms_{d}": round(v, 6) for d, v in r["latency_ms"].items()}}
                          for r in rows}}
    write_json_atomic(paths.baselines_metrics_path(), metrics)
    plot_files = []
    for dp in params.devices:
        f = paths.plots_dir() / f"baselines-{dp.name}.csv"
        write_text_atomic(f, _plots_csv(rows, dp.name))
        plot_files.append(f)
    if track:
        _track(params, rows, [paths.baselines_result_path(params), *plot_files])
    return {"baselines": str(paths.baselines_result_path(params)),
            "val_top1": {r["model"]: round(r["val_top1"], 4) for r in rows}}


def _track(params: Params, rows: list[dict[str, Any]], files: list[Path]) -> None:
    flat: dict[str, Any] = {r["model"]: {"val_top1": r["val_top1"], "macs_m": r["macs_m"], "latency_ms": r["latency_ms"]}
                            for r in rows}
    log_stage(params, "baselines", log_sections=("baselines", "train"), metrics=numeric_metrics(flat),
              artifacts=files, best_effort=False)


def load_baselines(params: Params) -> dict[str, Any] | None:
    """The baselines results file, or None when the stage is off or has not run."""
    from evit.io import read_json

    path = paths.baselines_result_path(params)
    if not params.baselines.models or not path.is_file():
        return None
    return read_json(path)
