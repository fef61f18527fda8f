"""Static subnets: plain modules, one per `evit.blocks.Block`, with no elastic logic.

A static subnet is exactly `nn.Sequential(build_block(b) for b in arch_blocks(arch, space))`.
The latency lookup tables time these same modules one by one, and `evit.flops` counts
the same blocks, so FLOPs, params and predicted latency all add up over one
decomposition. Every block takes and returns NCHW tensors (the head returns logits),
which keeps blocks independently measurable and exportable.

A static subnet is rebuilt from its arch JSON plus a `state_dict` (`load_static`); no
module is ever pickled. `extract` copies a subnet's weights out of the supernet.

Layer norm: per token over channels (`nn.LayerNorm(width)`), a choice of ours. The
reference normalises each sample over tokens and channels jointly (a GroupNorm with one
group); per-token LayerNorm is the common ViT choice, does not mix statistics across
tokens (so a token map's side does not change the normalisation).

Export-friendly forms. Every block is written so that mobile delegates take it whole
(ExecuTorch's XNNPACK partitioner: 1-2 partitions per subnet, nothing left outside;
LiteRT: fully delegated to XNNPACK), with the same outputs as the plain forms (within
1e-6, `tests/test_export_friendly.py`):
- layer norm, when traced by `torch.export`, as mean / rsqrt on a (B, N, 1, C) view
  (XNNPACK's mean is a 4-D, keepdim, inner-two-dims reduction; `native_layer_norm` is
  not delegated); eager keeps torch's fused layer norm;
- the relative-position bias gathered once into a (heads, N, N) buffer whenever the
  module goes to eval mode or loads weights (a gather, `aten.index`, is not delegated);
- attention products as 3-D `bmm` (`MatMul`), q/k/v by slicing (not `split`), the
  head's pool as a keepdim mean, and the shortcut's average pool without ceil mode
  wherever no window is partial (the side divides by the stride).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from timm.layers import Mlp, SEModule
from torch import Tensor, nn

from evit.arch import Arch
from evit.blocks import Block, arch_blocks, mbconv_mid, se_channels
from evit.errors import CheckpointError
from evit.nn.common import BN_EPS, BN_MOMENTUM, LN_EPS, MatMul, init_module, rel_pos_index
from evit.space import SearchSpace


class ConvBNAct(nn.Sequential):
    """Conv (no bias, 'same' padding) + BatchNorm + optional Hardswish."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: bool = True) -> None:
        super().__init__(OrderedDict([
            ("conv", nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)),
            ("bn", nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)),
            ("act", nn.Hardswish() if act else nn.Identity()),
        ]))


