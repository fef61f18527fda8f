"""Gradient conflict between subnets: what complexity-aware sampling is meant to reduce.

For a few consecutive steps of a sampler, every draw gets its own backward pass (same
weights, nothing is updated) and its gradient on the shared weights is kept. Then:
- same step: cosine similarity of every pair of draws of one step (one batch);
- adjacent steps: cosine similarity of every (draw of step t, draw of step t+1) pair
  (batches t and t+1), which is what the weights feel from one update to the next.
The cosine of a pair is taken only over the weight elements both subnets touch (both
gradients non-zero; a slice the smaller subnet does not use has an exactly zero
gradient), so a narrow subnet is not reported as "orthogonal" merely for using fewer
channels. The loss of every draw is the hard-label CE, the same for every sampler, so
the numbers reflect which subnets a sampler trains together, not its loss mix.

Runs on a copy of the supernet (BN statistics untouched), in train mode like training,
with the global RNG streams isolated.
"""

from __future__ import annotations

import copy
import itertools
import statistics
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evit.arch import Arch
from evit.evaluate import isolated_rng
from evit.train.samplers import Draw, SubnetSampler
from evit.train.step import resize


def _flat_grad(params: Sequence[nn.Parameter]) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten() for p in params])


def masked_cosine(a: Tensor, b: Tensor) -> float | None:
    """Cosine similarity over the elements where both vectors are non-zero (None if none are)."""
    mask = (a != 0) & (b != 0)
    if not bool(mask.any()):
        return None
    aa, bb = a[mask].double(), b[mask].double()
    denom = aa.norm() * bb.norm()
    return float(aa.dot(bb) / denom) if denom > 0 else None


def draw_gradients(model: nn.Module, draws: Sequence[Draw], x: Tensor, y: Tensor) -> tuple[list[Tensor], list[float]]:
    """One separate backward pass per draw: (flattened gradients, hard-label CE values)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads, ces = [], []
    for d in draws:
        model.zero_grad(set_to_none=True)
        logits = model(resize(x, d.arch.resolution), d.arch)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        grads.append(_flat_grad(params))
        ces.append(float(loss.detach()))
    model.zero_grad(set_to_none=True)
    return grads, ces


@torch.no_grad()
def hard_ces(model: nn.Module, archs: Sequence[Arch], x: Tensor, y: Tensor) -> list[float]:
    """Hard-label CE of `archs` on one batch (no gradients): the bank scores a sampler asks for."""
    return [float(F.cross_entropy(model(resize(x, a.resolution), a).float(), y)) for a in archs]


def _summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def measure_conflict(supernet: nn.Module, sampler: SubnetSampler, batches: Sequence[tuple[Tensor, Tensor]],
                     start_step: int = 0) -> dict[str, Any]:
    """Same-step and adjacent-step gradient cosines of `sampler`'s draws on `batches` (one per step).

    `sampler` is advanced (pass a copy to keep the original). Elastic samplers observe
    the draws' CE and the scores they ask for as in training, so their banks evolve as
    they would.
    """
    device = next(supernet.parameters()).device
    model = copy.deepcopy(supernet).train()
    same: list[float] = []
    adjacent: list[float] = []
    previous: list[Tensor] | None = None
    with isolated_rng():
        for i, (x, y) in enumerate(batches):
            x, y = x.to(device), y.to(device)
            draws = sampler.step(start_step + i)
            grads, ces = draw_gradients(model, draws, x, y)
            wanted = sampler.to_score(start_step + i)
            sampler.observe(start_step + i, list(zip(draws, ces)), dict(zip(wanted, hard_ces(model, wanted, x, y))))
            for ga, gb in itertools.combinations(grads, 2):
                c = masked_cosine(ga, gb)
                if c is not None:
                    same.append(c)
            if previous is not None:
                for ga, gb in itertools.product(previous, grads):
                    c = masked_cosine(ga, gb)
                    if c is not None:
                        adjacent.append(c)
            previous = grads
    return {"same_step": _summary(same), "adjacent_step": _summary(adjacent), "steps": len(batches)}
