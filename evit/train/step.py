"""One training step: forward + backward of every sampled subnet into one set of gradients.

The batch arrives at the space's largest resolution and is resized (bilinear,
antialiased) to each subnet's resolution, once per resolution. Supervised draws
(labels / mixup targets / teacher) come first; their detached softmax outputs are
averaged into the target of the distilled draws (alpha-divergence). Each draw's
backward runs right after its forward (activations are freed early); gradients
accumulate, and the caller takes ONE optimiser step. Under DDP the gradient all-reduce
happens once, on the last backward (`no_sync` for the others).

Each draw's hard-label CE (the bank score) comes from the same logits.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from evit import flops
from evit.arch import Arch
from evit.space import SearchSpace
from evit.train.losses import (
    AdaptiveAlphaDivergence,
    Teacher,
    label_smoothed_ce,
    soft_ce,
)
from evit.train.samplers import Draw, SubnetSampler


class HardMixup(Mixup):
    """timm Mixup (batch mode) that also returns the unsmoothed mixed target (for bank scores).

    Draws lambda from NumPy's global RNG, as timm's Mixup does (saved in checkpoints).
    """

    def __call__(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        if len(x) % 2:
            raise ValueError(f"mixup needs an even batch size, got {len(x)}")
        lam = self._mix_batch(x)
        soft = mixup_target(target, self.num_classes, lam, self.label_smoothing)
        hard = mixup_target(target, self.num_classes, lam, 0.0)
        return x, soft, hard


def make_mixup(alpha: float, label_smoothing: float, num_classes: int) -> HardMixup | None:
    if alpha <= 0:
        return None
    return HardMixup(mixup_alpha=alpha, cutmix_alpha=0.0, prob=1.0, mode="batch",
                     label_smoothing=label_smoothing, num_classes=num_classes)


def resize(x: Tensor, resolution: int, channels_last: bool = False) -> Tensor:
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    out = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


@dataclass
class DrawResult:
    draw: Draw
    loss: float
    """The value that was back-propagated (CE / soft CE; for distilled draws the divergence)."""
    hard_ce: float
    """Hard-label CE of this rank's batch (all-reduce before using it as a score)."""
    flops_m: float


@dataclass(frozen=True)
class StepConfig:
    label_smoothing: float = 0.1
    alpha_min: float = -1.0
    alpha_max: float = 1.0
    alpha_clip: float = 5.0
    amp_dtype: torch.dtype | None = None
    """Autocast dtype (None: full float32)."""
    channels_last: bool = False


