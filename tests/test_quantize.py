"""int8 ExecuTorch exports: the one quantize function, its float policy, and the runtime check.

One tiny static subnet (the TINY space's smallest, weights moved off their init so the
logits have a scale) is lowered once in fp32 and once in int8 (module fixture: a
quantized lowering takes ~20 s here); the tests read those two files.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from search_export_helpers import TINY, tiny_supernet
from test_nn import randomise

from evit.formats.inputs import seeded_input

INT8_TOLERANCE = 0.05
"""Largest max-abs difference of the int8 program's logits from the fp32 program's, relative
to the fp32 logits' largest magnitude, on seeded inputs (the measured value is ~0.2%)."""


@pytest.fixture(scope="module")
def lowered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from evit.formats.pte import export_pte
    from evit.nn.static import extract

    net = tiny_supernet(3)
    randomise(net, 3)
    arch = TINY.smallest()
    static = extract(net, arch).eval()
    r = arch.resolution
    root = tmp_path_factory.mktemp("int8")
    example = seeded_input((1, 3, r, r))
    fp32 = export_pte(static, example, root / "fp32.pte")
    int8 = export_pte(static, example, root / "int8.pte", int8_calibration=[seeded_input((8, 3, r, r), 1)])
    return {"root": root, "r": r, "fp32": fp32, "int8": int8, "static": static}


def test_int8_pte_runs_in_executorch_and_matches_its_fp32_export(lowered: dict[str, Any]) -> None:
    from evit.formats.pte import run_pte

    root, r = lowered["root"], lowered["r"]
    assert (root / "int8.pte").stat().st_size < (root / "fp32.pte").stat().st_size  # int8 weights
    for seed in (10, 11, 12):
        x = seeded_input((1, 3, r, r), seed)
        f, q = run_pte(root / "fp32.pte", x), run_pte(root / "int8.pte", x)
        assert torch.isfinite(q).all()
        assert (q - f).abs().max() <= INT8_TOLERANCE * f.abs().max()
        assert not torch.equal(q, f)  # really quantized


def test_int8_lowering_report_lists_what_stayed_float(lowered: dict[str, Any]) -> None:
    from evit.formats.quantize import INT8_POLICY

    rep = lowered["int8"].to_dict()
    assert rep["partitions"] >= 1 and rep["outside_ops"] == {}  # XNNPACK takes the float ops too
    assert "quantization" not in lowered["fp32"].to_dict()
    quant = rep["quantization"]
    assert quant["policy"] == INT8_POLICY and quant["calibration_inputs"] == 8
    assert quant["int8_ops"]["conv2d"] > 0 and quant["int8_ops"]["linear"] > 0
    # the policy: LayerNorm and the attention scores float, in the transformer block only
    assert {"softmax", "bmm", "rsqrt"} <= set(quant["float_ops"])
    attention_blocks = [b for b, ops in quant["float_ops_by_block"].items() if "softmax" in ops]
    assert len(attention_blocks) == TINY.smallest().stages[-1].depth  # one per transformer layer


def test_no_calibration_input_is_an_error() -> None:
    from evit.formats.quantize import quantize_int8

    with pytest.raises(ValueError, match="at least one calibration input"):
        quantize_int8(torch.nn.Conv2d(3, 4, 3).eval(), torch.zeros(1, 3, 8, 8), [])


def test_policy_marks_layernorm_and_attention_ops_float() -> None:
    import torch.fx

    from evit.formats.quantize import keeps_float

    def node(stack: dict[str, tuple[str, str]]) -> Any:
        g = torch.fx.Graph()
        n = g.placeholder("x")
        n.meta["nn_module_stack"] = stack
        return n

    assert keeps_float(node({"a": ("4.norm1", "evit.nn.static.LayerNorm4d")}))
    assert keeps_float(node({"a": ("4", "evit.nn.static.TransformerLayer"), "b": ("4.attn", "evit.nn.static.Attention")}))
    assert not keeps_float(node({"b": ("4.attn", "evit.nn.static.Attention"),
                                 "c": ("4.attn.qkv", "torch.nn.modules.linear.Linear")}))
    assert not keeps_float(node({}))

