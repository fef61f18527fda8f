"""The supernet training loop (`fit`): one optimiser step per batch over the sampled subnets.

Recipe (timm throughout): AdamW from `create_optimizer_v2` with weight decay on every
weight except 1-D parameters (norms, biases) and the relative-position bias tables;
`CosineLRScheduler` stepped per update with a linear warm-up; `adaptive_clip_grad`;
`ModelEmaV3` (with its decay warm-up, so short CPU runs still get a useful average);
timm train transforms in the loader and timm `Mixup` when `mixup_alpha` > 0; bf16
autocast and channels-last on GPU; DDP under torchrun (see `evit.train.distributed`).
The learning rate is the per-process `train.lr` times the world size (linear scaling
of the global batch, as the paper's 5e-4 x batch/512).

Determinism and resume: the global RNGs are seeded from `train.seed`, each epoch's data
order and per-sample augmentation seeds are a function of (seed, epoch), and a
checkpoint stores every RNG state plus the position inside the epoch. A resumed run
rebuilds the epoch's order, skips the consumed batches without loading them, restores
the RNG states and continues exactly where the killed run stopped. Evaluation and bank
re-scoring never consume the global RNG streams.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from evit import cancel, paths
from evit.arch import Arch
from evit.config import ConfigError, Params
from evit.evaluate import evaluate_subnet
from evit.resolve import space_from_params
from evit.space import SearchSpace
from evit.train import checkpoint as ckpt_mod
from evit.train.banks import banks_to_json
from evit.train.distributed import (
    DistInfo,
    all_gather_floats,
    all_reduce_mean,
    barrier,
    init_distributed,
)
from evit.train.logbook import STEP_LOG, MlflowBatcher, StepLog
from evit.train.sampler_factory import make_sampler
from evit.train.samplers import SubnetSampler
from evit.train.step import StepConfig, StepRunner, Throughput, make_mixup, observe_step

log = logging.getLogger(__name__)

NO_DECAY_PATTERNS = ("*rel_bias",)
"""Besides 1-D parameters: relative-position bias tables get no weight decay (as the reference)."""
_AMP = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


class ResumableSampler(Sampler[Any]):
    """Wraps the loader's `SeededSampler`: iterate epoch `epoch` from sample `skip` on.

    The skipped samples are never loaded, so resuming late in an epoch costs nothing.
    """

    def __init__(self, base: Any) -> None:
        self.base = base
        self.epoch = 0
        self.skip = 0

    def start(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)

    def __iter__(self) -> Iterator[Any]:
        self.base.set_epoch(self.epoch)
        return itertools.islice(iter(self.base), self.skip, None)


@dataclass
class FitResult:
    summary: dict[str, Any]
    final_checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    banks: dict[str, Any] = field(default_factory=dict)
    step_log: Path | None = None


def fixed_eval_archs(space: SearchSpace, seed: int, draws: bool = True) -> dict[str, Arch]:
    """The subnets of the final report: per level its min arch and (`draws`) one fixed seeded draw.

    Every epoch (and to choose between EMA and raw weights) only the min archs are
    evaluated ("level<i>/min"), to keep the per-epoch cost at one subnet per level.

    Spaces without levels fall back to the smallest and the largest subnet.
    """
    if not space.levels:
        return {"smallest": space.smallest(), "largest": space.largest()}
    from evit.level_sampler import LevelSampler

    ls = LevelSampler(space)
    out: dict[str, Arch] = {}
    for lv in range(len(space.levels)):
        out[f"level{lv}/min"] = ls.min_arch(lv)
        if draws:
            out[f"level{lv}/draw"] = ls.sample(lv, random.Random(f"evit-eval-arch:{seed}:{lv}"))
    return out


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _state_digest(module: nn.Module) -> float:
    """48 bits of a sha256 over every parameter's bytes (exactly equal on in-sync ranks).

    Buffers are left out: each rank's BN running statistics move with its own batch after
    DDP's per-forward broadcast from rank 0 (rank 0's are the ones checkpointed).
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for v in module.parameters():
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return float(int(h.hexdigest()[:12], 16))


