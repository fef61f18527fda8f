"""Elastic supernet and static subnets: equivalence, rebuild, export, training, size.

Weights are randomised before equivalence checks (BN gammas away from their zero init,
random running stats, random relative-position tables and biases): with the init alone,
every MBConv branch would output zeros and the checks would miss slicing bugs there.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from evit.arch import Arch, ArchError
from evit.blocks import arch_blocks
from evit.errors import CheckpointError
from evit.flops import count
from evit.formats.onnx import export_onnx, export_onnx_input
from evit.formats.torchscript import export_torchscript
from evit.nn.static import StaticSubnet, block_input_shape, build_block, extract, load_static
from evit.nn.supernet import Supernet
from evit.space import CPU, IMAGENET, SearchSpace

# Supernet of the imagenet space with 1,000 classes: 37,618,158 parameters (37.6M; the
# largest subnet at 256 px holds every one of them). The reference reports 40.5M; see
# evit/nn/supernet.py for our breakdown and the likely sources of the gap. The test asserts
# a range that catches gross mistakes (a missing stage, a doubled head) without freezing
# every detail of the structure.


def randomise(net: nn.Module, seed: int) -> None:
    """Move every parameter and BN statistic away from its init, keeping activations O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)

    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                uniform(m.weight, 0.3, 1.0)
                uniform(m.bias, -0.1, 0.1)
            if isinstance(m, nn.BatchNorm2d):
                uniform(m.running_mean, -0.1, 0.1)
                uniform(m.running_var, 0.5, 1.5)
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                uniform(m.bias, -0.1, 0.1)
            rel = getattr(m, "rel_bias", None)
            if isinstance(rel, nn.Parameter):
                uniform(rel, -1.0, 1.0)


@pytest.fixture(scope="module")
def cpu_supernet() -> Supernet:
    net = Supernet(CPU)
    randomise(net, 0)
    return net.eval()


@pytest.fixture(scope="module")
def imagenet_supernet() -> Supernet:
    net = Supernet(IMAGENET.with_classes(1000))
    randomise(net, 1)
    return net.eval()


def _max_diff(supernet: Supernet, arch: Arch, batch: int, seed: int) -> float:
    static = extract(supernet, arch)
    x = torch.randn(batch, 3, arch.resolution, arch.resolution, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = supernet(x, arch)
        out = static(x)
    assert torch.isfinite(ref).all() and ref.abs().max() > 1e-3  # the check is not vacuous
    return (ref - out).abs().max().item()


def test_extract_equals_supernet_cpu(cpu_supernet: Supernet) -> None:
    rng = random.Random(0)
    archs = [CPU.smallest(), CPU.largest(), *(CPU.sample_uniform(rng) for _ in range(30))]
    worst = max(_max_diff(cpu_supernet, a, 4, i) for i, a in enumerate(archs))
    assert worst < 1e-5


def test_extract_equals_supernet_imagenet(imagenet_supernet: Supernet) -> None:
    space = imagenet_supernet.space
    rng = random.Random(1)
    # One uniform draw per resolution: every token-map side, so every bias-table crop.
    archs = [replace(space.sample_uniform(rng), resolution=r) for r in space.resolutions]
    archs += [space.smallest(), replace(space.largest(), resolution=160)]
    worst = max(_max_diff(imagenet_supernet, a, 2, i) for i, a in enumerate(archs))
    assert worst < 1e-5


def test_extract_owns_its_weights(cpu_supernet: Supernet) -> None:
    arch = CPU.sample_uniform(random.Random(3))
    static = extract(cpu_supernet, arch)
    before = {k: v.clone() for k, v in static.state_dict().items()}
    saved = {k: v.clone() for k, v in cpu_supernet.state_dict().items()}
    with torch.no_grad():
        for p in cpu_supernet.parameters():
            p.add_(1.0)
    after = static.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    cpu_supernet.load_state_dict(saved)


def test_load_static_rebuilds_from_arch_json_and_state_dict(cpu_supernet: Supernet) -> None:
    arch = CPU.sample_uniform(random.Random(4))
    static = extract(cpu_supernet, arch)
    buf = io.BytesIO()
    torch.save({"arch": arch.to_json(), "space": CPU.to_dict(), "state_dict": static.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    rebuilt = load_static(Arch.from_json(ckpt["arch"]), CPU, ckpt["state_dict"])
    assert isinstance(rebuilt, StaticSubnet) and rebuilt.arch == arch and not rebuilt.training
    x = torch.randn(3, 3, arch.resolution, arch.resolution)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), static(x))
    # A state_dict of another arch is a user error naming the arch, not a raw RuntimeError.
    other = next(a for a in (CPU.sample_uniform(random.Random(i)) for i in range(50)) if a != arch)
    with pytest.raises(CheckpointError, match=other.key):
        load_static(other, CPU, ckpt["state_dict"])


def _export_roundtrip(static: StaticSubnet, tmp_path: Path) -> tuple[float, float]:
    r = static.arch.resolution
    onnx_path = export_onnx(static, r, tmp_path / "net.onnx")
    ts_path = export_torchscript(static, r, tmp_path / "net.pt")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave nothing behind
    x = torch.randn(3, 3, r, r, generator=torch.Generator().manual_seed(0))  # batch 3: the axis is dynamic
    with torch.no_grad():
        ref = static(x)
        ts = torch.jit.load(str(ts_path))(x)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"image": x.numpy()})
    scale = max(1.0, ref.abs().max().item())
    return float(np.abs(got - ref.numpy()).max()) / scale, (ts - ref).abs().max().item()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_static_exports_match_pytorch(cpu_supernet: Supernet, imagenet_supernet: Supernet,
                                      tmp_path: Path) -> None:
    # 176 px: odd token maps (11x11, 6x6, 3x3), ceil-mode pooled shortcuts, cropped bias tables.
    cases = [extract(cpu_supernet, CPU.sample_uniform(random.Random(5))),
             extract(imagenet_supernet, replace(IMAGENET.sample_uniform(random.Random(6)), resolution=176))]
    for i, static in enumerate(cases):
        onnx_err, ts_err = _export_roundtrip(static, tmp_path / str(i))
        assert onnx_err < 1e-4, static.arch.key
        assert ts_err < 1e-5, static.arch.key