class LayerNorm4d(nn.LayerNorm):
    """`nn.LayerNorm(width)` over the last dim; under `torch.export`, mean / rsqrt on a 4-D view.

    Same parameters (state_dict keys) as `nn.LayerNorm`. Eager (and the ONNX exporter)
    run torch's fused layer norm, the fastest form on a desktop CPU. When traced by
    `torch.export` (ExecuTorch lowering, the LiteRT converter) it is written as two
    means over a (B, N, 1, C) view, which XNNPACK runs as its 4-D global average pool,
    so the whole norm is delegated; the two agree within float rounding (~1e-7).
    """

    def __init__(self, width: int, eps: float = LN_EPS) -> None:
        super().__init__(width, eps=eps)
        # eps as a float32 buffer: a Python scalar becomes a 0-d constant that ExecuTorch
        # converts outside the delegate (a `_to_dim_order_copy` per norm)
        self.register_buffer("eps_t", torch.full((1, 1, 1, 1), eps), persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        if torch.compiler.is_exporting():
            return self.decomposed(t)
        return super().forward(t)

    def decomposed(self, t: Tensor) -> Tensor:
        """The delegate-friendly form (what `torch.export` traces)."""
        shape = t.shape
        x = t.reshape(-1, 1, 1, shape[-1]) if t.dim() != 3 else t.reshape(shape[0], shape[1], 1, shape[2])
        mu = x.mean((2, 3), keepdim=True)
        xc = x - mu
        var = (xc * xc).mean((2, 3), keepdim=True)
        y = xc * torch.rsqrt(var + self.eps_t) * self.weight + self.bias
        return y.reshape(shape)


class ConvShortcut(nn.Sequential):
    """The non-identity shortcut: average pool (if strided) + 1x1 conv + BN.

    The pool is ceil-mode (a partial last window averages what it covers); where the input
    `side` is known and divides by the stride no window is partial, so the plain pool is
    the same function, and the one mobile delegates take.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, side: int | None = None) -> None:
        ceil = side is None or side % stride != 0
        pool: nn.Module = (nn.AvgPool2d(stride, ceil_mode=ceil, count_include_pad=False)
                           if stride > 1 else nn.Identity())
        super().__init__(OrderedDict([
            ("pool", pool),
            ("conv", nn.Conv2d(c_in, c_out, 1, bias=False)),
            ("bn", nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)),
        ]))


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> kxk depthwise -> [SE] -> 1x1 project, + shortcut.

    Expansion 1 (the stem) has no expand conv. SE is timm's SEModule with ReLU and a
    hard-sigmoid gate, reduction `se_reduction` of the expanded width. The shortcut is
    the identity when shapes match, else pool + 1x1 conv + BN; every block therefore has
    a shortcut, and its project BN gamma starts at zero.
    """

    def __init__(self, c_in: int, c_out: int, expansion: int, kernel: int, stride: int, se: bool,
                 se_reduction: int = 4, side: int | None = None) -> None:
        super().__init__()
        mid = mbconv_mid(c_in, expansion)
        self.expand: nn.Module = ConvBNAct(c_in, mid, 1) if expansion != 1 else nn.Identity()
        self.dw = ConvBNAct(mid, mid, kernel, stride, groups=mid)
        self.se: nn.Module = (
            SEModule(mid, rd_channels=se_channels(mid, se_reduction), act_layer=nn.ReLU,
                     gate_layer="hard_sigmoid")
            if se else nn.Identity()
        )
        self.project = ConvBNAct(mid, c_out, 1, act=False)
        self.shortcut: nn.Module = (nn.Identity() if c_in == c_out and stride == 1
                                    else ConvShortcut(c_in, c_out, stride, side))

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.project.bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return self.shortcut(x) + y


class Attention(nn.Module):
    """Global multi-head attention with V-scale, a depthwise conv on V and relative bias.

    q and k have `head_dim` channels per head, v has `head_dim * v_scale`. One qkv linear
    (rows: q of all heads, k of all heads, v head by head). V passes through a 3x3
    depthwise conv over the token map. Scores are q.k / sqrt(head_dim) plus a learned
    bias per head and relative offset; softmax; A.V; Hardswish; projection to the width.

    `rel_bias` (the learned table) is the parameter; `attn_bias` (heads, N, N) is the table
    gathered at this layer's offsets, a non-persistent buffer refreshed whenever the
    module goes to eval mode or loads a state_dict, and what eval forwards (and exports)
    add. Training forwards gather from `rel_bias` directly so its gradient flows.
    """

    def __init__(self, width: int, head_dim: int, v_scale: int, side: int) -> None:
        super().__init__()
        self.heads = width // head_dim
        self.head_dim = head_dim
        self.dv = self.heads * head_dim * v_scale
        self.scale = head_dim ** -0.5
        qk = self.heads * head_dim
        self.split = [qk, qk, self.dv]
        self.qkv = nn.Linear(width, 2 * qk + self.dv)
        self.v_conv = nn.Conv2d(self.dv, self.dv, 3, 1, 1, groups=self.dv, bias=True)
        self.rel_bias = nn.Parameter(torch.zeros(self.heads, (2 * side - 1) ** 2))
        self.register_buffer("rel_index", rel_pos_index(side, side), persistent=False)
        self.register_buffer("attn_bias", torch.zeros(self.heads, side * side, side * side), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_bias())
        self.qk = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.av = MatMul()
        self.act = nn.Hardswish()
        self.proj = nn.Linear(self.dv, width)

    @torch.no_grad()
    def refresh_bias(self) -> None:
        """Gather the relative-position table into `attn_bias` (after a weight change)."""
        self.attn_bias.copy_(self.rel_bias[:, self.rel_index])

    def train(self, mode: bool = True) -> Attention:
        if not mode:
            self.refresh_bias()
        return super().train(mode)

    def forward(self, t: Tensor, h: int, w: int) -> Tensor:
        b, n, _ = t.shape
        qk_dim = self.split[0]
        qkv = self.qkv(t)
        q, k, v = qkv[..., :qk_dim], qkv[..., qk_dim:2 * qk_dim], qkv[..., 2 * qk_dim:]
        q = q.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)  # B, h, N, d
        k = k.reshape(b, n, self.heads, self.head_dim).permute(0, 2, 3, 1)  # B, h, d, N
        v = self.v_conv(v.transpose(1, 2).reshape(b, self.dv, h, w))
        v = v.reshape(b, self.heads, self.dv // self.heads, n).transpose(2, 3)  # B, h, N, dv
        bias = self.rel_bias[:, self.rel_index] if self.training else self.attn_bias
        attn = self.qk(q, k) * self.scale + bias
        out = self.av(self.softmax(attn), v)  # B, h, N, dv
        out = out.transpose(1, 2).reshape(b, n, self.dv)
        return self.proj(self.act(out))


class TransformerLayer(nn.Module):
    """Pre-norm attention + pre-norm MLP, both residual, on a B,C,H,W token map."""

    def __init__(self, width: int, mlp_ratio: int, v_scale: int, head_dim: int, side: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm4d(width, eps=LN_EPS)
        self.attn = Attention(width, head_dim, v_scale, side)
        self.norm2 = LayerNorm4d(width, eps=LN_EPS)
        self.mlp = Mlp(width, mlp_ratio * width, act_layer=nn.Hardswish)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(self.norm1(t), h, w)
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


class Head(nn.Module):
    """MBPool head: 1x1 conv C->6C + BN + Hardswish, mean-pool, linear, Hardswish, dropout, linear."""

    def __init__(self, c_in: int, expansion: int, head_width: int, num_classes: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        c6 = expansion * c_in
        self.pre = ConvBNAct(c_in, c6, 1)
        self.fc = nn.Linear(c6, head_width)
        self.act = nn.Hardswish()
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(head_width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x).mean((2, 3), keepdim=True).flatten(1)
        return self.classifier(self.drop(self.act(self.fc(x))))


def block_input_shape(block: Block, batch: int = 1) -> tuple[int, int, int, int]:
    """NCHW shape that `build_block(block)` expects (first conv: 3 channels at the resolution)."""
    return (batch, block.c_in, block.h, block.h)


def build_block(block: Block, head_dropout: float = 0.0) -> nn.Module:
    """The plain module for one block of the FLOPs decomposition.

    Input: `block_input_shape(block)`; output: NCHW at `block.h_out` side and `block.c_out`
    channels, or (B, classes) logits for the head. `head_dropout` only matters in training.
    """
    b = block
    if b.variant == "reference":
        from evit.nn.reference_static import build_reference_block

        return build_reference_block(b)
    if b.kind == "first_conv":
        return ConvBNAct(b.c_in, b.c_out, 3, b.stride)
    if b.kind == "mbconv":
        return MBConv(b.c_in, b.c_out, b.expansion, b.kernel, b.stride, b.se, b.se_reduction, side=b.h)
    if b.kind == "attn":
        return TransformerLayer(b.c_in, b.mlp_ratio, b.v_scale, b.head_dim, b.h)
    if b.kind == "head":
        return Head(b.c_in, b.expansion, b.head_width, b.c_out, head_dropout)
    raise ValueError(f"unknown block kind {b.kind!r}")


class StaticSubnet(nn.Sequential):
    """One subnet as a plain `nn.Sequential` of its blocks, in `arch_blocks` order."""

    def __init__(self, arch: Arch, space: SearchSpace) -> None:
        space.validate_computable(arch)
        blocks = arch_blocks(arch, space)
        super().__init__(*(build_block(b, space.head_dropout) for b in blocks))
        self.arch = arch
        self.space = space
        self.blocks = tuple(blocks)
        init_module(self)

    def extra_repr(self) -> str:
        return f"arch={self.arch.key}"


def extract(supernet: Any, arch: Arch) -> StaticSubnet:
    """A static copy of `arch` out of `supernet` (an `evit.nn.supernet.Supernet`).

    The copy owns its weights (later supernet updates do not reach it), lives on the
    supernet's device and dtype, and is returned in eval mode; its eval outputs equal the
    supernet's for `arch`.
    """
    ref = next(supernet.parameters())
    net = StaticSubnet(arch, supernet.space).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for static_block, (elastic_block, block) in zip(net, supernet.active(arch), strict=True):
            static_block.load_state_dict(elastic_block.static_state(block), strict=True)
    return net.eval()


def load_static(arch: Arch, space: SearchSpace, state_dict: Mapping[str, Tensor]) -> StaticSubnet:
    """Rebuild a static subnet from its architecture and a `state_dict` (no pickled modules)."""
    net = StaticSubnet(arch, space)
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the state_dict does not fit arch {arch.key} in space '{space.name}' "
            f"({space.num_classes} classes): {exc}"
        ) from None
    return net.eval()
