"""The baseline models: timm names, built from scratch (no download), with their cost.

MACs are counted with `torch.utils.flop_counter` on one forward pass at the baseline
resolution (FLOPs / 2). The supernet's own counter (`evit.flops`) is analytic and knows
only this project's architecture family, so it cannot count a timm model; the two
conventions agree on convolutions and linear layers (what dominates both), which is what
the FLOPs-budget rows of the comparison rely on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from evit.config import ConfigError


@dataclass(frozen=True)
class ModelCost:
    macs_m: float
    params_m: float


def check_model_names(names: Sequence[str]) -> None:
    """One clear error naming every unknown timm model (before any training)."""
    import timm

    bad = [n for n in names if not timm.is_model(n)]
    if bad:
        raise ConfigError(f"baselines.models: unknown timm model(s) {bad}; any name from `timm.list_models()` "
                          "is accepted, e.g. mobilenetv3_small_050, mobilenetv3_large_100, lcnet_100, mobilevit_xxs")


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised timm model (pretrained weights are never fetched)."""
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def model_cost(model: nn.Module, resolution: int) -> ModelCost:
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, resolution, resolution, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return ModelCost(macs_m=counter.get_total_flops() / 2e6,
                     params_m=sum(p.numel() for p in model.parameters()) / 1e6)
