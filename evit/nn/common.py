"""Pieces shared by the elastic supernet and the static subnets.

Both sides must compute exactly the same function for a given subnet (the extract test
holds them to 1e-5), so the few choices that are not plain torch layers live here once:
the relative-position index, the table crop, the weight initialisation, and the norm eps.
"""

from __future__ import annotations

import math

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from evit.blocks import out_side
from evit.space import SearchSpace

BN_EPS = 1e-5
LN_EPS = 1e-5
BN_MOMENTUM = 0.1


class MatMul(nn.Module):
    """`torch.matmul` as a module, so that forward hooks can count Q.K^T and A.V MACs.

    The FLOPs convention counts the attention products; a module is the one hook point
    that works the same under eager, TorchScript and ONNX export.

    Batched 4-D operands (B, heads, N, d) run as one 3-D `bmm` over B*heads: the same
    arithmetic as `torch.matmul`, but ExecuTorch's XNNPACK partitioner takes a 3-D bmm
    whole, while a 4-D matmul leaves an `expand_copy` outside the delegate.
    """

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.dim() == 4 and b.dim() == 4:
            lead = a.shape[:2]
            out = torch.bmm(a.reshape(-1, a.shape[2], a.shape[3]), b.reshape(-1, b.shape[2], b.shape[3]))
            return out.reshape(lead[0], lead[1], out.shape[1], out.shape[2])
        return torch.matmul(a, b)


def rel_pos_index(side: int, table_side: int) -> Tensor:
    """(N, N) index into a flattened (2*table_side-1)^2 relative-position table.

    Entry [i, j] addresses the offset (y_i - y_j, x_i - x_j) of tokens i and j on a
    `side` x `side` map. With `table_side` > `side` this addresses the centre of a larger
    table, which is how the supernet's one table per layer serves every resolution.
    """
    if side > table_side:
        raise ValueError(f"token map side {side} exceeds the bias table's side {table_side}")
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # 2, N
    rel = coords[:, :, None] - coords[:, None, :] + (table_side - 1)  # 2, N, N
    return rel[0] * (2 * table_side - 1) + rel[1]


def crop_rel_table(table: Tensor, table_side: int, side: int) -> Tensor:
    """Centre crop of a (heads, (2*table_side-1)^2) table to (heads, (2*side-1)^2)."""
    heads = table.shape[0]
    full = 2 * table_side - 1
    off = table_side - side
    n = 2 * side - 1
    return table.reshape(heads, full, full)[:, off:off + n, off:off + n].reshape(heads, n * n)


def token_sides(space: SearchSpace, resolution: int) -> list[int]:
    """Output feature-map side of every stage at `resolution` (a transformer stage's token map)."""
    h = out_side(resolution, space.first_stride)
    sides = []
    for ss in space.stages:
        h = out_side(h, ss.stride)
        sides.append(h)
    return sides


def max_token_sides(space: SearchSpace) -> list[int]:
    """Per stage, the largest output side over all of the space's resolutions."""
    per_res = [token_sides(space, r) for r in space.resolutions]
    return [max(col) for col in zip(*per_res)]


def init_module(root: nn.Module) -> None:
    """timm-EfficientNet-style init for convs, ViT-style init for linears and tables.

    Convs: normal(0, sqrt(2 / fan_out)) with fan_out over the (max) output channels and
    kernel; linears and relative-position tables: truncated normal std 0.02, zero bias;
    norms: weight 1, bias 0. Then every block with a shortcut zeroes its last BN gamma
    (`zero_init_last`), so that each block starts as (close to) its shortcut.
    """
    modules = list(root.modules())
    for m in modules:
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        rel = getattr(m, "rel_bias", None)
        if isinstance(rel, nn.Parameter):
            trunc_normal_(rel, std=0.02)
    for m in modules:
        zero = getattr(m, "zero_init_last", None)
        if callable(zero):
            zero()


def undo_zero_init(root: nn.Module) -> nn.Module:
    """`root` (in place) with every all-zero BatchNorm scale set to one.

    The zeroed last BN gamma is a choice for the start of training only; a module timed for
    latency must not carry it: a converter that folds constants (LiteRT's does) removes a
    branch multiplied by zero, so an MBConv block's expand / depthwise / project convs
    vanish from the file and the table times a network that no trained subnet is. No trained
    BN scale is exactly zero everywhere, so trained weights are never touched.
    """
    with torch.no_grad():
        for m in root.modules():
            if isinstance(m, nn.BatchNorm2d) and m.weight is not None and not bool(m.weight.any()):
                m.weight.fill_(1.0)
    return root
