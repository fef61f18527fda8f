"""The analytic counter (`evit.flops`) against a hook-based count of the real forward pass.

Hooks sit on the modules that do multiply-accumulates under the documented convention:
`nn.Conv2d` (incl. depthwise, SE and shortcut convs), `nn.Linear`, the attention's two
`MatMul` modules (Q.K^T and A.V) and its `nn.Softmax` (one MAC per score). Everything else
(norms, activations, pooling, adds, the bias gather) is not counted by the convention,
so hooks on those would only restate it. The check runs block by block (so a mismatch
names the block) and in total, for uniform draws of both presets plus their extremes.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import torch
from torch import nn

from evit.arch import Arch
from evit.blocks import arch_blocks
from evit.flops import block_flops, block_params, count
from evit.nn.common import MatMul
from evit.nn.static import StaticSubnet
from evit.space import CPU, IMAGENET, SearchSpace


class MacCounter:
    """Forward hooks that add up MACs per sample from the real tensors' shapes."""

    def __init__(self, model: nn.Module) -> None:
        self.macs = 0
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, (nn.Conv2d, nn.Linear, MatMul, nn.Softmax))]

    def _hook(self, m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        batch = inputs[0].shape[0]
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            macs = out.numel() * (m.in_channels // m.groups) * kh * kw
        elif isinstance(m, nn.Linear):
            macs = out.numel() * m.in_features
        elif isinstance(m, MatMul):
            a, b = inputs
            macs = math.prod(out.shape) * a.shape[-1]
            assert a.shape[-1] == b.shape[-2]
        else:
            macs = out.numel()
        assert macs % batch == 0
        self.macs += macs // batch

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _archs(space: SearchSpace, n: int, seed: int, resolution: int | None = None) -> list[Arch]:
    rng = random.Random(seed)
    archs = [space.sample_uniform(rng) for _ in range(n)]
    if resolution is not None:
        archs = [replace(a, resolution=resolution) for a in archs]
    return archs


def _check(space: SearchSpace, arch: Arch) -> float:
    """Per-block exact agreement; returns the total relative error (for reporting)."""
    net = StaticSubnet(arch, space).eval()
    blocks = arch_blocks(arch, space)
    assert len(net) == len(blocks)
    counter = MacCounter(net)
    x = torch.zeros(1, 3, arch.resolution, arch.resolution)
    hooked_total = 0
    with torch.no_grad():
        for module, block in zip(net, blocks):
            counter.macs = 0
            x = module(x)
            assert counter.macs == block_flops(block), f"{arch.key}: block {block.key}"
            assert sum(p.numel() for p in module.parameters()) == block_params(block), f"{arch.key}: {block.key}"
            hooked_total += counter.macs
    counter.close()
    assert x.shape == (1, space.num_classes)
    cost = count(arch, space)
    rel = abs(cost.flops_m * 1e6 - hooked_total) / hooked_total
    assert rel < 0.01, f"{arch.key}: analytic {cost.flops_m} M vs hooks {hooked_total / 1e6} M"
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == sum(block_params(b) for b in blocks)
    assert round(cost.params_m * 1e6) == n_params
    return rel


def test_cpu_space_flops_and_params_match_hooks() -> None:
    archs = [CPU.smallest(), CPU.largest(), *_archs(CPU, 30, seed=0)]
    worst = max(_check(CPU, a) for a in archs)
    assert worst < 1e-9  # the convention is exact, not approximately right


def test_imagenet_space_flops_and_params_match_hooks() -> None:
    space = IMAGENET.with_classes(1000)
    # Mostly the smallest resolution (cheap); one draw per other resolution so that every
    # token-map side (incl. odd ones: 176 px gives 11x11) and pooled shortcut is covered.
    archs = [space.smallest(), *_archs(space, 3, seed=1, resolution=128)]
    archs += [replace(a, resolution=r) for a, r in zip(_archs(space, 5, seed=2), (160, 176, 192, 224, 256))]
    archs.append(replace(space.largest(), resolution=128))
    worst = max(_check(space, a) for a in archs)
    assert worst < 1e-9


def test_reference_variant_flops_and_params_match_hooks() -> None:
    """The reference-variant blocks (no shortcut BN, pooled identity, no qkv/V bias) count exactly too."""
    from evit.space.reference import reference_space

    cfg = {"search_space": {"stage": ["C", "C", "T", "T"], "res": [32, 40], "downsampling": [True, True, False, True],
                            "se": [False, True, True, True], "max_channels": [24, 24, 32, 48],
                            "min_channels": [16, 16, 16, 32], "max_depth": [2, 2, 2, 2], "min_depth": [1, 1, 1, 1],
                            "conv_ratio": [4, 3], "mlp_ratio": [3, 2], "v_scale": [[3, 2], [3, 2]],
                            "classifier_mul": 2},
           "classifer_head_dim": [16, 32], "dataloader": {"num_classes": 10}}
    space = reference_space(cfg)
    archs = [space.smallest(), space.largest(), *_archs(space, 12, seed=3)]
    worst = max(_check(space, a) for a in archs)
    assert worst < 1e-9
