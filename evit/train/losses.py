"""Training losses of one step, and the optional teacher.

- Level subnets (and the largest of the sandwich rule): label-smoothed cross-entropy
  against the labels, soft-target cross-entropy against timm's mixup targets when mixup
  is on, or soft cross-entropy against a teacher's softmax(logits / T) when
  `train.teachers` are configured (their probabilities averaged).
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
    """Frozen timm classifiers; `probs(x)` = the mean over them of softmax(logits_i / T_i).

    One teacher is the common case; the paper averages two (swsl_resnext101_32x4d and
    _32x8d at temperature 0.2), which is what a list in `train.teachers` gives.
    """

    def __init__(self, model: nn.Module | list[nn.Module], temperature: float | list[float]) -> None:
        super().__init__()
        models = model if isinstance(model, list) else [model]
        temps = temperature if isinstance(temperature, list) else [temperature] * len(models)
        if len(temps) != len(models) or not models:
            raise ValueError("one temperature per teacher model")
        self.models = nn.ModuleList(m.eval().requires_grad_(False) for m in models)
        self.temperatures = [float(t) for t in temps]

    @property
    def model(self) -> nn.Module:
        """The first (often only) teacher model."""
        return self.models[0]

    def train(self, mode: bool = True) -> Teacher:  # always eval (BN/dropout frozen)
        super().train(False)
        return self

    @torch.no_grad()
    def probs(self, x: Tensor) -> Tensor:
        out = None
        for m, t in zip(self.models, self.temperatures):
            p = torch.softmax(m(x).float() / t, dim=-1)
            out = p if out is None else out + p
        assert out is not None
        return out / len(self.models)


def _where(index: int | None) -> str:
    return "train.teachers" if index is None else f"train.teachers[{index}]"


def _teacher_model(teacher_params: Any, num_classes: int, where: str) -> nn.Module:
    """One frozen timm model: local state_dict (`weights`) or the hub's pretrained weights (weights: null)."""
    import timm

    name, weights = teacher_params.model, teacher_params.weights
    if weights is None:  # online: timm's pretrained weights from the Hugging Face hub
        try:
            model = timm.create_model(name, pretrained=True)
        except RuntimeError as exc:
            raise ConfigError(f"{where}.model = {name!r} is not a timm model ({exc}); "
                              "accepted: any name from timm.list_models()") from None
        except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
            raise ConfigError(f"{where}: could not download the pretrained weights of {name!r} "
                              f"({type(exc).__name__}: {str(exc)[:200]}); offline, set {where}.weights to a "
                              "local state_dict file") from None
        got = getattr(model, "num_classes", None)
        if got != num_classes:
            raise ConfigError(f"{where}: the pretrained {name!r} predicts {got} classes but the data has "
                              f"{num_classes}; give fine-tuned weights in {where}.weights")
        return model
    path = Path(weights)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    except RuntimeError as exc:
        raise ConfigError(f"{where}.model = {name!r} is not a timm model ({exc}); "
                          "accepted: any name from timm.list_models()") from None
    if not path.is_file():
        raise ConfigError(f"{where}.weights = {str(path)!r} does not exist; give a local "
                          "state_dict file of the teacher, or weights: null to download the hub's")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for bad files
        raise CheckpointError(f"teacher weights {str(path)!r} are unreadable ({exc})") from None
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    head = f"{model.pretrained_cfg.get('classifier', '')}.weight"
    if isinstance(state, dict) and isinstance(state.get(head), torch.Tensor) and state[head].shape[0] != num_classes:
        raise CheckpointError(f"teacher weights {str(path)!r} do not fit: {name!r} there predicts "
                              f"{state[head].shape[0]} classes, the data has {num_classes}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"teacher weights {str(path)!r} do not fit timm model {name!r} with "
                              f"{num_classes} classes: {str(exc)[:500]}") from None
    return model


def load_teacher(teacher_params: Any, num_classes: int, index: int | None = None) -> Teacher:
    """One `train.teachers` entry -> a frozen timm teacher (see `load_teachers`)."""
    model = _teacher_model(teacher_params, num_classes, _where(index))
    return Teacher(model, teacher_params.temperature)


def load_teachers(teachers: Any, num_classes: int) -> Teacher | None:
    """`train.teachers` -> one averaging teacher, or None for an empty list.

    Each entry is a timm model name with a local state_dict (`weights`, optionally under a
    "state_dict", "model" or "state_dict_ema" key, loaded with weights_only=True) or, with
    `weights: null`, timm's pretrained weights from the hub (online). Every teacher must
    predict the data's classes; any problem is a ConfigError/CheckpointError naming the entry.
    """
    if not teachers:
        return None
    models = [_teacher_model(tp, num_classes, _where(i)) for i, tp in enumerate(teachers)]
    return Teacher(models, [tp.temperature for tp in teachers])
