"""Export-friendly static subnets: same function as the plain forms, taken whole by mobile delegates.

`evit.nn.static` writes layer norm, the relative-position bias, the attention products,
the q/k/v split, the head's pool and the shortcut's pool in forms XNNPACK delegates
take. Here: (1) each subnet computes what the plain forms compute (a copy of the subnet
with the plain forwards swapped back in, within 1e-6); (2) the bias buffer follows the
weights; (3) ExecuTorch's XNNPACK partitioner takes a few cpu- and imagenet-space
subnets in at most 2 partitions with no compute op left outside, and the .pte runs.
LiteRT's full delegation needs the converter venv: tests/test_mobile_export.py.
"""

from __future__ import annotations

import copy
import random
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evit.arch import Arch
from evit.nn.common import MatMul
from evit.nn.static import Attention, ConvShortcut, Head, LayerNorm4d, StaticSubnet
from evit.space import CPU, IMAGENET, SearchSpace
from tests.test_nn import randomise


def _plain_attention(self: Attention, t: Tensor, h: int, w: int) -> Tensor:
    """Attention.forward as it was before the export-friendly forms (split, 4-D matmul, gather)."""
    b, n, _ = t.shape
    q, k, v = self.qkv(t).split(self.split, dim=-1)
    q = q.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
    k = k.reshape(b, n, self.heads, self.head_dim).permute(0, 2, 3, 1)
    v = self.v_conv(v.transpose(1, 2).reshape(b, self.dv, h, w))
    v = v.reshape(b, self.heads, self.dv // self.heads, n).transpose(2, 3)
    attn = torch.matmul(q, k) * self.scale + self.rel_bias[:, self.rel_index]
    out = torch.matmul(self.softmax(attn), v)
    return self.proj(self.act(out.transpose(1, 2).reshape(b, n, self.dv)))


def _plain_head(self: Head, x: Tensor) -> Tensor:
    x = self.pre(x).mean((2, 3))
    return self.classifier(self.drop(self.act(self.fc(x))))


def plain_copy(net: StaticSubnet) -> StaticSubnet:
    """A copy of `net` running the plain forms: nn.LayerNorm, gather, split, matmul, ceil pools."""
    ref = copy.deepcopy(net)
    for m in ref.modules():
        if isinstance(m, LayerNorm4d):
            m.forward = types.MethodType(nn.LayerNorm.forward, m)  # type: ignore[method-assign]
        elif isinstance(m, Attention):
            m.forward = types.MethodType(_plain_attention, m)  # type: ignore[method-assign]
        elif isinstance(m, Head):
            m.forward = types.MethodType(_plain_head, m)  # type: ignore[method-assign]
        elif isinstance(m, ConvShortcut) and isinstance(m.pool, nn.AvgPool2d):
            m.pool.ceil_mode = True
        elif isinstance(m, MatMul):
            m.forward = types.MethodType(lambda _self, a, b: torch.matmul(a, b), m)  # type: ignore[method-assign]
    return ref


def _archs(space: SearchSpace, n: int, seed: int) -> list[Arch]:
    rng = random.Random(seed)
    return [space.smallest(), space.largest(), *(space.sample_uniform(rng) for _ in range(n))]


@pytest.mark.parametrize("space", [CPU, IMAGENET.with_classes(100)], ids=["cpu", "imagenet"])
def test_export_friendly_forms_compute_the_plain_function(space: SearchSpace) -> None:
    archs = _archs(space, 6, 0)
    if space.name == "imagenet":  # keep it quick: the smallest resolution, every structure
        archs = [replace(a, resolution=min(space.resolutions)) for a in archs]
    worst = 0.0
    for i, arch in enumerate(archs):
        net = StaticSubnet(arch, space)
        randomise(net, i)
        net.eval()
        x = torch.randn(2, 3, arch.resolution, arch.resolution, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            got, ref = net(x), plain_copy(net)(x)
        assert ref.abs().max() > 1e-2  # not vacuous
        worst = max(worst, (got - ref).abs().max().item())
    assert worst <= 1e-6, worst


def test_layer_norm_4d_matches_layer_norm() -> None:
    """The form torch.export traces (and so every mobile file holds) is the layer norm, within 1e-6."""
    ln = LayerNorm4d(48)
    randomise(ln, 3)
    x = torch.randn(2, 49, 48) * 3 + 1
    with torch.no_grad():
        ref = F.layer_norm(x, (48,), ln.weight, ln.bias, ln.eps)
        assert (ln.decomposed(x) - ref).abs().max() <= 1e-6
        assert torch.equal(ln(x), ref)  # eager: torch's own layer norm
        exported = torch.export.export(ln, (x,))
    assert "layer_norm" not in str(exported.graph) and "mean" in str(exported.graph)
    assert (exported.module()(x) - ref).abs().max() <= 1e-6


def test_shortcut_pool_keeps_ceil_mode_only_where_a_window_is_partial() -> None:
    assert ConvShortcut(8, 16, 2, side=14).pool.ceil_mode is False
    assert ConvShortcut(8, 16, 2, side=7).pool.ceil_mode is True
    assert ConvShortcut(8, 16, 2).pool.ceil_mode is True  # side unknown: the general form


def test_gathered_bias_follows_the_weights() -> None:
    """The (heads, N, N) buffer is refreshed on eval() and on load_state_dict, and never saved."""
    arch = CPU.largest()
    net = StaticSubnet(arch, CPU)
    attn = next(m for m in net.modules() if isinstance(m, Attention))
    assert "attn_bias" not in "".join(net.state_dict())
    with torch.no_grad():
        attn.rel_bias.normal_()
    net.eval()
    assert torch.equal(attn.attn_bias, attn.rel_bias[:, attn.rel_index])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    key = next(k for k in state if k.endswith("rel_bias"))
    state[key] += 1.0
    net.load_state_dict(state)
    assert torch.equal(attn.attn_bias, attn.rel_bias[:, attn.rel_index])
    x = torch.randn(1, 3, arch.resolution, arch.resolution)
    with torch.no_grad():
        assert (net(x) - plain_copy(net)(x)).abs().max() <= 1e-6


def _lowering_check(space: SearchSpace, arch: Arch, tmp_path) -> None:  # noqa: ANN001
    from evit.formats.pte import export_pte, run_pte

    net = StaticSubnet(arch, space)
    randomise(net, 0)
    net.eval()
    x = torch.randn(1, 3, arch.resolution, arch.resolution, generator=torch.Generator().manual_seed(0))
    report = export_pte(net, x, tmp_path / f"{space.name}.pte")
    assert 1 <= report.partitions <= 2 and report.outside == {}, (arch.key, report)
    with torch.no_grad():
        ref = net(x)
    assert (run_pte(tmp_path / f"{space.name}.pte", x) - ref).abs().max() <= 1e-4


def test_executorch_delegates_cpu_space_subnets_whole(tmp_path) -> None:  # noqa: ANN001
    for arch in _archs(CPU, 1, 5)[1:]:  # largest + one random draw (the smallest has fewer op kinds)
        _lowering_check(CPU, arch, tmp_path)


@pytest.mark.slow
def test_executorch_delegates_imagenet_space_subnets_whole(tmp_path) -> None:  # noqa: ANN001
    space = IMAGENET.with_classes(100)
    rng = random.Random(7)
    # a random draw at the smallest resolution: every structure of the space, lowered in minutes
    for arch in (space.smallest(), replace(space.sample_uniform(rng), resolution=min(space.resolutions))):
        _lowering_check(space, arch, tmp_path)
