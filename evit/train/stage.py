"""The `train` stage: prepared data -> models/supernet.pt (+ banks, step log, metrics, plots).

Outputs (rank 0 only):
- models/supernet.pt  final checkpoint (weights to use downstream, banks, space, data hash)
- models/last.pt      rolling checkpoint for resume
- models/banks.json   the elastic sampler's memory banks (level -> [{arch, score, ...}])
- models/train-steps.jsonl  one record per step (losses, FLOPs, level, lr, images/s)
- metrics/train.json  final per-level top-1 on the search split, throughput, settings
- plots/train-loss.png, plots/train-flops.png
MLflow (child run "train"): params of the train and space sections, per-step metrics in
batches, per-epoch top-1, the final metrics, the banks JSON, the plots, and a reference to
the checkpoint (path + sha256 + size; the file itself stays in DVC's cache/remote).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from evit import paths
from evit.config import Params
from evit.io import read_json, sha256_file, write_json_atomic
from evit.level_sampler import LevelSampler
from evit.resolve import space_for, space_from_params
from evit.tracking import StageRun, numeric_metrics, stage_run
from evit.train import checkpoint as ckpt_mod
from evit.train.distributed import init_distributed
from evit.train.import_reference import refuse_training_over_import
from evit.train.logbook import plot_flops, plot_losses, read_step_log
from evit.train.loop import FitResult, Trainer

log = logging.getLogger(__name__)

BANKS_FILE = "banks.json"


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The run's headline numbers: top-1 per evaluated subnet, their means, throughput, steps."""
    top1 = {f"top1_{k.replace('/', '_')}": v for k, v in summary.get("top1", {}).items()}
    rest = {k: summary.get(k) for k in ("top1_mean", "top1_raw_mean", "top1_ema_mean", "images_per_s",
                                         "train_seconds", "steps")}
    return numeric_metrics({**top1, **{k: v for k, v in rest.items() if v is not None}})


def write_outputs(params: Params, result: FitResult, *, plots: bool = True) -> dict[str, Any]:
    """metrics/train.json, models/banks.json and the plots of a finished run."""
    s = result.summary
    out_dir = result.final_checkpoint.parent
    banks_path = out_dir / BANKS_FILE
    write_json_atomic(banks_path, result.banks)
    # Flat numbers only (`dvc metrics show` makes a column of every key); the per-epoch history
    # is in the checkpoint and the MLflow run.
    metrics = {**summary_metrics(s), "weights": s["weights"], "sampler": s["sampler"]}
    write_json_atomic(paths.train_metrics_path(), metrics)
    outputs = {"metrics": str(paths.train_metrics_path()), "banks": str(banks_path)}
    if plots and result.step_log is not None:
        rows = read_step_log(result.step_log)
        sp = space_from_params(params.space)
        loss_png = plot_losses(rows, paths.plots_dir() / "train-loss.png", title=f"supernet loss ({s['sampler']})")
        flops_png = plot_flops(rows, paths.plots_dir() / "train-flops.png", sp.levels, sp.tolerance,
                               title=f"sampled FLOPs ({s['sampler']})")
        outputs.update(loss_plot=str(loss_png), flops_plot=str(flops_png))
    return outputs


def log_outputs(run: StageRun, result: FitResult, outputs: dict[str, Any]) -> None:
    """The finished run's metrics, checkpoint reference (path + sha256; the file stays in
    DVC's cache/remote), banks, metrics file, plots and step log, on the stage's MLflow run."""
    s = result.summary
    run.log_metrics(summary_metrics(s))
    ck = result.final_checkpoint
    digest = sha256_file(ck)
    run.set_tags({"evit.weights": s["weights"], "evit.sampler": s["sampler"], "evit.checkpoint": str(ck),
                  "evit.checkpoint_sha256": digest, "evit.data_hash": s["data_hash"]})
    run.log_dict({"path": str(ck), "sha256": digest, "bytes": ck.stat().st_size, "weights": s["weights"],
                  "data_hash": s["data_hash"]}, "checkpoint.json")
    for key in ("banks", "metrics", "loss_plot", "flops_plot"):
        if key in outputs and Path(outputs[key]).is_file():
            run.log_artifact(outputs[key])
    if result.step_log is not None and result.step_log.is_file():
        run.log_artifact(result.step_log)


def resumable(params: Params) -> bool:
    """Whether training may resume from `models/last.pt`: only a checkpoint of these very params
    and data (a params change that makes the stage rerun must start over, not mix two
    configurations). No checkpoint: True (there is nothing to mix)."""
    last = paths.resume_path(params)
    if not ckpt_mod.rolling_exists(last):
        return True
    try:
        manifest = read_json(paths.manifest_path(params))
        ck, _ = ckpt_mod.load_rolling(last)  # a corrupt latest falls back to last.prev.pt (reported)
        same = ck.get("params_hash") == ckpt_mod.params_hash(params, str(manifest["content_hash"]))
    except Exception as exc:  # noqa: BLE001 - unreadable: the trainer would refuse it too
        log.warning("%s is unreadable (%s); training starts over", last, type(exc).__name__)
        return False
    if not same:
        log.info("%s belongs to other train/space params or data; training starts over", last)
    return same


def train_supernet(params: Params, resume: bool = True) -> dict[str, Any]:
    """Stage entry point (`evit train`, dvc.yaml, the Prefect flow). Returns the summary.

    Under torchrun every rank calls this; only rank 0 talks to MLflow and writes files.
    """
    init = params.train.init
    init_state = None
    if init:  # a bad init file fails here, before any work; the trainer takes the weights read here
        from evit.train.warm_start import check_init_target, read_init

        check_init_target(init, paths.train_dir(params))
        init_state = read_init(init, space_for(params))
    refuse_training_over_import(paths.checkpoint_path(params), resume and not init)
    if params.train.sampler not in ("uniform", "flat"):  # fail on unreachable custom levels before any work
        LevelSampler(space_for(params)).check_levels()
    info = init_distributed(params.train.device)
    ctx: Any = stage_run(params, "train", log_sections=("train", "space")) if info.is_main \
        else contextlib.nullcontext(None)
    with ctx as run:
        trainer = Trainer(params, resume=resume, mlflow_run_id=run.run_id if run is not None else None,
                          init_state=init_state)
        if run is not None:
            run.log_params({"train.steps_per_epoch_effective": trainer.steps_per_epoch,
                            "train.total_steps": trainer.total_steps, "world_size": info.world_size,
                            "data.content_hash": trainer.data_hash, **trainer.init_info})
            if resume and ckpt_mod.rolling_exists(trainer.last_path):
                run.set_tags({"evit.resumed": "true"})
        result = trainer.fit()
        if not info.is_main:
            return {"rank": info.rank}
        outputs = write_outputs(params, result)
        if run is not None:
            log_outputs(run, result, outputs)
        return {**result.summary, "outputs": outputs}
