"""Evaluating subnets of a supernet: BN recalibration, then top-1 (train, search, export, baselines).

A supernet's BatchNorm running statistics are a blend over every subnet it trained, so
they fit no single subnet. Before any evaluation a subnet is extracted as a static copy
(`evit.nn.static.extract`), its BN statistics are reset and re-estimated as a
cumulative average over a few training batches (`recalibrate_bn`), and only then is it
evaluated (`evaluate_top1`). The supernet itself is never modified.

Calibration batches (the same for every subnet, for a given seed):
- small splits (held in memory): a seeded random subset of the train split without
  augmentation, resized like the eval transform;
- large splits: the first batches of a seeded, augmented train loader (the reference
  recalibrates on augmented training batches).
Everything here leaves the global RNG streams untouched (it runs under a forked RNG),
so an evaluation in the middle of training does not change the training run.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from evit.arch import Arch
from evit.nn.static import extract

IN_MEMORY_BYTES = 512 * 2**20
"""A split whose float tensors at the eval resolution fit in this many bytes is held in memory."""
_TENSOR_CACHE: dict[tuple[str, str, int], tuple[Tensor, Tensor]] = {}
_TENSOR_CACHE_MAX = 8

Batches = Iterable[tuple[Tensor, Tensor]] | tuple[Tensor, Tensor]


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without consuming Python's, NumPy's or torch's (CPU + CUDA) global RNGs."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _iter_batches(source: Batches, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], Tensor):
        x, y = source
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
    else:
        yield from source  # type: ignore[misc]


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, source: Batches, batches: int, *, batch_size: int = 256,
                   forward: Callable[[Tensor], Tensor] | None = None) -> int:
    """Reset every BatchNorm's running stats and re-estimate them over `batches` batches.

    Cumulative average (momentum None), the model in eval mode except its BN layers (so
    dropout / drop-path do not disturb the statistics). `source` is a DataLoader /
    iterable of (x, y) or an (x, y) pair of tensors cut into `batch_size` chunks.
    Returns the number of batches used. The model is left in eval mode.
    """
    bns = _bn_modules(model)
    model.eval()
    if not bns:
        return 0
    device = next(model.parameters()).device
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    run = forward or model
    used = 0
    try:
        for x, _ in _iter_batches(source, batch_size):
            if used >= batches:
                break
            run(x.to(device, non_blocking=True))
            used += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    return used


@torch.no_grad()
def evaluate_top1(model: nn.Module, source: Batches, *, batch_size: int = 256,
                  forward: Callable[[Tensor], Tensor] | None = None) -> float:
    """Top-1 accuracy in [0, 1] of `model` (eval mode) over all of `source`."""
    model.eval()
    device = next(model.parameters()).device
    run = forward or model
    correct = total = 0
    for x, y in _iter_batches(source, batch_size):
        logits = run(x.to(device, non_blocking=True))
        correct += int((logits.argmax(dim=-1).cpu() == y.cpu()).sum())
        total += int(y.numel())
    if total == 0:
        raise ValueError("evaluate_top1: the evaluation data is empty")
    return correct / total


# --- data for evaluation ----------------------------------------------------------------------------

def _split_size(data: Any, split: str) -> int:
    counts = data.counts(split)
    return int(sum(counts.values())) if isinstance(counts, dict) else int(counts)


def fits_in_memory(data: Any, split: str, resolution: int) -> bool:
    return _split_size(data, split) * 3 * resolution * resolution * 4 <= IN_MEMORY_BYTES


def split_tensors(data: Any, split: str, resolution: int) -> tuple[Tensor, Tensor]:
    """`data.tensors(split, resolution)`, cached per (data path, split, resolution)."""
    key = (f"{data.path}:{getattr(data, 'content_hash', '')}", split, resolution)
    hit = _TENSOR_CACHE.get(key)
    if hit is None:
        if len(_TENSOR_CACHE) >= _TENSOR_CACHE_MAX:
            _TENSOR_CACHE.pop(next(iter(_TENSOR_CACHE)))
        hit = _TENSOR_CACHE[key] = data.tensors(split, resolution)
    return hit


def calibration_batches(data: Any, resolution: int, batches: int, batch_size: int, seed: int) -> Batches:
    """The BN calibration batches of the train split (see the module docstring)."""
    if fits_in_memory(data, "train", resolution):
        x, y = split_tensors(data, "train", resolution)
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(x), generator=g)[: batches * batch_size]
        return x[idx], y[idx]
    loader = data.loader("train", resolution=resolution, batch_size=batch_size, train=True, seed=seed)
    return loader


def eval_source(data: Any, split: str, resolution: int, batch_size: int) -> Batches:
    if fits_in_memory(data, split, resolution):
        return split_tensors(data, split, resolution)
    return data.loader(split, resolution=resolution, batch_size=batch_size, train=False, seed=0)


def evaluate_subnet(supernet: nn.Module, arch: Arch, data: Any, split: str, bn_batches: int,
                    batch_size: int, seed: int) -> float:
    """Top-1 in [0, 1] of subnet `arch` on `split`, after BN recalibration on the train split.

    Works on an extracted static copy (the supernet is untouched) on the supernet's
    device, in float32, without consuming the global RNG streams. Deterministic for a
    given (weights, arch, data, bn_batches, batch_size, seed).
    """
    with isolated_rng():
        net = calibrated_static(supernet, arch, data, bn_batches=bn_batches, batch_size=batch_size, seed=seed)
        return split_top1(net, data, split, arch.resolution, batch_size)


def evaluate_archs(supernet: nn.Module, archs: dict[str, Arch], data: Any, split: str, bn_batches: int,
                   batch_size: int, seed: int) -> dict[str, float]:
    """`evaluate_subnet` for named archs (e.g. "level0/min") -> name: top-1."""
    return {name: evaluate_subnet(supernet, arch, data, split, bn_batches, batch_size, seed)
            for name, arch in archs.items()}


def calibrated_static(supernet: Any, arch: Arch, data: Any, *, bn_batches: int, batch_size: int, seed: int) -> Any:
    """The static subnet of `arch` with BN statistics re-estimated exactly as fitness does.

    `evaluate_subnet` recalibrates BN on a throw-away copy; the final evaluation, the latency
    measurement and the export must use the same calibrated weights, or the exported model
    would not be the one whose accuracy the search reported.
    """
    with isolated_rng():
        net = extract(supernet, arch).float()
        calib = calibration_batches(data, arch.resolution, bn_batches, batch_size, seed)
        recalibrate_bn(net, calib, bn_batches, batch_size=batch_size)
    return net.eval()


def split_top1(module: Any, data: Any, split: str, resolution: int, batch_size: int) -> float:
    """Top-1 in [0, 1] of a (static, calibrated) module on a data split."""
    return float(evaluate_top1(module, eval_source(data, split, resolution, batch_size), batch_size=batch_size))
