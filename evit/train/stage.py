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
from evit.io import sha256_file, write_json_atomic
from evit.train import checkpoint as ckpt_mod
from evit.train.logbook import plot_flops, plot_losses, read_step_log
from evit.train.loop import FitResult, Trainer

log = logging.getLogger(__name__)

BANKS_FILE = "banks.json"


def _flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    out = {f"top1_{k.replace('/', '_')}": float(v) for k, v in summary.get("top1", {}).items()}
    for k in ("top1_mean", "top1_raw_mean", "top1_ema_mean", "images_per_s", "train_seconds", "steps"):
        if summary.get(k) is not None:
            out[k] = float(summary[k])
    return out


def write_outputs(params: Params, result: FitResult, *, plots: bool = True) -> dict[str, Any]:
    """metrics/train.json, models/banks.json and the plots of a finished run."""
    s = result.summary
    out_dir = result.final_checkpoint.parent
    banks_path = out_dir / BANKS_FILE
    write_json_atomic(banks_path, result.banks)
    # Flat numbers only (`dvc metrics show` makes a column of every key); the per-epoch history
    # is in the checkpoint and the MLflow run.
    metrics = {**_flat_metrics(s), "weights": s["weights"], "sampler": s["sampler"]}
    write_json_atomic(paths.train_metrics_path(), metrics)
    outputs = {"metrics": str(paths.train_metrics_path()), "banks": str(banks_path)}
    if plots and result.step_log is not None:
        rows = read_step_log(result.step_log)
        space = params.space
        from evit.resolve import space_from_params

        sp = space_from_params(space)
        loss_png = plot_losses(rows, paths.plots_dir() / "train-loss.png", title=f"supernet loss ({s['sampler']})")
        flops_png = plot_flops(rows, paths.plots_dir() / "train-flops.png", sp.levels, sp.tolerance,
                               title=f"sampled FLOPs ({s['sampler']})")
        outputs.update(loss_plot=str(loss_png), flops_plot=str(flops_png))
    return outputs


def log_to_mlflow(result: FitResult, outputs: dict[str, Any]) -> None:
    import mlflow

    s = result.summary
    mlflow.log_metrics(_flat_metrics(s))
    ck = result.final_checkpoint
    mlflow.set_tags({"evit.weights": s["weights"], "evit.sampler": s["sampler"],
                     "evit.checkpoint": str(ck), "evit.checkpoint_sha256": sha256_file(ck),
                     "evit.data_hash": s["data_hash"]})
    mlflow.log_dict({"path": str(ck), "sha256": sha256_file(ck), "bytes": ck.stat().st_size,
                     "weights": s["weights"], "data_hash": s["data_hash"]}, "checkpoint.json")
    for key in ("banks", "metrics", "loss_plot", "flops_plot"):
        if key in outputs and Path(outputs[key]).is_file():
            mlflow.log_artifact(outputs[key])
    if result.step_log is not None and result.step_log.is_file():
        mlflow.log_artifact(str(result.step_log))


def train_supernet(params: Params, resume: bool = True) -> dict[str, Any]:
    """Stage entry point (`evit train`, dvc.yaml, the Prefect flow). Returns the summary.

    Under torchrun every rank calls this; only rank 0 talks to MLflow and writes files.
    """
    from evit.resolve import space_for
    from evit.level_sampler import LevelSampler
    from evit.train.distributed import init_distributed

    from evit.reference_import import refuse_training_over_import

    refuse_training_over_import(paths.checkpoint_path(params), resume)
    if params.train.sampler not in ("uniform", "flat"):  # fail on unreachable custom levels before any work
        LevelSampler(space_for(params)).check_levels()
    info = init_distributed(params.train.device)
    if info.is_main:
        from evit.tracking import stage_run

        ctx: Any = stage_run(params, "train", log_sections=("train", "space"))
    else:
        ctx = contextlib.nullcontext(None)
    with ctx as run:
        trainer = Trainer(params, resume=resume, mlflow_run_id=run.info.run_id if run is not None else None)
        if run is not None:
            import mlflow

            mlflow.log_params({"train.steps_per_epoch_effective": trainer.steps_per_epoch,
                               "train.total_steps": trainer.total_steps, "world_size": info.world_size,
                               "data.content_hash": trainer.data_hash})
            if resume and ckpt_mod.rolling_exists(trainer.last_path):
                mlflow.set_tag("evit.resumed", "true")
        result = trainer.fit()
        if not info.is_main:
            return {"rank": info.rank}
        outputs = write_outputs(params, result)
        if run is not None:
            log_to_mlflow(result, outputs)
        return {**result.summary, "outputs": outputs}
