"""The reference-compatible supernet: the paper's released parameter layout, evit's interface.

`ReferenceSupernet(space)` (for a `space.variant == "reference"` space, built by
`evit.space.reference`) holds exactly the state_dict of the reference implementation's
`FusedSuperNet` (microsoft/Moonlit ElasticViT), key for key and shape for shape, so its
released checkpoint loads with `load_state_dict(strict=True)`. Its forward follows the
reference's semantics (see `../shared/fixtures/reference-supernet/LAYOUT.md`):

- every elastic dimension is a first-k slice; a 3x3 depthwise kernel is the centre of the 5x5;
- MBConv hidden width = the block's *input* width x expansion; blocks are sized on their
  stage's max width (the first block and the transformer downsampling block too);
- a strided shortcut pools 2x2 with the zero padding of odd sides counted in the mean,
  then runs a bias-free 1x1 conv only where the width changes (no BN);
- the norm of attention and FFN sub-blocks is a LayerNorm over tokens *and* channels of each
  sample, with a per-channel affine;
- qkv has no bias; its rows for a subnet of width C and V-scale s are [0, C), [D, D + C),
  [2D, 2D + sC) concatenated, then cut per head into (q 16, k 16, v 16s): which rows serve
  as q, k or v depends on C and s;
- V goes through a bias-free 3x3 depthwise conv; the relative-position table
  [(2M-1)^2, D/16] is indexed with offsets on the stage's largest token grid M;
- the head is Linear(C, mul*C) + BN + Hardswish per token, mean over tokens,
  Linear(mul*C, hd) + Hardswish, classifier.

It has `Supernet`'s interface (`evit.nn.supernet_base`): `forward(x, arch)`, `active(arch)`
pairing each position with its `evit.blocks.Block`, and per position a `static_state(block)`
that hands the slices to the static modules (`evit.nn.reference_static`, and evit's default first conv,
stem and head), rearranging the qkv rows into the static layout and folding the head's
pre-BN bias into the BN's running mean. So extraction, export, LUTs, search and the
registry need no reference-specific code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evit.arch import Arch, MBStage
from evit.blocks import Block, has_shortcut_conv, mbconv_mid, se_channels
from evit.errors import UserError
from evit.nn.common import BN_EPS, BN_MOMENTUM, LN_EPS, crop_rel_table, init_module, max_token_sides, rel_pos_index
from evit.nn.elastic import ElasticBatchNorm2d, ElasticConv2d
from evit.nn.supernet_base import SupernetBase
from evit.space import SearchSpace

State = dict[str, Tensor]
QK_DIM = 16
"""The reference's q/k width per head (qk_scale 1); `space.head_dim` must equal it."""


def _prefixed(prefix: str, state: State) -> State:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def _bn(c: int) -> ElasticBatchNorm2d:
    return ElasticBatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


def _bn_state(bn: ElasticBatchNorm2d, c: int) -> State:
    return bn.static_state(c)


