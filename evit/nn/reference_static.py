"""Static blocks of the reference variant (`Block.variant == "reference"`).

The paper's released supernet differs from evit's own modules in three places that
survive extraction (everything else, e.g. its qkv row layout, is undone when the rows
are copied out):

- MBConv shortcut: a strided block averages 2x2 windows with zero padding on odd sides
  *counted* in the mean (`count_include_pad=True`), then applies a 1x1 conv only when the
  width changes; there is no shortcut BN. Equal widths with a stride give a pooled identity.
- Transformer norms: each sample is normalised over tokens and channels jointly, with a
  per-channel affine, i.e. `GroupNorm(1, C)` on the NCHW token map.
- No bias on the qkv linear or on the depthwise V conv.

The first conv, the stem and the head are evit's default static blocks (the reference's
head bias before its BN is folded into the BN's running mean on extraction).
`evit.nn.static.build_block` hands "reference" blocks to `build_reference_block`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evit.blocks import Block, has_shortcut_conv, mbconv_mid, se_channels
from evit.nn.common import BN_EPS, BN_MOMENTUM, LN_EPS, MatMul, rel_pos_index


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)),
        ("bn", nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)),
        ("act", nn.Hardswish() if act else nn.Identity()),
    ]))


class RefSE(nn.Module):
    """Squeeze-excite: mean, 1x1 conv + bias, ReLU, 1x1 conv + bias, hard-sigmoid gate."""

    def __init__(self, mid: int, rd: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(mid, rd, 1)
        self.fc2 = nn.Conv2d(rd, mid, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * F.hardsigmoid(s)


class RefMBConv(nn.Module):
    """Reference inverted residual: [pw] -> dw -> [SE] -> pwl, + identity / pooled / pooled+1x1 shortcut."""

    def __init__(self, b: Block) -> None:
        super().__init__()
        mid = mbconv_mid(b.c_in, b.expansion)
        self.expand: nn.Module = _conv_bn(b.c_in, mid, 1) if b.expansion != 1 else nn.Identity()
        self.dw = _conv_bn(mid, mid, b.kernel, b.stride, groups=mid)
        self.se: nn.Module = RefSE(mid, se_channels(mid, b.se_reduction)) if b.se else nn.Identity()
        self.project = _conv_bn(mid, b.c_out, 1, act=False)
        # padding 1 on an odd side: ceil(h/2) outputs, the zero pad counted (the sum is always /4)
        self.pool: nn.Module = (nn.AvgPool2d(2, 2, padding=b.h % 2, count_include_pad=True) if b.stride > 1
                                else nn.Identity())
        self.shortcut: nn.Module = nn.Conv2d(b.c_in, b.c_out, 1, bias=False) if has_shortcut_conv(b) else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return self.shortcut(self.pool(x)) + y


class RefAttention(nn.Module):
    """Global attention in evit's static row layout (q of all heads, k of all heads, v head by head), no biases.

    Scores q.k / sqrt(head_dim) + relative-position bias ((2H-1)^2 table per head), softmax,
    A.V with V through a 3x3 depthwise conv over the token map, Hardswish, projection.
    """

    def __init__(self, width: int, head_dim: int, v_scale: int, side: int) -> None:
        super().__init__()
        self.heads = width // head_dim
        self.head_dim = head_dim
        self.dv = self.heads * head_dim * v_scale
        self.scale = head_dim ** -0.5
        qk = self.heads * head_dim
        self.split = [qk, qk, self.dv]
        self.qkv = nn.Linear(width, 2 * qk + self.dv, bias=False)
        self.v_conv = nn.Conv2d(self.dv, self.dv, 3, 1, 1, groups=self.dv, bias=False)
        self.rel_bias = nn.Parameter(torch.zeros(self.heads, (2 * side - 1) ** 2))
        self.register_buffer("rel_index", rel_pos_index(side, side), persistent=False)
        self.qk = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.av = MatMul()
        self.act = nn.Hardswish()
        self.proj = nn.Linear(self.dv, width)

    def forward(self, t: Tensor, h: int, w: int) -> Tensor:
        b, n, _ = t.shape
        q, k, v = self.qkv(t).split(self.split, dim=-1)
        q = q.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, n, self.heads, self.head_dim).permute(0, 2, 3, 1)
        v = self.v_conv(v.transpose(1, 2).reshape(b, self.dv, h, w))
        v = v.reshape(b, self.heads, self.dv // self.heads, n).transpose(2, 3)
        attn = self.qk(q, k) * self.scale + self.rel_bias[:, self.rel_index]
        out = self.av(self.softmax(attn), v).transpose(1, 2).reshape(b, n, self.dv)
        return self.proj(self.act(out))


class RefMlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.Hardswish()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, t: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(t)))


class RefTransformerLayer(nn.Module):
    """Joint-norm attention + joint-norm MLP, both residual, on a B,C,H,W token map."""

    def __init__(self, b: Block) -> None:
        super().__init__()
        w = b.c_in
        self.norm1 = nn.GroupNorm(1, w, eps=LN_EPS)
        self.attn = RefAttention(w, b.head_dim, b.v_scale, b.h)
        self.norm2 = nn.GroupNorm(1, w, eps=LN_EPS)
        self.mlp = RefMlp(w, b.mlp_ratio * w)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        a = self.attn(self.norm1(x).flatten(2).transpose(1, 2), h, w)
        x = x + a.transpose(1, 2).reshape(b, c, h, w)
        m = self.mlp(self.norm2(x).flatten(2).transpose(1, 2))
        return x + m.transpose(1, 2).reshape(b, c, h, w)


def build_reference_block(block: Block) -> nn.Module:
    """The static module of one reference-variant stage block (MBConv or transformer layer)."""
    if block.kind == "mbconv":
        return RefMBConv(block)
    if block.kind == "attn":
        return RefTransformerLayer(block)
    raise ValueError(f"no reference-variant module for block kind {block.kind!r}")
