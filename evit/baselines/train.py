"""Train one standalone timm model with the supernet's recipe and epoch budget.

Same as `evit.train.loop.Trainer` wherever the two can be the same, so that the
comparison measures the method and not the recipe: the `train` section's batch size,
learning rate, weight decay (none on 1-D parameters), warm-up + cosine schedule stepped
per update, adaptive gradient clipping, label smoothing, mixup, model EMA (and, as for the
supernet, the better of EMA and raw weights on the `search` split is kept), the same
loader, augmentation and seeded data order, the same number of optimiser steps per epoch.
What differs by nature: one model per step instead of four subnets.

Resume: a checkpoint after every epoch (`<name>.last.pt`); a killed run continues from
the last finished epoch (each epoch reseeds the global RNGs from (seed, epoch), so the
continuation is the same run). The final file (`<name>.pt`) carries a hash of everything
that shapes the weights, so a finished model with the same settings is reused.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evit.evaluate import eval_source, evaluate_top1
from evit.io import atomic_path, sha256_json
from evit.train.checkpoint import recipe
from evit.train.step import make_mixup

log = logging.getLogger(__name__)


@dataclass
class TrainedBaseline:
    model: nn.Module
    weights: str
    """"ema" or "raw": which weights were kept (the better on the search split)."""
    search_top1: float
    train_seconds: float
    steps: int
    reused: bool


def baseline_hash(train_section: dict[str, Any], name: str, resolution: int, epochs: int, data_hash: str) -> str:
    train = {k: v for k, v in recipe(train_section).items() if k != "sampler"}
    return sha256_json({"train": train, "model": name, "resolution": resolution, "epochs": epochs, "data": data_hash})


def _save(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated/corrupt file is retrained, never trusted
        log.warning("ignoring unreadable checkpoint %s (%s)", path, exc)
        return None


def train_baseline(model: nn.Module, name: str, data: Any, t: Any, *, resolution: int, epochs: int,
                   out_dir: Path, expect_hash: str, progress: bool = True) -> TrainedBaseline:
    """Train (or reuse / resume) `model` on the `train` split; returns the kept weights."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3, adaptive_clip_grad
    from tqdm.auto import tqdm

    final, last = out_dir / f"{name}.pt", out_dir / f"{name}.last.pt"
    done = _load(final) if final.is_file() else None
    if done is not None and done.get("hash") == expect_hash:
        model.load_state_dict(done["model"])
        model.to("cpu")
        log.info("baseline %s: reusing %s", name, final)
        return TrainedBaseline(model.eval(), str(done["weights"]), float(done["search_top1"]),
                               float(done["train_seconds"]), int(done["steps"]), True)

    if t.threads is not None:
        torch.set_num_threads(t.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if t.device == "auto" else t.device)
    model.to(device)
    torch.manual_seed(t.seed)
    aug = {"auto_augment": t.auto_augment, "re_prob": t.reprob, "hflip": t.hflip}
    loader = data.loader("train", resolution=resolution, batch_size=t.batch_size, train=True, seed=t.seed,
                         workers=t.workers, aug=aug, drop_last=True)
    steps_per_epoch = min(t.steps_per_epoch or len(loader), len(loader))
    total = epochs * steps_per_epoch
    groups = param_groups_weight_decay(model, t.weight_decay)
    opt = create_optimizer_v2(groups, opt="adamw", lr=t.lr, weight_decay=t.weight_decay)
    warmup = min(t.warmup_epochs * steps_per_epoch, max(0, total - 1))
    sched = CosineLRScheduler(opt, t_initial=max(1, total - warmup), lr_min=t.min_lr, warmup_t=warmup,
                              warmup_lr_init=t.min_lr, warmup_prefix=True, t_in_epochs=False)
    ema = ModelEmaV3(model, decay=t.ema_decay, use_warmup=True)
    mixup = make_mixup(t.mixup_alpha, t.label_smoothing, int(data.num_classes))

    start_epoch, seconds = 0, 0.0
    part = _load(last) if last.is_file() else None
    if part is not None and part.get("hash") == expect_hash:
        model.load_state_dict(part["model"])
        ema.module.load_state_dict(part["ema"])
        opt.load_state_dict(part["optimizer"])
        sched.load_state_dict(part["scheduler"])
        start_epoch, seconds = int(part["epoch"]), float(part["train_seconds"])
        log.info("baseline %s: resuming after epoch %d", name, start_epoch)

    step = start_epoch * steps_per_epoch
    bar = tqdm(total=total, initial=step, desc=f"baseline {name}", unit="step", leave=False,
               disable=None if progress else True)
    model.train()
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        torch.manual_seed(hash((t.seed, epoch)) & 0x7FFFFFFF)
        loader.sampler.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            if i >= steps_per_epoch:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mixup is not None:
                x, soft, _hard = mixup(x, y)
                loss = torch.sum(-soft * F.log_softmax(model(x), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(model(x), y, label_smoothing=t.label_smoothing)
            loss.backward()
            adaptive_clip_grad(model.parameters(), clip_factor=t.agc_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            sched.step_update(step)
            ema.update(model, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        seconds += time.perf_counter() - t0
        _save(last, {"hash": expect_hash, "epoch": epoch + 1, "train_seconds": seconds,
                     "model": model.state_dict(), "ema": ema.module.state_dict(),
                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    bar.close()

    src = eval_source(data, "search", resolution, 256)
    raw_acc = evaluate_top1(model, src)
    ema_acc = evaluate_top1(ema.module, src)
    use_ema = ema_acc > raw_acc
    kept = (ema.module if use_ema else model).to("cpu")
    _save(final, {"hash": expect_hash, "name": name, "weights": "ema" if use_ema else "raw",
                  "search_top1": max(raw_acc, ema_acc), "train_seconds": seconds, "steps": total,
                  "resolution": resolution, "model": kept.state_dict()})
    last.unlink(missing_ok=True)
    log.info("baseline %s: %d steps in %.0fs, search top-1 raw %.4f / ema %.4f", name, total, seconds, raw_acc, ema_acc)
    return TrainedBaseline(kept.eval(), "ema" if use_ema else "raw", max(raw_acc, ema_acc), seconds, total, False)
