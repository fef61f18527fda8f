"""The paper's FLOPs convention (`reference`) of the one counter, and the released models.

- The nine released models count to the paper's figures (within 0.01 M; in fact 0.001 M).
- Random paper-space subnets: the analytic `reference` count equals an independent count
  of the real static module's forward pass with hooks that apply the reference's four
  rules (no SE and no shortcut conv in a transformer stage's downsampling block; 1 MAC
  per element for the depthwise conv on V; the downsampling expand conv at stride x its
  output side). The `true` convention stays what tests/test_flops_hooks.py checks.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from evit import blocks as blocks_mod
from evit import flops
from evit.cli import app
from evit.config import parse_params
from evit.nn.common import MatMul
from evit.nn.static import MBConv, StaticSubnet
from evit.released import RELEASED, resolve_arch
from evit.resolve import space_from_params
from evit.space import IMAGENET

REF = IMAGENET.with_convention("reference")


def test_released_models_count_to_the_papers_figures() -> None:
    assert list(RELEASED) == ["T1", "T2", "S1", "S2", "M", "L1", "L1.5", "L2", "L3"]
    for m in RELEASED.values():
        REF.validate(m.arch)
        assert flops.flops_m(m.arch, REF) == pytest.approx(m.reference_flops_m, abs=0.001), m.name
        # the true count is larger by exactly the four rules' terms (T1: 64.943 vs 62.915)
        assert flops.flops_m(m.arch, IMAGENET) > flops.flops_m(m.arch, REF)
    assert flops.flops_m(RELEASED["T1"].arch, IMAGENET) == pytest.approx(64.943, abs=0.001)


class ReferenceHookCounter:
    """MACs per sample of the real forward pass, counted the reference implementation's way."""

    def __init__(self, net: nn.Module, downsampling: list[MBConv]) -> None:
        self.macs = 0
        skip: set[int] = set()
        self.expand_convs: set[int] = set()  # counted once their block's dw conv gives the output side
        self.dw_to_expand: dict[int, int] = {}
        for block in downsampling:
            skip |= {id(m) for m in block.se.modules()} | {id(m) for m in block.shortcut.modules()}  # rules 1, 2
            self.expand_convs.add(id(block.expand.conv))
            self.dw_to_expand[id(block.dw.conv)] = id(block.expand.conv)
        self.handles = [m.register_forward_hook(self._hook) for m in net.modules()
                        if isinstance(m, (nn.Conv2d, nn.Linear, MatMul, nn.Softmax)) and id(m) not in skip]
        self.pending: dict[int, tuple[nn.Conv2d, int]] = {}

    def _hook(self, m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            per_out = (m.in_channels // m.groups) * kh * kw
            if m.groups == m.in_channels and kh == 3 and out.dim() == 4 and self._is_v_conv(m):
                per_out = 1  # rule 3
            if id(m) in self.expand_convs:  # rule 4: counted once the dw conv gives the output side
                self.pending[id(m)] = (m, out.shape[1])
                return
            self.macs += out[0].numel() * per_out
            expand = self.dw_to_expand.get(id(m))
            if expand is not None:
                conv, c_mid = self.pending.pop(expand)
                side = m.stride[0] * out.shape[-1]
                self.macs += conv.in_channels * c_mid * side * side
        elif isinstance(m, nn.Linear):
            self.macs += out[0].numel() * m.in_features
        elif isinstance(m, MatMul):
            self.macs += math.prod(out.shape[1:]) * inputs[0].shape[-1]
        else:
            self.macs += out[0].numel()

    def _is_v_conv(self, m: nn.Conv2d) -> bool:
        return getattr(m, "_evit_v_conv", False)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _reference_hook_count(arch) -> int:  # noqa: ANN001
    net = StaticSubnet(arch, REF).eval()
    blocks = blocks_mod.arch_blocks(arch, REF)
    downsampling = [mod for mod, b in zip(net, blocks) if b.downsample]
    assert len(downsampling) == 4  # one per transformer stage
    for mod in net.modules():
        if hasattr(mod, "v_conv"):
            mod.v_conv._evit_v_conv = True
    counter = ReferenceHookCounter(net, downsampling)
    with torch.no_grad():
        net(torch.zeros(1, 3, arch.resolution, arch.resolution))
    counter.close()
    assert not counter.pending
    return counter.macs


def test_random_paper_subnets_match_a_reference_hook_count() -> None:
    rng = random.Random(3)
    # every resolution, incl. the odd-side ones (160, 176, 224) where rule 4 overcounts
    archs = [replace(REF.sample_uniform(rng), resolution=r) for r in REF.resolutions]
    archs.append(RELEASED["T2"].arch)
    for a in archs:
        assert flops.flops_m(a, REF) * 1e6 == pytest.approx(_reference_hook_count(a), abs=1), a.key


def test_convention_is_a_params_option_and_only_changes_counting() -> None:
    p = parse_params({"space": {"preset": "imagenet", "flops_convention": "reference"}})
    sp = space_from_params(p.space)
    assert sp.flops_convention == "reference"
    assert sp.structure_dict() == IMAGENET.structure_dict()  # same weights, same LUTs
    t1 = RELEASED["T1"].arch
    want = {"true": flops.flops_m(t1, IMAGENET), "reference": flops.flops_m(t1, REF)}
    assert flops.flops_by_convention(t1, sp) == want
    assert sp.level_of(flops.flops_m(RELEASED["S1"].arch, sp)) == 1  # 217.6 lies in level 200 (200..220)
    with pytest.raises(Exception, match="flops_convention"):
        parse_params({"space": {"flops_convention": "paper"}})


def test_arch_cli_by_name_prints_both_conventions(tmp_path) -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["arch", "info", "S1"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    assert info["name"] == "S1" and info["space"] == "imagenet" and info["flops_convention"] == "true"
    assert info["flops_reference_m"] == pytest.approx(217.642, abs=0.001)
    assert info["flops_m"] == info["flops_true_m"] == pytest.approx(221.998, abs=0.001)
    out = runner.invoke(app, ["arch", "info", "s1", "--convention", "reference"])
    assert json.loads(out.output)["flops_m"] == pytest.approx(217.642, abs=0.001)
    listed = json.loads(runner.invoke(app, ["arch", "list"]).output)["models"]
    assert [m["name"] for m in listed] == list(RELEASED)
    assert all(abs(m["flops_reference_m"] - m["paper_flops_m"]) < 0.001 for m in listed)
    # a JSON file works the same; a bad name is one line, exit 2
    f = tmp_path / "mine.json"
    f.write_text(RELEASED["T1"].arch.to_json())
    assert resolve_arch(str(f)) == ("mine", RELEASED["T1"].arch)
    assert json.loads(runner.invoke(app, ["arch", "info", str(f), "--space", "imagenet"]).output)["key"] == \
        RELEASED["T1"].arch.key
    bad = runner.invoke(app, ["arch", "info", "T9"])
    assert bad.exit_code == 2 and "neither a released model" in bad.output