class StepRunner:
    """Runs the forward/backward passes of one step's draws (no optimiser step)."""

    def __init__(self, model: nn.Module, space: SearchSpace, cfg: StepConfig, device: torch.device, *,
                 teacher: Teacher | None = None, mixup: HardMixup | None = None,
                 scaler: Any | None = None) -> None:
        self.model = model
        """The module to call: the DDP wrapper under torchrun, else the supernet."""
        self.space = space
        self.cfg = cfg
        self.device = device
        self.teacher = teacher
        self.mixup = mixup
        self.scaler = scaler
        self.kd = AdaptiveAlphaDivergence(cfg.alpha_min, cfg.alpha_max, cfg.alpha_clip)
        self._flops: dict[Arch, float] = {}

    def flops_m(self, arch: Arch) -> float:
        f = self._flops.get(arch)
        if f is None:
            f = self._flops[arch] = flops.flops_m(arch, self.space)
        return f

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.cfg.amp_dtype)

    def prepare(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Move to device, apply mixup: (inputs, training target, hard target for scores)."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:  # timm mixes in place: keep the caller's batch (re-scoring uses it)
            x, soft, hard = self.mixup(x.clone(), y)
            return x, soft, hard
        return x, y, y

    def run(self, x: Tensor, y: Tensor, draws: Sequence[Draw]) -> list[DrawResult]:
        x, target, hard = self.prepare(x, y)
        teacher_probs = None
        if self.teacher is not None:
            with self.autocast():
                teacher_probs = self.teacher.probs(x).float()
        inputs: dict[int, Tensor] = {}
        sup_probs: list[Tensor] = []
        losses: list[Tensor] = []
        scores: list[Tensor] = []
        ddp = isinstance(self.model, DistributedDataParallel)
        for i, d in enumerate(draws):
            res = d.arch.resolution
            if res not in inputs:
                inputs[res] = resize(x, res, self.cfg.channels_last)
            last = i == len(draws) - 1
            sync = contextlib.nullcontext() if (last or not ddp) else self.model.no_sync()  # type: ignore[operator]
            with sync:
                with self.autocast():
                    logits = self.model(inputs[res], d.arch)
                logits = logits.float()
                if d.distill:
                    if not sup_probs:
                        raise ValueError(f"draw {d.role!r} is distilled but no supervised draw came before it")
                    kd_target = torch.stack(sup_probs).mean(0)
                    loss, value = self.kd(logits, kd_target)
                else:
                    if teacher_probs is not None:
                        loss = soft_ce(logits, teacher_probs)
                    else:
                        loss = label_smoothed_ce(logits, target, self.cfg.label_smoothing)
                    value = loss.detach()
                    sup_probs.append(torch.softmax(logits.detach(), dim=-1))
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            losses.append(value)
            with torch.no_grad():
                scores.append(_hard_ce_tensor(logits.detach(), hard))
        vals = torch.stack([torch.stack(losses), torch.stack(scores)]).cpu().tolist()
        return [DrawResult(d, float(lv), float(sv), self.flops_m(d.arch))
                for d, lv, sv in zip(draws, vals[0], vals[1], strict=True)]


def _hard_ce_tensor(logits: Tensor, hard: Tensor) -> Tensor:
    if hard.dtype.is_floating_point:
        return torch.sum(-hard * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, hard)


@contextlib.contextmanager
def frozen_buffers(module: nn.Module):
    """Restore every buffer (BN running stats and counters) of `module` on exit."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


@torch.no_grad()
def score_archs(module: nn.Module, runner: StepRunner, x: Tensor, y: Tensor, archs: Sequence[Arch]) -> list[float]:
    """Hard-label CE of `archs` on one batch, measured like the training forward.

    Train mode (BN on batch statistics, as when the scores in the banks were taken),
    but without gradients and with every buffer restored afterwards, so the supernet's
    BN running statistics are untouched. Drop-path draws use a forked RNG.
    """
    x = x.to(runner.device, non_blocking=True)
    y = y.to(runner.device, non_blocking=True)
    out: list[float] = []
    was_training = module.training
    module.train()
    devices = [runner.device.index or 0] if runner.device.type == "cuda" else []
    try:
        with frozen_buffers(module), torch.random.fork_rng(devices=devices):
            for arch in archs:
                xi = resize(x, arch.resolution, runner.cfg.channels_last)
                with runner.autocast():
                    logits = module(xi, arch)
                out.append(float(F.cross_entropy(logits.float(), y)))
    finally:
        module.train(was_training)
    return out


def observe_step(sampler: SubnetSampler, module: nn.Module, runner: StepRunner, x: Tensor, y: Tensor,
                 step_idx: int, results: Sequence[DrawResult],
                 reduce: Callable[[list[float]], list[float]] = list) -> list[float]:
    """Hand a trained step to the sampler: its draws' CE plus the scores it asks for.

    `x`, `y` are the step's batch before mixup; `reduce` averages over ranks (the
    all-reduce under DDP; every rank asks for the same archs, the banks being equal).
    Call before the optimiser step, so scores see the weights the draws trained.
    Returns the per-draw CE after `reduce`.
    """
    ces = reduce([r.hard_ce for r in results])
    wanted = sampler.to_score(step_idx)
    fresh = dict(zip(wanted, reduce(score_archs(module, runner, x, y, wanted)), strict=True)) if wanted else {}
    sampler.observe(step_idx, [(r.draw, ce) for r, ce in zip(results, ces, strict=True)], fresh)
    return ces


class Throughput:
    """Images per second over a window of steps (synchronising CUDA before reading the clock)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.t0 = time.perf_counter()
        self.images = 0

    def add(self, images: int) -> None:
        self.images += images

    def rate(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self.t0
        r = self.images / dt if dt > 0 else 0.0
        self.t0, self.images = time.perf_counter(), 0
        return r