def test_supernet_size_imagenet() -> None:
    net = Supernet(IMAGENET.with_classes(1000))
    n = sum(p.numel() for p in net.parameters())
    assert 35e6 < n < 42e6, n
    # Every shared weight belongs to the largest subnet at the largest resolution (its bias
    # tables are the uncropped ones), so the supernet holds nothing the analytic counter
    # does not see.
    assert round(count(IMAGENET.largest(), IMAGENET).params_m * 1e6) == n


def test_cli_prints_supernet_size() -> None:
    from typer.testing import CliRunner

    from evit.cli import app

    result = CliRunner().invoke(app, ["arch", "info", "--space", "cpu", "--supernet"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["supernet_params"] == sum(p.numel() for p in Supernet(CPU).parameters())


@pytest.mark.parametrize("space", [CPU, IMAGENET], ids=lambda s: s.name)
def test_supernet_trains_random_archs(space: SearchSpace) -> None:
    torch.manual_seed(0)
    net = Supernet(space, drop_path=0.1).train()
    rng = random.Random(7)
    archs = [space.smallest(), *(space.sample_uniform(rng) for _ in range(2))]
    if space is IMAGENET:
        archs = [replace(a, resolution=128) for a in archs]
    bn = net.first_conv.body.bn
    for arch in archs:
        net.zero_grad(set_to_none=True)
        mean_before = bn.running_mean.clone()
        x = torch.randn(2, 3, arch.resolution, arch.resolution)
        y = torch.randint(0, space.num_classes, (2,))
        loss = nn.functional.cross_entropy(net(x, arch), y)
        loss.backward()
        assert torch.isfinite(loss)
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        # Only the active slices learn: channels beyond the stem width get no gradient and
        # keep their running statistics.
        c = arch.stem.width
        w_grad = net.first_conv.body.conv.weight.grad
        assert w_grad is not None and w_grad[:c].abs().sum() > 0
        assert torch.equal(w_grad[c:], torch.zeros_like(w_grad[c:]))
        assert not torch.equal(bn.running_mean[:c], mean_before[:c])
        assert torch.equal(bn.running_mean[c:], mean_before[c:])
    # A stage layer beyond the drawn depth gets no gradient at all.
    last = net.stages[-1].layers[-1]
    if archs[-1].stages[-1].depth < len(net.stages[-1].layers):
        assert all(p.grad is None for p in last.parameters())


def test_supernet_rejects_bad_inputs(cpu_supernet: Supernet) -> None:
    arch = CPU.smallest()
    with pytest.raises(ArchError, match="resolution"):
        cpu_supernet(torch.zeros(1, 3, 64, 64), replace(arch, resolution=64))
    with pytest.raises(ValueError, match="px"):
        cpu_supernet(torch.zeros(1, 3, 40, 40), arch)


def test_blocks_stand_alone_for_latency_tables(tmp_path: Path) -> None:
    """Each LUT block runs alone on `block_input_shape` and exports alone (ONNX = PyTorch)."""
    arch = CPU.sample_uniform(random.Random(8))
    for i, block in enumerate(arch_blocks(arch, CPU)):
        module = build_block(block).eval()
        x = torch.randn(block_input_shape(block, 2))
        with torch.no_grad():
            y = module(x)
        expected = (2, block.c_out) if block.kind == "head" else (2, block.c_out, block.h_out, block.h_out)
        assert tuple(y.shape) == expected, block.key
        if block.kind == "attn":
            path = export_onnx_input(module, x, tmp_path / f"{i}.onnx")
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            (got,) = sess.run(None, {"image": x.numpy()})
            assert np.abs(got - y.numpy()).max() < 1e-4


def narrowing(space: SearchSpace, seed: int = 0) -> Arch:
    """A subnet of `space` whose width decreases at some stage (sampling never draws one)."""
    rng = random.Random(seed)
    while True:
        a = space.sample_uniform(rng)
        for i in range(1, len(a.stages)):
            lower = [w for w in space.stages[i].widths if w < a.stages[i - 1].width]
            if lower:
                stages = list(a.stages)
                stages[i] = replace(stages[i], width=min(lower))
                return replace(a, stages=tuple(stages))


def test_the_supernet_computes_subnets_whose_widths_decrease() -> None:
    """The width rule is for what sampling draws; the weights compute any choices of the space."""
    sp = CPU.with_classes(5)
    arch = narrowing(sp)
    assert sp.width_rule(arch) is not None and not sp.is_valid(arch)
    assert sp.validate_computable(arch) is arch
    with pytest.raises(ArchError, match="must not decrease"):
        sp.validate(arch)
    net = Supernet(sp).eval()
    x = torch.randn(2, 3, arch.resolution, arch.resolution)
    with torch.no_grad():
        y = net(x, arch)
        assert torch.allclose(extract(net, arch).eval()(x), y, atol=1e-5)
    too_wide = replace(arch, stem=replace(arch.stem, width=max(sp.stem_widths) + 8))
    with pytest.raises(ArchError, match="outside"):  # a choice the weights do not have still fails
        net(x, too_wide)
