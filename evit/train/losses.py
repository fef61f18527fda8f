"""Training losses of one step, and the optional teacher.

- Level subnets (and the largest of the sandwich rule): label-smoothed cross-entropy
  against the labels, soft-target cross-entropy against timm's mixup targets when mixup
  is on, or soft cross-entropy against a teacher's softmax(logits / T) when
  `train.teacher` is configured.
- Distilled subnets (the level's min subnet; the sandwich rule's smaller subnets):
  AlphaNet's adaptive alpha-divergence against the detached mean prediction of the
  step's supervised subnets: alpha in {alpha_min, alpha_max}, per sample keep the
  divergence that is larger, importance ratio clipped at `alpha_clip` (for alpha not in
  {0, 1}, as in AlphaNet's `f_divergence`). The loss returned is AlphaNet's surrogate,
  whose gradient is the divergence's; the divergence itself is returned for logging.
- Bank scores: the hard-label CE from the same logits (`hard_ce`), never a new forward.

All losses are computed in float32 from logits that may come out of bf16 autocast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evit.config import ConfigError
from evit.errors import CheckpointError


def label_smoothed_ce(logits: Tensor, target: Tensor, smoothing: float) -> Tensor:
    """Mean CE; `target` is class indices, or a (B, C) soft target (mixup/teacher)."""
    logits = logits.float()
    if target.dtype.is_floating_point:
        return soft_ce(logits, target)
    return F.cross_entropy(logits, target, label_smoothing=smoothing)


def soft_ce(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Mean of -sum(p * log softmax(logits)) over the batch."""
    return torch.sum(-target_probs.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


@torch.no_grad()
def hard_ce(logits: Tensor, target: Tensor) -> float:
    """Hard-label CE (no smoothing) as a float: a bank score is its negative.

    `target` is class indices, or the unsmoothed mixed one-hot under mixup.
    """
    logits = logits.detach().float()
    if target.dtype.is_floating_point:
        return float(soft_ce(logits, target))
    return float(F.cross_entropy(logits, target))


def _f_divergence(q_logits: Tensor, p_prob: Tensor, alpha: float, clip: float) -> tuple[Tensor, Tensor]:
    """Per-sample alpha-divergence D_alpha(p || q) and AlphaNet's gradient surrogate.

    Gradients flow only through log q; the importance ratio p/q is computed from log
    probabilities so that zero probabilities give 0 (not NaN) in the alpha=1 case.
    """
    q_log = F.log_softmax(q_logits.float(), dim=1)
    q_prob = q_log.exp().detach()
    p_prob = p_prob.detach().float()
    log_ratio = torch.log(p_prob) - q_log.detach()
    ratio = torch.exp(log_ratio)
    if abs(alpha) < 1e-3:
        ratio = ratio.clamp(0, clip)
        f = -torch.log(ratio)
        f_base = 0.0
        rho = torch.log(ratio) - 1.0
    elif abs(alpha - 1.0) < 1e-3:
        f = torch.xlogy(ratio, ratio)
        f_base = 0.0
        rho = ratio
    else:
        iw = torch.exp(alpha * log_ratio).clamp(0, clip)
        f = iw / alpha / (alpha - 1.0)
        f_base = 1.0 / alpha / (alpha - 1.0)
        rho = iw / alpha + f_base
    divergence = torch.sum(q_prob * (f - f_base), dim=1)
    surrogate = -torch.sum(q_prob * rho * q_log, dim=1)
    return divergence, surrogate


class AdaptiveAlphaDivergence(nn.Module):
    """AlphaNet's AdaptiveLossSoft: per sample, the larger of D_alpha_min and D_alpha_max.

    forward(student_logits, teacher_probs) -> (loss to backprop, mean divergence value).
    """

    def __init__(self, alpha_min: float = -1.0, alpha_max: float = 1.0, clip: float = 5.0) -> None:
        super().__init__()
        self.alpha_min, self.alpha_max, self.clip = float(alpha_min), float(alpha_max), float(clip)

    def forward(self, logits: Tensor, target_probs: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        d_lo, s_lo = _f_divergence(logits, target_probs, self.alpha_min, self.clip)
        d_hi, s_hi = _f_divergence(logits, target_probs, self.alpha_max, self.clip)
        pick_lo = (d_lo > d_hi).float()
        surrogate = pick_lo * s_lo + (1.0 - pick_lo) * s_hi
        return surrogate.mean(), torch.maximum(d_lo, d_hi).mean().detach()


# --- teacher ---------------------------------------------------------------------------------------

class Teacher(nn.Module):
    """A frozen timm classifier; `probs(x)` = softmax(logits / temperature)."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.temperature = temperature

    def train(self, mode: bool = True) -> Teacher:  # always eval (BN/dropout frozen)
        super().train(False)
        return self

    @torch.no_grad()
    def probs(self, x: Tensor) -> Tensor:
        return torch.softmax(self.model(x).float() / self.temperature, dim=-1)


def load_teacher(teacher_params: Any, num_classes: int) -> Teacher:
    """`train.teacher` -> a frozen timm model with local weights (nothing is downloaded).

    The weights file is a state_dict (optionally under a "state_dict", "model" or
    "state_dict_ema" key), loaded with weights_only=True.
    """
    import timm

    name, weights = teacher_params.model, Path(teacher_params.weights)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    except RuntimeError as exc:
        raise ConfigError(f"train.teacher.model = {name!r} is not a timm model ({exc}); "
                          "accepted: any name from timm.list_models()") from None
    if not weights.is_file():
        raise ConfigError(f"train.teacher.weights = {str(weights)!r} does not exist; give a local "
                          "state_dict file of the teacher (nothing is downloaded)")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for bad files
        raise CheckpointError(f"teacher weights {str(weights)!r} are unreadable ({exc})") from None
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"teacher weights {str(weights)!r} do not fit timm model {name!r} with "
                              f"{num_classes} classes: {str(exc)[:500]}") from None
    return Teacher(model, teacher_params.temperature)