class Trainer:
    """Builds every component of a run from `params`; `fit()` trains, checkpoints, evaluates.

    `init_state`: the weights of `train.init` when the caller has read (and checked) them
    already, so a large init checkpoint is loaded once; None reads them here.
    """

    def __init__(self, params: Params, *, out_dir: Path | None = None, resume: bool = True,
                 data: Any | None = None, mlflow_run_id: str | None = None, progress: bool = True,
                 on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
                 init_state: dict[str, torch.Tensor] | None = None) -> None:
        from evit.data.loader import PreparedData
        from evit.nn.factory import build_supernet

        self.params = params
        t = self.t = params.train
        self.out_dir = Path(out_dir) if out_dir is not None else paths.train_dir(params)
        self.last_path = self.out_dir / paths.resume_path(params).name
        self.final_path = self.out_dir / paths.checkpoint_path(params).name
        self.resume = resume
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        self.dist: DistInfo = init_distributed(t.device)
        self.device = self.dist.device
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        on_gpu = self.device.type == "cuda"

        self.data = data if data is not None else PreparedData(paths.prepared_dir(params))
        self.space = space_from_params(params.space, self.data.num_classes)
        self.data_hash = str(self.data.content_hash)
        self.params_hash = ckpt_mod.params_hash(params, self.data_hash)
        # teachers first: a teacher that cannot load fails before anything else is built
        from evit.train.losses import load_teachers

        teacher = load_teachers(t.teachers, self.space.num_classes)

        _seed_everything(t.seed)
        self.module = build_supernet(self.space, drop_path=t.drop_path).to(self.device)
        self.init_info: dict[str, Any] = {}
        if t.init:  # fine-tuning: every weight from the trained supernet (the classifier if classes match)
            from evit.train.warm_start import apply_init, read_init

            state = init_state if init_state is not None else read_init(t.init, self.space)
            self.init_info = {**apply_init(self.module, state, t.init), "init_sha256": ckpt_mod.init_sha256(t.init)}
        self.stem_params: list[nn.Parameter] = []
        if t.freeze_stem_epochs:
            from evit.train.warm_start import stem_parameters

            self.stem_params = stem_parameters(self.module)
        self.channels_last = bool(t.channels_last and on_gpu)
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)

        # data: the largest resolution; subnets get a resized copy
        self.train_resolution = max(self.space.resolutions)
        aug = {"auto_augment": t.auto_augment, "re_prob": t.reprob, "hflip": t.hflip}
        base = self.data.loader("train", resolution=self.train_resolution, batch_size=t.batch_size, train=True,
                                seed=t.seed, workers=t.workers, aug=aug, rank=self.dist.rank,
                                world_size=self.dist.world_size, pin_memory=on_gpu, drop_last=True)
        full = len(base.sampler) // t.batch_size
        if full < 1:
            raise ConfigError(f"train.batch_size = {t.batch_size} exceeds the {len(base.sampler)} train images per "
                              "process; lower the batch size")
        if t.steps_per_epoch is not None and t.steps_per_epoch > full:
            raise ConfigError(f"train.steps_per_epoch = {t.steps_per_epoch} exceeds the {full} full batches of "
                              f"{t.batch_size} per process in the train split; lower it or use null (one pass)")
        self.steps_per_epoch = t.steps_per_epoch or full
        self.total_steps = t.epochs * self.steps_per_epoch
        self.data_sampler = ResumableSampler(base.sampler)
        self.loader = DataLoader(base.dataset, batch_size=t.batch_size, sampler=self.data_sampler, drop_last=True,
                                 num_workers=t.workers, pin_memory=on_gpu, persistent_workers=t.workers > 0)

        # optimisation
        from timm.optim import create_optimizer_v2, param_groups_weight_decay
        from timm.scheduler import CosineLRScheduler
        from timm.utils import ModelEmaV3

        self.lr = t.lr * self.dist.world_size
        groups = param_groups_weight_decay(self.module, t.weight_decay, no_weight_decay_list=NO_DECAY_PATTERNS)
        self.optimizer = create_optimizer_v2(groups, opt="adamw", lr=self.lr, weight_decay=t.weight_decay)
        warmup = min(t.warmup_epochs * self.steps_per_epoch, max(0, self.total_steps - 1))
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=max(1, self.total_steps - warmup),
                                           lr_min=t.min_lr, warmup_t=warmup, warmup_lr_init=t.min_lr,
                                           warmup_prefix=True, t_in_epochs=False)
        self.ema = ModelEmaV3(self.module, decay=t.ema_decay, use_warmup=True)
        amp = _AMP[t.amp_dtype] if on_gpu else None
        self.scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None

        self.sampler: SubnetSampler = make_sampler(t.sampler, self.space, t.seed, train=t,
                                                   steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps)
        if teacher is not None:
            teacher = teacher.to(self.device)
            if self.channels_last:
                teacher = teacher.to(memory_format=torch.channels_last)
        self.model: nn.Module = self.module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.module, device_ids=[self.device.index] if on_gpu else None,
                                                 find_unused_parameters=True)
        cfg = StepConfig(label_smoothing=t.label_smoothing, alpha_min=t.alpha_min, alpha_max=t.alpha_max,
                         alpha_clip=t.alpha_clip, amp_dtype=amp, channels_last=self.channels_last)
        self.runner = StepRunner(self.model, self.space, cfg, self.device, teacher=teacher,
                                 mixup=make_mixup(t.mixup_alpha, t.label_smoothing, self.space.num_classes),
                                 scaler=self.scaler)
        self.sampler.scores_from_training = self.runner.mixup is None and t.drop_path == 0
        self.report_archs = fixed_eval_archs(self.space, t.seed, draws=t.eval_subnets == "min+draw")
        self.eval_archs = {k: a for k, a in self.report_archs.items() if not k.endswith("/draw")}
        self.mlflow_run_id = mlflow_run_id
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.draw_digest = _Digest("")
        self.resumed_from: int | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._last_is_good = True

    # --- checkpoints ------------------------------------------------------------------------
    def _payload(self) -> dict[str, Any]:
        return {
            "kind": "last",
            "space": self.space.to_dict(),
            "params_hash": self.params_hash,
            "data_hash": self.data_hash,
            "sampler_name": self.t.sampler,
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "batch_in_epoch": self.step % self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "model": self.module.state_dict(),
            "ema": self.ema.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "sampler": self.sampler.state_dict(),
            "rng": ckpt_mod.capture_rng(),
            "history": self.history,
            "draw_digest": self.draw_digest.hexdigest(),
            "world_size": self.dist.world_size,
        }

    def save_last(self) -> None:
        """The rolling checkpoint (the one it replaces is kept: see `checkpoint.save_rolling`)."""
        if self.dist.is_main:
            ckpt_mod.save_rolling(self.last_path, self._payload(), keep_previous=self._last_is_good)
            self._last_is_good = True
            log.info("checkpoint %s at step %d", self.last_path, self.step)

    def try_resume(self) -> bool:
        if not self.resume:
            if self.dist.is_main:
                self.last_path.unlink(missing_ok=True)
                ckpt_mod.previous_path(self.last_path).unlink(missing_ok=True)
            return False
        if not ckpt_mod.rolling_exists(self.last_path):
            return False
        ck, source = ckpt_mod.load_rolling(self.last_path, space=self.space, expect_hash=self.params_hash)
        # a corrupt latest file must not be rotated over the good previous one on the next save
        self._last_is_good = source == self.last_path
        if int(ck.get("world_size", 1)) != self.dist.world_size:
            raise ckpt_mod.CheckpointError(
                f"{self.last_path} was written by a run on {ck.get('world_size')} processes, this run has "
                f"{self.dist.world_size}; the data shards would differ. Resume with the same number of "
                "processes, or start over with `evit train --fresh`")
        self.module.load_state_dict(ck["model"])
        self.ema.module.load_state_dict(ck["ema"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.sampler.load_state_dict(ck["sampler"])
        self.step = int(ck["step"])
        self.history = list(ck.get("history", []))
        self.draw_digest = _Digest(str(ck.get("draw_digest", "")))
        self._rng_to_restore = ck["rng"]
        self.resumed_from = self.step
        log.info("resuming %s from step %d/%d", source, self.step, self.total_steps)
        return True

    # --- evaluation -------------------------------------------------------------------------
    def evaluate(self, module: nn.Module, archs: dict[str, Arch] | None = None,
                 split: str = "search") -> dict[str, float]:
        t = self.t
        return {name: evaluate_subnet(module, arch, self.data, split, t.bn_calib_batches, t.batch_size, t.seed)
                for name, arch in (archs if archs is not None else self.eval_archs).items()}

    # --- the loop ---------------------------------------------------------------------------
    def _optimizer_step(self) -> None:
        from timm.utils import adaptive_clip_grad

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        adaptive_clip_grad(self.module.parameters(), clip_factor=self.t.agc_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _record(self, step_log: StepLog | None, mlflow: MlflowBatcher | None, record: dict[str, Any]) -> None:
        if step_log is not None:
            step_log.write(record)
        if mlflow is not None:
            mlflow.add(record["step"], {k: v for k, v in record.items()
                                        if k not in ("step", "epoch") and isinstance(v, (int, float))})

    def fit(self) -> FitResult:
        t0 = time.perf_counter()
        self.try_resume()
        main = self.dist.is_main
        step_log = StepLog(self.out_dir / STEP_LOG, self.resumed_from) if main else None
        mlflow = MlflowBatcher(self.mlflow_run_id, self.t.log_every) if (main and self.mlflow_run_id) else None
        bar = None
        if main and self.progress:
            from evit.progress import Progress

            bar = Progress(self.total_steps, f"train ({self.t.sampler})", unit="step", initial=self.step, logger=log)
        images_per_step = self.t.batch_size * self.dist.world_size
        self.module.train()
        meter = Throughput(self.device)
        trained_images = 0
        loop_t0 = time.perf_counter()
        try:
            while self.step < self.total_steps:
                epoch, first = divmod(self.step, self.steps_per_epoch)
                self.data_sampler.start(epoch, first * self.t.batch_size)
                # the loader's own generator (not the global RNG) seeds its workers: creating
                # the iterator must not move the global streams, or an epoch-boundary resume drifts
                self.loader.generator = torch.Generator().manual_seed(self.t.seed * 100_003 + epoch)
                batches = iter(self.loader)
                if self._rng_to_restore is not None:  # after the iterator exists: exactly the killed run's state
                    ckpt_mod.restore_rng(self._rng_to_restore)
                    self._rng_to_restore = None
                for b in range(first, self.steps_per_epoch):
                    step_t0 = time.perf_counter()
                    x, y = next(batches)
                    draws = self.sampler.step(self.step)
                    for d in draws:
                        self.draw_digest.update(d.arch.key.encode())
                    results = self.runner.run(x, y, draws)
                    ces = observe_step(self.sampler, self.module, self.runner, x, y, self.step, results,
                                       lambda v: all_reduce_mean(v, self.dist))
                    level = draws[0].level
                    if epoch < self.t.freeze_stem_epochs:  # no update, no weight decay: AdamW skips them
                        for p in self.stem_params:
                            p.grad = None
                    self._optimizer_step()
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.step += 1
                    self.scheduler.step_update(num_updates=self.step)
                    self.ema.update(self.module, step=self.step)
                    meter.add(images_per_step)
                    trained_images += images_per_step
                    if main:
                        record: dict[str, Any] = {"step": self.step, "epoch": epoch, "lr": lr,
                                                  "level": -1 if level is None else level,
                                                  "step_s": time.perf_counter() - step_t0,
                                                  **self.sampler.stats(self.step - 1)}
                        for r, ce in zip(results, ces):
                            record[f"loss/{r.draw.role}"] = r.loss
                            record[f"hard_ce/{r.draw.role}"] = ce
                            record[f"flops/{r.draw.role}"] = r.flops_m
                        if self.step % self.t.log_every == 0 or self.step == self.total_steps:
                            record["images_per_s"] = meter.rate()
                        self._record(step_log, mlflow, record)
                        if bar is not None:
                            bar.update(1, epoch=f"{epoch + 1}/{self.t.epochs}", level=record["level"],
                                       loss=f"{results[0].loss:.3f}")
                    epoch_end = b == self.steps_per_epoch - 1
                    if epoch_end and ((epoch + 1) % self.t.eval_every_epochs == 0 or self.step == self.total_steps):
                        self._epoch_eval(epoch, mlflow)
                    stop = cancel.requested()
                    if self.dist.enabled:  # every rank stops at the same step, or the barriers hang
                        flag = all_reduce_mean([0.0 if stop is None else float(stop)], self.dist)[0]
                        stop = None if flag == 0 else (stop or 15)
                    if stop is not None or self.step % self.t.checkpoint_every == 0 \
                            or self.step == self.total_steps:
                        if step_log is not None:
                            step_log.flush()
                        self.save_last()
                        barrier(self.dist)
                    if stop is not None:
                        raise cancel.Cancelled(stop, f"at step {self.step}/{self.total_steps}; checkpoint "
                                               f"{self.last_path} written, re-run to resume")
        finally:
            if bar is not None:
                bar.close()
            if step_log is not None:
                step_log.close()
            if mlflow is not None:
                mlflow.flush()
        train_seconds = time.perf_counter() - loop_t0
        self._check_ranks_agree()
        result = self._finish(train_seconds, trained_images, time.perf_counter() - t0)
        return result

    def _epoch_eval(self, epoch: int, mlflow: MlflowBatcher | None) -> None:
        if self.dist.is_main:
            t0 = time.perf_counter()
            top1 = self.evaluate(self.module)
            entry = {"epoch": epoch, "step": self.step, "top1": top1,
                     "top1_mean": sum(top1.values()) / max(1, len(top1))}
            self.history.append(entry)
            log.info("epoch %d/%d (step %d/%d): raw weights, search top-1 %s (mean %.4f, %.1fs)", epoch + 1,
                     self.t.epochs, self.step, self.total_steps, " ".join(f"{k}={v:.3f}" for k, v in top1.items()),
                     entry["top1_mean"], time.perf_counter() - t0)
            if mlflow is not None:
                mlflow.add(self.step, {f"top1/{k}": v for k, v in top1.items()} | {"top1/mean": entry["top1_mean"]})
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, entry)
        barrier(self.dist)

    def _check_ranks_agree(self) -> None:
        """Under DDP: all ranks must hold the same weights and have drawn the same subnets."""
        if not self.dist.enabled:
            return
        digest = int(self.draw_digest.hexdigest()[:12], 16)
        rows = all_gather_floats([_state_digest(self.module), _state_digest(self.ema.module), float(digest)],
                                 self.dist)
        if any(r[2] != rows[0][2] for r in rows):
            raise RuntimeError(f"DDP ranks drew different subnets (digests {[r[2] for r in rows]})")
        if any(r[:2] != rows[0][:2] for r in rows):
            raise RuntimeError(f"DDP ranks hold different weights (digests {[r[:2] for r in rows]})")
        log.info("all %d ranks agree on weights and sampled subnets", self.dist.world_size)

    def _finish(self, train_seconds: float, trained_images: int, wall: float) -> FitResult:
        """Evaluate raw and EMA weights, keep the better, write the final checkpoint (rank 0)."""
        main = self.dist.is_main
        summary: dict[str, Any] = {}
        banks: dict[str, Any] = {}
        if main:
            raw = self.evaluate(self.module)
            ema = self.evaluate(self.ema.module)
            raw_mean = sum(raw.values()) / max(1, len(raw))
            ema_mean = sum(ema.values()) / max(1, len(ema))
            use_ema = ema_mean > raw_mean
            chosen = self.ema.module if use_ema else self.module
            rest = {k: a for k, a in self.report_archs.items() if k not in self.eval_archs}
            top1 = {**(ema if use_ema else raw), **self.evaluate(chosen, rest)}
            top1 = {k: top1[k] for k in self.report_archs}
            sampler_state = self.sampler.state_dict()
            banks = banks_to_json(sampler_state, self.space) if "banks" in sampler_state else {}
            evaluation = {"split": "search", "raw": raw, "ema": ema, "raw_mean": raw_mean, "ema_mean": ema_mean,
                          "top1": top1, "archs": {k: a.to_dict() for k, a in self.report_archs.items()}}
            payload = {
                "kind": "final",
                "space": self.space.to_dict(),
                "params_hash": self.params_hash,
                "data_hash": self.data_hash,
                "sampler_name": self.t.sampler,
                "step": self.step,
                "model": chosen.state_dict(),
                "weights": "ema" if use_ema else "raw",
                "evaluation": evaluation,
                "sampler": sampler_state,
                "banks": banks,
                "history": self.history,
                "train": self.params.section("train"),
            }
            ckpt_mod.save_checkpoint(self.final_path, payload)
            summary = {
                "sampler": self.t.sampler,
                "steps": self.step,
                "epochs": self.t.epochs,
                "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.dist.world_size,
                "weights": "ema" if use_ema else "raw",
                "top1": top1,
                "top1_mean": sum(top1.values()) / max(1, len(top1)),
                "top1_raw_mean": raw_mean,
                "top1_ema_mean": ema_mean,
                "images_per_s": trained_images / train_seconds if train_seconds > 0 and trained_images else None,
                "train_seconds": train_seconds,
                "wall_seconds": wall,
                "resumed_from_step": self.resumed_from,
                "checkpoint": str(self.final_path),
                "data_hash": self.data_hash,
            }
            log.info("final: keeping the %s weights (search top-1 mean over the level min subnets: raw %.4f, "
                     "ema %.4f); their mean over all %d report subnets (min + one draw per level): %.4f",
                     summary["weights"], raw_mean, ema_mean, len(top1), summary["top1_mean"])
        barrier(self.dist)
        return FitResult(summary=summary, final_checkpoint=self.final_path, history=self.history, banks=banks,
                         step_log=self.out_dir / STEP_LOG)


class _Digest:
    """A rolling sha256 over the sampled arch keys; its state is its hex string (checkpointable)."""

    def __init__(self, state: str) -> None:
        self.state = state

    def update(self, data: bytes) -> None:
        self.state = hashlib.sha256(self.state.encode() + data).hexdigest()

    def hexdigest(self) -> str:
        return self.state


def fit(params: Params, **kwargs: Any) -> FitResult:
    """Train the supernet `params` describes (see `Trainer` for the keyword arguments)."""
    return Trainer(params, **kwargs).fit()