class RefElasticMBConv(nn.Module):
    """Reference MBConv position (`pw_conv`, `dw_conv`, `se_conv1/2`, `pwl_conv`, `shortcut_conv`)."""

    def __init__(self, width: int, expansion: int, kernel: int, se: bool, expand: bool = True) -> None:
        super().__init__()
        hidden = width * expansion
        if expand:
            self.pw_conv = ElasticConv2d(width, hidden, 1)
            self.pw_bn = _bn(hidden)
        self.dw_conv = ElasticConv2d(hidden, hidden, kernel, depthwise=True)
        self.dw_bn = _bn(hidden)
        if se:
            self.se_conv1 = ElasticConv2d(hidden, hidden // 4, 1, bias=True)
            self.se_conv2 = ElasticConv2d(hidden // 4, hidden, 1, bias=True)
        self.pwl_conv = ElasticConv2d(hidden, width, 1)
        self.pwl_bn = _bn(width)
        self.shortcut_conv = ElasticConv2d(width, width, 1)
        self.has_expand = expand
        self.has_se = se

    def forward(self, x: Tensor, b: Block) -> Tensor:  # type: ignore[override]
        c_in = x.shape[1]
        mid = mbconv_mid(c_in, b.expansion)
        y = F.hardswish(self.pw_bn(self.pw_conv(x, mid))) if self.has_expand else x
        y = F.hardswish(self.dw_bn(self.dw_conv(y, mid, b.kernel, b.stride)))
        if self.has_se:
            s = F.relu(self.se_conv1(y.mean((2, 3), keepdim=True), se_channels(mid, b.se_reduction)))
            y = y * F.hardsigmoid(self.se_conv2(s, mid))
        y = self.pwl_bn(self.pwl_conv(y, b.c_out))
        if c_in == b.c_out and b.stride == 1:
            return x + y
        s = x
        if b.stride > 1:
            s = F.avg_pool2d(s, 2, 2, padding=s.shape[-1] % 2, count_include_pad=True)
        if c_in != b.c_out:
            s = self.shortcut_conv(s, b.c_out)
        return s + y

    def static_state(self, b: Block) -> State:
        """Keys of `reference_static.RefMBConv` (and, for the stem, of evit's default static MBConv)."""
        if (b.expansion != 1) != self.has_expand or b.se != self.has_se:
            raise ValueError(f"block {b.key} does not fit this reference MBConv position")
        mid = mbconv_mid(b.c_in, b.expansion)
        state: State = {}
        if self.has_expand:
            state.update(_prefixed("expand.conv", self.pw_conv.static_state(b.c_in, mid)))
            state.update(_prefixed("expand.bn", _bn_state(self.pw_bn, mid)))
        state.update(_prefixed("dw.conv", self.dw_conv.static_state(mid, mid, b.kernel)))
        state.update(_prefixed("dw.bn", _bn_state(self.dw_bn, mid)))
        if self.has_se:
            rd = se_channels(mid, b.se_reduction)
            state.update(_prefixed("se.fc1", self.se_conv1.static_state(mid, rd)))
            state.update(_prefixed("se.fc2", self.se_conv2.static_state(rd, mid)))
        state.update(_prefixed("project.conv", self.pwl_conv.static_state(mid, b.c_out)))
        state.update(_prefixed("project.bn", _bn_state(self.pwl_bn, b.c_out)))
        if has_shortcut_conv(b):
            state.update(_prefixed("shortcut", self.shortcut_conv.static_state(b.c_in, b.c_out)))
        return state


class _Layers(nn.Module):
    """A container whose only child is `layers` (the reference's `*.layers.{i}` key level)."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class RefElasticAttention(nn.Module):
    """Attention sub-block `layers.{2j}` (and, in layer 0, the stage's `reduction` MBConv)."""

    def __init__(self, width: int, v_scale: int, table_side: int, reduction: RefElasticMBConv | None) -> None:
        super().__init__()
        self.width = width
        self.max_v = v_scale
        self.table_side = table_side
        m2 = table_side * table_side
        # registration order = the reference's state_dict order
        self.attention_bias = nn.Parameter(torch.zeros((2 * table_side - 1) ** 2, width // QK_DIM))
        self.register_buffer("relative_position_index", rel_pos_index(table_side, table_side).reshape(m2, m2))
        self.qkv = nn.Linear(width, (2 + v_scale) * width, bias=False)
        self.proj = nn.Linear(v_scale * width, width)
        self.dw_v_conv = ElasticConv2d(v_scale * width, v_scale * width, 3, depthwise=True)
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        if reduction is not None:
            self.reduction = reduction
        self._rows: dict[tuple[int, int, torch.device], Tensor] = {}
        self._rel: dict[tuple[int, torch.device], Tensor] = {}

    def rows(self, c: int, v_scale: int, device: torch.device) -> Tensor:
        """`qkv.weight` rows of width `c` and V-scale `v_scale`, in static order (q all heads, k all, v head-major)."""
        key = (c, v_scale, device)
        hit = self._rows.get(key)
        if hit is None:
            d, heads = self.width, c // QK_DIM
            used = torch.cat([torch.arange(c), d + torch.arange(c), 2 * d + torch.arange(v_scale * c)])
            per_head = used.reshape(heads, 2 * QK_DIM + QK_DIM * v_scale)  # the reference's (nh, P) cut
            hit = torch.cat([per_head[:, :QK_DIM].flatten(), per_head[:, QK_DIM:2 * QK_DIM].flatten(),
                             per_head[:, 2 * QK_DIM:].flatten()]).to(device)
            self._rows[key] = hit
        return hit

    def rel_bias(self, heads: int, side: int) -> Tensor:
        """(heads, (2*side-1)^2): the centre of the table, as an H-grid table would hold it."""
        return crop_rel_table(self.attention_bias[:, :heads].t(), self.table_side, side)

    def forward(self, x: Tensor, b: Block) -> Tensor:  # type: ignore[override]
        """x + attention(joint-LN(x)) on a B,C,H,W token map."""
        bs, c, h, w = x.shape
        n, heads, dv = h * w, c // QK_DIM, c * b.v_scale
        t = F.group_norm(x, 1, self.norm1.weight[:c], self.norm1.bias[:c], LN_EPS).flatten(2).transpose(1, 2)
        q, k, v = F.linear(t, self.qkv.weight[:, :c].index_select(0, self.rows(c, b.v_scale, x.device))) \
            .split([c, c, dv], dim=-1)
        q = q.reshape(bs, n, heads, QK_DIM).transpose(1, 2)
        k = k.reshape(bs, n, heads, QK_DIM).permute(0, 2, 3, 1)
        v = self.dw_v_conv(v.transpose(1, 2).reshape(bs, dv, h, w), dv, 3)
        v = v.reshape(bs, heads, dv // heads, n).transpose(2, 3)
        rel = self._rel.get((h, x.device))
        if rel is None:
            rel = self._rel[(h, x.device)] = rel_pos_index(h, h).to(x.device)
        bias = self.rel_bias(heads, h)[:, rel]
        attn = torch.matmul(q, k) * (QK_DIM ** -0.5) + bias
        out = torch.matmul(attn.softmax(dim=-1), v).transpose(1, 2).reshape(bs, n, dv)
        out = F.linear(F.hardswish(out), self.proj.weight[:c, :dv], self.proj.bias[:c])
        return x + out.transpose(1, 2).reshape(bs, c, h, w)

    def static_state(self, b: Block) -> State:
        c, heads = b.c_in, b.c_in // QK_DIM
        dv = c * b.v_scale
        return {
            "norm1.weight": self.norm1.weight[:c], "norm1.bias": self.norm1.bias[:c],
            "attn.qkv.weight": self.qkv.weight[:, :c].index_select(0, self.rows(c, b.v_scale, self.qkv.weight.device)),
            "attn.v_conv.weight": self.dw_v_conv.weight[:dv],
            "attn.rel_bias": self.rel_bias(heads, b.h),
            "attn.proj.weight": self.proj.weight[:c, :dv], "attn.proj.bias": self.proj.bias[:c],
        }


class RefElasticFFN(nn.Module):
    """FFN sub-block `layers.{2j+1}`: x + fc2(Hardswish(fc1(joint-LN(x))))."""

    def __init__(self, width: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: Tensor, b: Block) -> Tensor:  # type: ignore[override]
        bs, c, h, w = x.shape
        hidden = b.mlp_ratio * c
        t = F.group_norm(x, 1, self.norm1.weight[:c], self.norm1.bias[:c], LN_EPS).flatten(2).transpose(1, 2)
        t = F.linear(F.hardswish(F.linear(t, self.fc1.weight[:hidden, :c], self.fc1.bias[:hidden])),
                     self.fc2.weight[:c, :hidden], self.fc2.bias[:c])
        return x + t.transpose(1, 2).reshape(bs, c, h, w)

    def static_state(self, b: Block) -> State:
        c, hidden = b.c_in, b.mlp_ratio * b.c_in
        return {"norm2.weight": self.norm1.weight[:c], "norm2.bias": self.norm1.bias[:c],
                "mlp.fc1.weight": self.fc1.weight[:hidden, :c], "mlp.fc1.bias": self.fc1.bias[:hidden],
                "mlp.fc2.weight": self.fc2.weight[:c, :hidden], "mlp.fc2.bias": self.fc2.bias[:c]}


# --- positions that span several reference modules (plain objects: they own no parameters) -----

class _FirstConvView:
    def __init__(self, net: ReferenceSupernet) -> None:
        self.net = net

    def __call__(self, x: Tensor, b: Block) -> Tensor:
        n = self.net
        return F.hardswish(n.first_conv_bn(n.first_conv(x, b.c_out, 3, b.stride)))

    def static_state(self, b: Block) -> State:
        n = self.net
        return {**_prefixed("conv", n.first_conv.static_state(3, b.c_out, 3)),
                **_prefixed("bn", _bn_state(n.first_conv_bn, b.c_out))}


class _LayerView:
    """One transformer layer (an evit "attn" block) = the reference's attention + FFN modules."""

    def __init__(self, attn: RefElasticAttention, ffn: RefElasticFFN) -> None:
        self.attn, self.ffn = attn, ffn

    def __call__(self, x: Tensor, b: Block) -> Tensor:
        return self.ffn(self.attn(x, b), b)

    def static_state(self, b: Block) -> State:
        return {**self.attn.static_state(b), **self.ffn.static_state(b)}


class _HeadView:
    def __init__(self, net: ReferenceSupernet) -> None:
        self.net = net

    def __call__(self, x: Tensor, b: Block) -> Tensor:
        n = self.net
        bs, c = x.shape[:2]
        e = b.expansion * c
        t = F.linear(x.flatten(2).transpose(1, 2), n.pre_head_0.weight[:e, :c], n.pre_head_0.bias[:e])
        t = F.hardswish(n.pre_head_norm_0(t.reshape(-1, e))).reshape(bs, -1, e).mean(1)
        t = F.hardswish(F.linear(t, n.pre_head_1.weight[:, :e], n.pre_head_1.bias))
        return n.classifer(F.dropout(t, n.head_dropout, n.training))

    def static_state(self, b: Block) -> State:
        """Keys of evit's static `Head`; pre_head_0's bias folds into the BN mean (BN(x+b) = BN'(x))."""
        n = self.net
        c, e = b.c_in, b.expansion * b.c_in
        bn = _bn_state(n.pre_head_norm_0, e)
        bn["running_mean"] = bn["running_mean"] - n.pre_head_0.bias[:e]
        return {"pre.conv.weight": n.pre_head_0.weight[:e, :c].reshape(e, c, 1, 1), **_prefixed("pre.bn", bn),
                "fc.weight": n.pre_head_1.weight[:, :e], "fc.bias": n.pre_head_1.bias,
                "classifier.weight": n.classifer.weight, "classifier.bias": n.classifer.bias}


class ReferenceSupernet(SupernetBase):
    """All subnets of a reference-variant space on the reference's own parameter layout."""

    CLASSIFIER = "classifer"
    STEM = ("first_conv", "first_conv_bn", "conv_stem")

    def __init__(self, space: SearchSpace) -> None:
        check_reference_space(space)
        super().__init__(space)
        self.head_dropout = space.head_dropout
        sides = max_token_sides(space)
        c0 = max(space.stem_widths)
        self.first_conv = ElasticConv2d(3, c0, 3)
        self.first_conv_bn = _bn(c0)
        self.conv_stem = _Layers([nn.ModuleList([RefElasticMBConv(c0, 1, max(space.stem_kernels), se=False,
                                                                  expand=False)])
                                  for _ in range(max(space.stem_depths))])
        stages: list[nn.Module] = []
        for i, ss in enumerate(space.stages):
            w = max(ss.widths)
            if ss.kind == "mbconv":
                stages.append(_Layers([nn.ModuleList([RefElasticMBConv(w, max(ss.expansions), max(ss.kernels), ss.se)])
                                       for _ in range(max(ss.depths))]))
                continue
            layers: list[nn.Module] = []
            for j in range(max(ss.depths)):
                red = RefElasticMBConv(w, space.ds_expansion, 3, se=True) if j == 0 else None
                layers += [RefElasticAttention(w, max(ss.v_scales), sides[i], red),
                           RefElasticFFN(w, max(ss.mlp_ratios))]
            stages.append(_Layers(layers))
        self.feature_exactor = nn.ModuleList(stages)  # sic: the reference's key names
        d6 = max(space.stages[-1].widths)
        e6 = space.head_expansion * d6
        self.pre_head_0 = nn.Linear(d6, e6)
        self.pre_head_norm_0 = _bn(e6)
        self.pre_head_1 = nn.Linear(e6, space.head_width)
        self.classifer = nn.Linear(space.head_width, space.num_classes)
        init_module(self)
        self._first, self._head = _FirstConvView(self), _HeadView(self)

    def positions(self, arch: Arch) -> list[Any]:
        mods: list[Any] = [self._first, *(lay[0] for lay in list(self.conv_stem.layers)[: arch.stem.depth])]
        for st, stage in zip(arch.stages, self.feature_exactor, strict=True):
            layers = list(stage.layers)
            if isinstance(st, MBStage):
                mods.extend(lay[0] for lay in layers[: st.depth])
            else:
                mods.append(layers[0].reduction)
                mods.extend(_LayerView(layers[2 * j], layers[2 * j + 1]) for j in range(st.depth))
        mods.append(self._head)
        return mods


def check_reference_space(space: SearchSpace) -> None:
    """Raise UserError unless `space` has the shape the reference's modules can hold."""
    problems = []
    if space.variant != "reference":
        problems.append(f"variant is {space.variant!r}, not 'reference'")
    if space.head_dim != QK_DIM:
        problems.append(f"head_dim {space.head_dim} != {QK_DIM}")
    kinds = [s.kind for s in space.stages]
    n_mb = kinds.count("mbconv")
    if kinds != ["mbconv"] * n_mb + ["transformer"] * (len(kinds) - n_mb):
        problems.append(f"stages must be MBConv stages then transformer stages, got {kinds}")
    if space.first_stride != 2:
        problems.append("the first conv must have stride 2")
    if problems:
        raise UserError(f"space '{space.name}' cannot be a reference supernet: {'; '.join(problems)}")
