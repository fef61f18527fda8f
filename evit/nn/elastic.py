"""Elastic blocks: max-size weights, sliced per call to the block that is asked for.

Each elastic block mirrors one static block of `evit.nn.static` and one `Block` kind of
`evit.flops`: `forward(x, block)` runs the sub-block described by `block` on the shared
weights, and `static_state(block)` hands out the slices as the static module's
`state_dict`. The active configuration is always an argument, never module state.

Slicing follows Once-for-All: a width takes the first channels, a 3x3 depthwise kernel is
the centre of the shared 5x5. Attention slices per head: head j keeps its own q, k and v
rows whatever the number of heads or the V-scale (v rows are laid out head by head at the
largest V-scale). The gather indices of those rows are cached per (heads, v_scale) and
device, and the relative-position index per token-map side, so a call costs views and one
small gather, no Python-side weight rebuilding.

The elastic primitives subclass the torch layers (`nn.Conv2d`, `nn.BatchNorm2d`, ...), so
code that walks modules by type (weight-decay groups, BN recalibration, init) treats the
supernet like any other network.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from evit.blocks import Block, mbconv_mid, se_channels
from evit.nn.common import BN_EPS, BN_MOMENTUM, LN_EPS, crop_rel_table, rel_pos_index

State = dict[str, Tensor]


def _prefixed(prefix: str, state: State) -> State:
    return {f"{prefix}.{k}": v for k, v in state.items()}


# --- primitives -----------------------------------------------------------------------------

class ElasticConv2d(nn.Conv2d):
    """A conv whose output channels, input channels and (odd) kernel are chosen per call."""

    def __init__(self, c_in: int, c_out: int, kernel: int, depthwise: bool = False, bias: bool = False) -> None:
        super().__init__(c_in, c_out, kernel, groups=c_out if depthwise else 1, bias=bias)
        self.depthwise = depthwise

    def active_weight(self, c_in: int, c_out: int, kernel: int) -> Tensor:
        full = self.kernel_size[0]
        off = (full - kernel) // 2
        w = self.weight[:c_out] if self.depthwise else self.weight[:c_out, :c_in]
        return w if kernel == full else w[:, :, off:off + kernel, off:off + kernel]

    def forward(self, x: Tensor, c_out: int, kernel: int = 1, stride: int = 1) -> Tensor:  # type: ignore[override]
        c_in = x.shape[1]
        if self.depthwise:
            c_out = c_in
        bias = self.bias[:c_out] if self.bias is not None else None
        return F.conv2d(x, self.active_weight(c_in, c_out, kernel), bias, stride, kernel // 2, 1,
                        c_in if self.depthwise else 1)

    def static_state(self, c_in: int, c_out: int, kernel: int = 1) -> State:
        state = {"weight": self.active_weight(c_in, c_out, kernel)}
        if self.bias is not None:
            state["bias"] = self.bias[:c_out]
        return state


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first `x.shape[1]` channels; running stats update in place.

    The slices of the 1-D buffers are views, so `F.batch_norm` updates the shared
    running statistics directly; the momentum/cumulative-average logic is torch's
    `_BatchNorm.forward`, so BN recalibration (reset + momentum None) works unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        c = x.shape[1]
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or self.running_mean is None
        mean = self.running_mean[:c] if self.running_mean is not None else None
        var = self.running_var[:c] if self.running_var is not None else None
        return F.batch_norm(x, mean, var, self.weight[:c], self.bias[:c], use_batch, factor, self.eps)

    def static_state(self, c: int) -> State:
        return {"weight": self.weight[:c], "bias": self.bias[:c], "running_mean": self.running_mean[:c],
                "running_var": self.running_var[:c], "num_batches_tracked": self.num_batches_tracked}


class ElasticLinear(nn.Linear):
    """A linear layer over the first `in` inputs producing the first `out` outputs."""

    def forward(self, x: Tensor, out: int) -> Tensor:  # type: ignore[override]
        return F.linear(x, self.weight[:out, :x.shape[-1]], self.bias[:out] if self.bias is not None else None)

    def static_state(self, c_in: int, out: int) -> State:
        state = {"weight": self.weight[:out, :c_in]}
        if self.bias is not None:
            state["bias"] = self.bias[:out]
        return state


class ElasticLayerNorm(nn.LayerNorm):
    """LayerNorm over the last `x.shape[-1]` channels (the first ones of the shared affine)."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        c = x.shape[-1]
        return F.layer_norm(x, (c,), self.weight[:c], self.bias[:c], self.eps)

    def static_state(self, c: int) -> State:
        return {"weight": self.weight[:c], "bias": self.bias[:c]}


class ElasticConvBNAct(nn.Module):
    """Elastic twin of `static.ConvBNAct` (same submodule names, so the same state keys)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, depthwise: bool = False, act: bool = True) -> None:
        super().__init__()
        self.conv = ElasticConv2d(c_in, c_out, kernel, depthwise=depthwise)
        self.bn = ElasticBatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = act

    def forward(self, x: Tensor, c_out: int, kernel: int = 1, stride: int = 1) -> Tensor:  # type: ignore[override]
        x = self.bn(self.conv(x, c_out, kernel, stride))
        return F.hardswish(x) if self.act else x

    def static_state(self, c_in: int, c_out: int, kernel: int = 1) -> State:
        return {**_prefixed("conv", self.conv.static_state(c_in, c_out, kernel)),
                **_prefixed("bn", self.bn.static_state(c_out))}


# --- blocks -----------------------------------------------------------------------------------

class ElasticFirstConv(nn.Module):
    """The first 3x3 conv: 3 -> stem width, strided, BN, Hardswish."""

    def __init__(self, c_out: int) -> None:
        super().__init__()
        self.body = ElasticConvBNAct(3, c_out, 3)

    def forward(self, x: Tensor, b: Block) -> Tensor:  # type: ignore[override]
        return self.body(x, b.c_out, 3, b.stride)

    def static_state(self, b: Block) -> State:
        return self.body.static_state(b.c_in, b.c_out, 3)


class ElasticSE(nn.Module):
    """Squeeze-excite on the first channels: mean, 1x1+bias, ReLU, 1x1+bias, hard-sigmoid."""

    def __init__(self, mid: int, rd: int) -> None:
        super().__init__()
        self.fc1 = ElasticConv2d(mid, rd, 1, bias=True)
        self.fc2 = ElasticConv2d(rd, mid, 1, bias=True)

    def forward(self, x: Tensor, rd: int) -> Tensor:  # type: ignore[override]
        s = F.relu(self.fc1(x.mean((2, 3), keepdim=True), rd))
        return x * F.hardsigmoid(self.fc2(s, x.shape[1]))

    def static_state(self, mid: int, rd: int) -> State:
        return {**_prefixed("fc1", self.fc1.static_state(mid, rd)), **_prefixed("fc2", self.fc2.static_state(rd, mid))}


class ElasticMBConv(nn.Module):
    """Elastic twin of `static.MBConv`: input/output width, expansion and kernel per call.

    `conv_shortcut` says whether any configuration of this position needs the pooled 1x1
    shortcut (a stride, or input and output widths that can differ); a call uses it only
    when its own shapes differ, else the identity.
    """

    def __init__(self, c_in: int, c_out: int, expansion: int, kernel: int, stride: int, se: bool,
                 conv_shortcut: bool, se_reduction: int = 4, drop_path: float = 0.0) -> None:
        super().__init__()
        mid = mbconv_mid(c_in, expansion)
        self.has_expand = expansion != 1
        self.stride = stride
        self.se_reduction = se_reduction
        if self.has_expand:
            self.expand = ElasticConvBNAct(c_in, mid, 1)
        self.dw = ElasticConvBNAct(mid, mid, kernel, depthwise=True)
        self.se = ElasticSE(mid, se_channels(mid, se_reduction)) if se else None
        self.project = ElasticConvBNAct(mid, c_out, 1, act=False)
        if conv_shortcut:
            self.shortcut_conv = ElasticConv2d(c_in, c_out, 1)
            self.shortcut_bn = ElasticBatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.conv_shortcut = conv_shortcut
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.project.bn.weight)

    def _check(self, b: Block) -> None:
        if (b.se != (self.se is not None) or (b.expansion != 1) != self.has_expand or b.stride != self.stride
                or (not self.conv_shortcut and (b.c_in != b.c_out or b.stride != 1))):
            raise ValueError(f"block {b.key} does not fit this elastic MBConv position")

    def forward(self, x: Tensor, b: Block) -> Tensor:  # type: ignore[override]
        c_in = x.shape[1]
        mid = mbconv_mid(c_in, b.expansion)
        y = self.expand(x, mid) if self.has_expand else x
        y = self.dw(y, mid, b.kernel, b.stride)
        if self.se is not None:
            y = self.se(y, se_channels(mid, b.se_reduction))
        y = self.project(y, b.c_out)
        if c_in == b.c_out and b.stride == 1:
            return x + self.drop_path(y)
        s = F.avg_pool2d(x, b.stride, ceil_mode=True, count_include_pad=False) if b.stride > 1 else x
        return self.shortcut_bn(self.shortcut_conv(s, b.c_out)) + y

    def static_state(self, b: Block) -> State:
        self._check(b)
        mid = mbconv_mid(b.c_in, b.expansion)
        state: State = {}
        if self.has_expand:
            state.update(_prefixed("expand", self.expand.static_state(b.c_in, mid)))
        state.update(_prefixed("dw", self.dw.static_state(mid, mid, b.kernel)))
        if self.se is not None:
            state.update(_prefixed("se", self.se.static_state(mid, se_channels(mid, b.se_reduction))))
        state.update(_prefixed("project", self.project.static_state(mid, b.c_out)))
        if b.c_in != b.c_out or b.stride != 1:
            state.update(_prefixed("shortcut.conv", self.shortcut_conv.static_state(b.c_in, b.c_out)))
            state.update(_prefixed("shortcut.bn", self.shortcut_bn.static_state(b.c_out)))
        return state


AttentionImpl = Literal["auto", "explicit", "sdpa"]
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "explicit", "sdpa")


SDPA_CPU_MIN_TOKENS = 196
"""On CPU, 'auto' takes SDPA from this many tokens (14x14) up: measured 1.06-1.2x faster
there (paper-scale layers, batch 96), 0.67-0.94x at 2x2-8x8 token maps (the CPU space's)."""


def resolve_attention_impl(impl: str, device: torch.device, tokens: int = 0) -> str:
    """'auto' -> the path measured faster (bench/gpu.py's attention micro-benchmark prints it):
    SDPA on CUDA (fused kernels, the bias as additive mask); on CPU, SDPA from
    `SDPA_CPU_MIN_TOKENS` tokens up and the explicit softmax below, which is also exactly
    the static subnet's (export's) form. 'explicit' / 'sdpa' force a path."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {impl!r}; accepted: {list(ATTENTION_IMPLS)}")
    if impl == "auto":
        return "sdpa" if device.type == "cuda" or tokens >= SDPA_CPU_MIN_TOKENS else "explicit"
    return impl


def set_attention_impl(model: nn.Module, impl: str) -> int:
    """Select how every `ElasticAttention` in `model` computes attention; returns how many.

    Both paths compute the same function (tests/test_attention_sdpa.py, forward and
    backward in fp32), so the choice is about speed only and never changes a checkpoint.
    """
    resolve_attention_impl(impl, torch.device("cpu"))  # validate
    layers = [m for m in model.modules() if isinstance(m, ElasticAttention)]
    for m in layers:
        m.impl = impl
    return len(layers)


class ElasticAttention(nn.Module):
    """Elastic twin of `static.Attention`: heads (from the width) and V-scale per call.

    Rows of `qkv.weight`: q of all `max_heads` heads, k likewise, then v as `max_heads`
    blocks of `head_dim * max_v_scale` rows. `rel_bias` is one table per layer for the
    largest token map of its stage (`table_side`); smaller maps index its centre.

    `impl` picks how softmax(q.k/sqrt(d) + bias).v is computed (`set_attention_impl`):
    'explicit' (matmul, add, softmax, matmul: the static subnet's and export's form) or
    'sdpa' (`F.scaled_dot_product_attention` with the relative-position bias as the
    additive float mask); 'auto' picks per device (`resolve_attention_impl`).
    """

    impl: str = "auto"

    def __init__(self, width: int, head_dim: int, v_scale: int, table_side: int) -> None:
        super().__init__()
        self.max_heads = width // head_dim
        self.head_dim = head_dim
        self.max_v = v_scale
        self.table_side = table_side
        qk = self.max_heads * head_dim
        dv = qk * v_scale
        self.qkv = nn.Linear(width, 2 * qk + dv)
        self.v_conv = ElasticConv2d(dv, dv, 3, depthwise=True, bias=True)
        self.rel_bias = nn.Parameter(torch.zeros(self.max_heads, (2 * table_side - 1) ** 2))
        self.proj = nn.Linear(dv, width)
        self._rows: dict[tuple[int, int, torch.device], tuple[Tensor, Tensor]] = {}
        self._rel: dict[tuple[int, torch.device], Tensor] = {}

    def rows(self, heads: int, v_scale: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(rows of qkv, rows of v) of the active heads, cached per configuration and device."""
        key = (heads, v_scale, device)
        hit = self._rows.get(key)
        if hit is None:
            d, qk_max = self.head_dim, self.max_heads * self.head_dim
            v = (torch.arange(heads)[:, None] * (d * self.max_v) + torch.arange(d * v_scale)[None, :]).flatten()
            qkv = torch.cat([torch.arange(heads * d), qk_max + torch.arange(heads * d), 2 * qk_max + v])
            hit = (qkv.to(device), v.to(device))
            self._rows[key] = hit
        return hit

    def rel_index(self, side: int, device: torch.device) -> Tensor:
        key = (side, device)
        hit = self._rel.get(key)
        if hit is None:
            hit = rel_pos_index(side, self.table_side).to(device)
            self._rel[key] = hit
        return hit

    def forward(self, t: Tensor, h: int, w: int, heads: int, v_scale: int) -> Tensor:  # type: ignore[override]
        b, n, c = t.shape
        d = self.head_dim
        dv = heads * d * v_scale
        qkv_rows, v_rows = self.rows(heads, v_scale, t.device)
        qkv = F.linear(t, self.qkv.weight[:, :c].index_select(0, qkv_rows), self.qkv.bias.index_select(0, qkv_rows))
        q, k, v = qkv.split([heads * d, heads * d, dv], dim=-1)
        q = q.reshape(b, n, heads, d).transpose(1, 2)
        k = k.reshape(b, n, heads, d).permute(0, 2, 3, 1)
        v = F.conv2d(v.transpose(1, 2).reshape(b, dv, h, w), self.v_conv.weight.index_select(0, v_rows),
                     self.v_conv.bias.index_select(0, v_rows), 1, 1, 1, dv)
        v = v.reshape(b, heads, dv // heads, n).transpose(2, 3)
        bias = self.rel_bias[:heads][:, self.rel_index(h, t.device)]
        if resolve_attention_impl(self.impl, t.device, n) == "sdpa":
            ctx = F.scaled_dot_product_attention(q, k.transpose(2, 3), v, attn_mask=bias.to(q.dtype).unsqueeze(0),
                                                 scale=d ** -0.5)
        else:
            ctx = torch.matmul((torch.matmul(q, k) * (d ** -0.5) + bias).softmax(dim=-1), v)
        out = ctx.transpose(1, 2).reshape(b, n, dv)
        return F.linear(F.hardswish(out), self.proj.weight[:c].index_select(1, v_rows), self.proj.bias[:c])

    def static_state(self, width: int, v_scale: int, side: int) -> State:
        heads = width // self.head_dim
        qkv_rows, v_rows = self.rows(heads, v_scale, self.qkv.weight.device)
        return {
            "qkv.weight": self.qkv.weight[:, :width].index_select(0, qkv_rows),
            "qkv.bias": self.qkv.bias.index_select(0, qkv_rows),
            "v_conv.weight": self.v_conv.weight.index_select(0, v_rows),
            "v_conv.bias": self.v_conv.bias.index_select(0, v_rows),
            "rel_bias": crop_rel_table(self.rel_bias[:heads], self.table_side, side),
            "proj.weight": self.proj.weight[:width].index_select(1, v_rows),
            "proj.bias": self.proj.bias[:width],
        }


class ElasticMlp(nn.Module):
    """Linear(w, r*w) + Hardswish + Linear(r*w, w) on the first channels (timm `Mlp` names)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = ElasticLinear(width, hidden)
        self.fc2 = ElasticLinear(hidden, width)

    def forward(self, t: Tensor, hidden: int) -> Tensor:  # type: ignore[override]
        return self.fc2(F.hardswish(self.fc1(t, hidden)), t.shape[-1])

    def static_state(self, width: int, hidden: int) -> State:
        return {**_prefixed("fc1", self.fc1.static_state(width, hidden)),
                **_prefixed("fc2", self.fc2.static_state(hidden, width))}


class ElasticTransformerLayer(nn.Module):
    """Elastic twin of `static.TransformerLayer` (width, MLP ratio, V-scale, map side per call)."""

    def __init__(self, width: int, mlp_ratio: int, v_scale: int, head_dim: int, table_side: int,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = ElasticLayerNorm(width, eps=LN_EPS)
        self.attn = ElasticAttention(width, head_dim, v_scale, table_side)
        self.norm2 = ElasticLayerNorm(width, eps=LN_EPS)
        self.mlp = ElasticMlp(width, mlp_ratio * width)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, b: Block) -> Tensor:  # type: ignore[override]
        bs, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.drop_path(self.attn(self.norm1(t), h, w, c // b.head_dim, b.v_scale))
        t = t + self.drop_path(self.mlp(self.norm2(t), b.mlp_ratio * c))
        return t.transpose(1, 2).reshape(bs, c, h, w)

    def static_state(self, b: Block) -> State:
        w = b.c_in
        return {**_prefixed("norm1", self.norm1.static_state(w)),
                **_prefixed("attn", self.attn.static_state(w, b.v_scale, b.h)),
                **_prefixed("norm2", self.norm2.static_state(w)),
                **_prefixed("mlp", self.mlp.static_state(w, b.mlp_ratio * w))}


class ElasticHead(nn.Module):
    """Elastic twin of `static.Head`: only the input width (and so 6C) varies."""

    def __init__(self, c_in: int, expansion: int, head_width: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.pre = ElasticConvBNAct(c_in, expansion * c_in, 1)
        self.fc = ElasticLinear(expansion * c_in, head_width)
        self.classifier = nn.Linear(head_width, num_classes)
        self.dropout = dropout

    def forward(self, x: Tensor, b: Block) -> Tensor:  # type: ignore[override]
        x = self.pre(x, b.expansion * x.shape[1]).mean((2, 3))
        x = F.hardswish(self.fc(x, self.fc.out_features))
        return self.classifier(F.dropout(x, self.dropout, self.training))

    def static_state(self, b: Block) -> State:
        c6 = b.expansion * b.c_in
        return {**_prefixed("pre", self.pre.static_state(b.c_in, c6)),
                **_prefixed("fc", self.fc.static_state(c6, b.head_width)),
                "classifier.weight": self.classifier.weight, "classifier.bias": self.classifier.bias}


ElasticBlock = Any  # ElasticFirstConv | ElasticMBConv | ElasticTransformerLayer | ElasticHead
