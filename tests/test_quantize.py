"""int8 ExecuTorch exports: the one quantize function, its float policy, the runtime's
accuracy on the card, the drop flag, and fetch by precision.

One tiny static subnet (the TINY space's smallest, weights moved off their init so the
logits have a scale) is exported once with `model.pte` and `model.int8.pte` (module
fixture: a quantized lowering takes ~20 s here); the tests read that folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures_servers import MlflowServer, mlflow_server  # noqa: F401
from search_export_helpers import TINY, make_export, registry_params, tiny_supernet
from test_nn import randomise

from evit.formats.inputs import seeded_input
from evit.io import read_json, sha256_file

INT8_TOLERANCE = 0.05
"""Largest max-abs difference of the int8 program's logits from the fp32 program's, relative
to the fp32 logits' largest magnitude, on seeded inputs (measured: ~0.2%)."""


class _Data:
    """A prepared-data stand-in: seeded images, val labelled by the float subnet itself."""

    def __init__(self, static: Any, r: int) -> None:
        self.path, self.content_hash, self.classes = f"int8-test-{id(self)}", "h", [f"c{i}" for i in range(4)]
        x = seeded_input((24, 3, r, r), 5)
        with torch.no_grad():
            self._splits = {"search": (seeded_input((40, 3, r, r), 6), torch.zeros(40, dtype=torch.long)),
                            "val": (x, static(x).argmax(-1))}

    def counts(self, split: str) -> dict[str, int]:
        return {"all": len(self._splits[split][0])}

    def tensors(self, split: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._splits[split]


def _int8_export(folder: Path, formats: tuple[str, ...]) -> dict[str, Any]:
    """The tiny supernet's smallest subnet exported in `formats`, each with its int8 file."""
    from evit.export.int8 import Int8Inputs, calibration_images, runtime_top1
    from evit.nn.static import extract

    net = tiny_supernet(3)
    randomise(net, 3)
    arch = TINY.smallest()
    static = extract(net, arch).eval()
    data = _Data(static, arch.resolution)
    inputs = Int8Inputs(calibration=calibration_images(data, arch.resolution, 16, seed=0),
                        top1=runtime_top1(static, data, arch.resolution, 8), max_drop_points=1.0)
    out, _ = make_export(folder, seed=3, arch=arch, formats=formats, int8=inputs, static=static)
    return {"folder": out, "r": arch.resolution, "card": read_json(out / "card.json"), "static": static}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _int8_export(tmp_path_factory.mktemp("int8"), ("onnx", "pte"))


@pytest.fixture(scope="module")
def exported_litert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same tiny subnet exported as model.tflite + model.int8.tflite (no .pte: one
    converter process, two conversions)."""
    return _int8_export(tmp_path_factory.mktemp("int8-litert"), ("onnx", "tflite"))


def test_int8_tflite_runs_in_litert_and_matches_its_fp32_export(exported_litert: dict[str, Any]) -> None:
    from evit.formats.tflite import delegation_report, interpreter, run_tflite

    folder, r, card = exported_litert["folder"], exported_litert["r"], exported_litert["card"]
    fp32, int8 = folder / "model.tflite", folder / "model.int8.tflite"
    io = interpreter(int8)
    assert io.get_input_details()[0]["dtype"].__name__ == "float32"  # float image in, float logits out
    assert io.get_output_details()[0]["dtype"].__name__ == "float32"
    for seed in (10, 11, 12):
        x = seeded_input((1, 3, r, r), seed).numpy()
        f, q = torch.from_numpy(run_tflite(fp32, x)), torch.from_numpy(run_tflite(int8, x))
        assert torch.isfinite(q).all()
        assert (q - f).abs().max() <= INT8_TOLERANCE * f.abs().max()
        assert not torch.equal(q, f)
    # int8 leaves no op outside XNNPACK that the fp32 file has inside (this tiny space's one
    # attention head makes the converter turn q.k and A.v into FULLY_CONNECTED with an
    # activation as weights, outside the delegate in both files; the cpu space has none)
    assert delegation_report(int8) == delegation_report(fp32)
    q = card["tflite_int8"]
    assert (q["partitions"], q["outside_ops"]) == (delegation_report(fp32)["partitions"], {"FULLY_CONNECTED": 2})
    assert card["files"]["model.int8.tflite"] == sha256_file(int8) and "pte_int8" not in card
    assert card["tflite"]["val_top1_runtime"] == q["fp32_val_top1_runtime"] == 1.0
    assert q["flagged"] == (q["drop_points"] > 1.0) and q["calibration"] == {"split": "search", "images": 16}
    assert q["quantization"]["int8_ops"]["conv2d"] > 0 and "softmax" in q["quantization"]["float_ops"]
    assert "## int8 (model.int8.tflite)" in (folder / "card.md").read_text()


def test_int8_pte_runs_in_executorch_and_matches_its_fp32_export(exported: dict[str, Any]) -> None:
    from evit.formats.pte import run_pte

    folder, r = exported["folder"], exported["r"]
    assert (folder / "model.int8.pte").stat().st_size < (folder / "model.pte").stat().st_size  # int8 weights
    for seed in (10, 11, 12):
        x = seeded_input((1, 3, r, r), seed)
        f, q = run_pte(folder / "model.pte", x), run_pte(folder / "model.int8.pte", x)
        assert torch.isfinite(q).all()
        assert (q - f).abs().max() <= INT8_TOLERANCE * f.abs().max()
        assert not torch.equal(q, f)  # really quantized


def test_int8_card_has_runtime_accuracy_policy_and_what_stayed_float(exported: dict[str, Any]) -> None:
    from evit.formats.quantize import INT8_POLICY

    folder, card = exported["folder"], exported["card"]
    assert card["files"]["model.int8.pte"] == sha256_file(folder / "model.int8.pte")
    q = card["pte_int8"]
    assert q["partitions"] >= 1 and q["outside_ops"] == {}  # XNNPACK takes the float ops too
    assert "quantization" not in card["pte"]
    # accuracy of the files through the runtime: the fp32 .pte reproduces the labels it made
    assert card["pte"]["val_top1_runtime"] == q["fp32_val_top1_runtime"] == 1.0
    assert q["drop_points"] == pytest.approx(100 * (1.0 - q["val_top1_runtime"]), abs=1e-3)
    assert q["flagged"] == (q["drop_points"] > 1.0) and q["calibration"] == {"split": "search", "images": 16}
    quant = q["quantization"]
    assert quant["policy"] == INT8_POLICY and quant["calibration_inputs"] == 16
    assert quant["int8_ops"]["conv2d"] > 0 and quant["int8_ops"]["linear"] > 0
    # the policy: LayerNorm and the attention scores float, in the transformer blocks only
    assert {"softmax", "bmm", "rsqrt"} <= set(quant["float_ops"])
    attention_blocks = [b for b, ops in quant["float_ops_by_block"].items() if "softmax" in ops]
    assert len(attention_blocks) == TINY.smallest().stages[-1].depth
    md = (folder / "card.md").read_text()
    assert "## int8 (model.int8.pte)" in md and "softmax" in md


def test_an_int8_drop_over_the_threshold_is_flagged_on_the_card_and_logged(caplog: pytest.LogCaptureFixture,
                                                                           exported: dict[str, Any]) -> None:
    from evit.card import render_markdown
    from evit.export.int8 import accuracy_verdict

    with caplog.at_level(logging.WARNING, logger="evit.export.int8"):
        ok = accuracy_verdict(0.80, 0.795, 1.0, "evit-dev 1_5ms")
        assert not caplog.records
        bad = accuracy_verdict(0.80, 0.77, 1.0, "evit-dev 1_5ms")
    assert (ok["flagged"], ok["drop_points"]) == (False, 0.5)
    assert (bad["flagged"], bad["drop_points"]) == (True, 3.0)
    assert "evit-dev 1_5ms" in caplog.text and "3.00 points below" in caplog.text
    card = exported["card"]
    md = render_markdown({**card, "pte_int8": {**card["pte_int8"], **bad}})
    assert "FLAGGED: int8 loses 3.00 points" in md


def test_fetch_by_precision(exported: dict[str, Any], mlflow_server: MlflowServer,  # noqa: F811
                            tmp_path: Path) -> None:
    from evit import registry
    from evit.errors import RegistryError

    params = registry_params(mlflow_server.url)
    with pytest.raises(RegistryError, match="--precision int8 exists for --format pte, tflite only"):
        registry.fetch_model(params, "whatever@champion", "onnx", tmp_path / "x", precision="int8")
    reg = registry.register_export(params, exported["folder"])
    card = exported["card"]
    got = registry.fetch_model(params, f"{reg['name']}@champion", "pte", tmp_path / "int8", precision="int8")
    assert sorted(Path(p).name for p in got["files"].values()) == ["card.json", "card.md", "model.int8.pte"]
    assert sha256_file(tmp_path / "int8" / "model.int8.pte") == card["files"]["model.int8.pte"]
    assert got["precision"] == "int8" and got["card"]["pte_int8"]["val_top1_runtime"] == card["pte_int8"]["val_top1_runtime"]
    fp32 = registry.fetch_model(params, f"{reg['name']}@champion", "pte", tmp_path / "fp32")
    assert "model.pte" in {Path(p).name for p in fp32["files"].values()}


def test_no_calibration_input_is_an_error() -> None:
    from evit.formats.quantize import quantize_int8

    with pytest.raises(ValueError, match="at least one calibration input"):
        quantize_int8(torch.nn.Conv2d(3, 4, 3).eval(), torch.zeros(1, 3, 8, 8), [])


def test_policy_marks_layernorm_and_attention_ops_float() -> None:
    import torch.fx

    from evit.formats.quantize import keeps_float

    def node(stack: dict[str, tuple[str, str]]) -> Any:
        n = torch.fx.Graph().placeholder("x")
        n.meta["nn_module_stack"] = stack
        return n

    assert keeps_float(node({"a": ("4.norm1", "evit.nn.static.LayerNorm4d")}))
    assert keeps_float(node({"a": ("4", "evit.nn.static.TransformerLayer"), "b": ("4.attn", "evit.nn.static.Attention")}))
    assert not keeps_float(node({"b": ("4.attn", "evit.nn.static.Attention"),
                                 "c": ("4.attn.qkv", "torch.nn.modules.linear.Linear")}))
    assert not keeps_float(node({}))


@pytest.mark.parametrize("side", [6, 7, 8, 9])
def test_litert_forms_keep_the_shortcut_pool_function(side: int) -> None:
    """LiteRT's int8 forms replace the down-sampling shortcut's pool (ceil-mode on an odd
    side: a partial last window averages what it covers) with a depthwise conv on the input
    with its last row / column repeated: the same float function."""
    from evit.formats.quantize import PoolAsDepthwise, litert_int8_forms
    from evit.nn.static import ConvShortcut

    torch.manual_seed(0)
    short = ConvShortcut(8, 16, 2).eval()  # side unknown: ceil-mode pool
    x = torch.randn(2, 8, side, side)
    with torch.no_grad():
        want = short(x)
        forms = litert_int8_forms(short)
        assert isinstance(forms.pool, PoolAsDepthwise)
        got = forms(x)
    assert got.shape == want.shape == (2, 16, -(-side // 2), -(-side // 2))
    assert torch.allclose(got, want, atol=1e-5)


def test_a_partial_window_of_several_elements_keeps_the_pool() -> None:
    from evit.formats.quantize import PoolAsDepthwise

    pool = PoolAsDepthwise(3, 3, ceil=True)
    x = torch.randn(1, 3, 8, 8)  # 8 = 2 * 3 + 2: a 2-element last window
    want = torch.nn.AvgPool2d(3, ceil_mode=True, count_include_pad=False)(x)
    assert torch.allclose(pool(x), want, atol=1e-6)


# --- int8 latency device ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["executorch", "litert"])
def test_int8_device_times_quantized_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Two blocks of a subnet (the first conv and a transformer layer) lowered / converted int8
    into one file, cached apart from the fp32 files, and timed."""
    import functools

    from evit.blocks import arch_blocks
    from evit.config import DeviceParams
    from evit.latency.devices import Item, get_device
    from evit.nn.static import block_input_shape, build_block

    monkeypatch.setenv("EVIT_MODEL_CACHE", str(tmp_path / "cache"))
    blocks = arch_blocks(TINY.smallest(), TINY)
    pick = [blocks[0], next(b for b in blocks if b.kind == "attn")]

    def items() -> list[Item]:
        return [Item(functools.partial(build_block, b), block_input_shape(b), key=b.key) for b in pick]

    settings = {"name": "q8", "kind": kind, "threads": 1, "warmup": 1, "repeats": 3, "rounds": 1,
                "convert_jobs": 1}
    dev = get_device(DeviceParams(**settings, precision="int8"))
    fp32 = get_device(DeviceParams(**settings))
    try:
        assert dev._plan_files(items())[0].path != fp32._plan_files(items())[0].path  # never the fp32 file
        ms = dev.measure_many(items())
        assert dev.files_made == 1 and all(m.n == 3 and m.median_ms > 0 for m in ms)
        d = dev.describe()
        assert d["precision"] == "int8" and "seeded standard-normal" in d["int8_calibration"]
        assert fp32.describe()["precision"] == "fp32" and "int8_calibration" not in fp32.describe()
    finally:
        dev.close()
        fp32.close()


def test_int8_precision_is_for_executorch_devices() -> None:
    from evit.config import ConfigError, parse_params

    with pytest.raises(ConfigError, match="precision 'int8' is timed by kinds 'executorch' and 'litert' only"):
        parse_params({"devices": [{"name": "c", "kind": "torch-cpu", "precision": "int8"}]}, "bad.yaml")
    parse_params({"devices": [{"name": "l", "kind": "litert", "precision": "int8"}]})


def test_final_table_shows_both_files_accuracy_when_int8_was_exported() -> None:
    from flows.report import subnets_table

    row = {"device": "et-1t", "budget": "0_4ms", "feasible": True, "val_top1": 0.9452, "predicted_ms": 0.38,
           "measured_ms": 0.37, "fetch": "evit-et-1t/2", "aliases": []}
    from flows.report import _int8_cell

    assert "int8" not in subnets_table([row])
    cell = _int8_cell({"pte_int8_val_top1": 0.93, "pte_fp32_val_top1": 0.945, "pte_int8_drop_points": 1.5,
                       "tflite_int8_val_top1": 0.95, "tflite_fp32_val_top1": 0.945, "tflite_int8_drop_points": -0.5})
    assert cell == "ExecuTorch int8 0.9300 / fp32 0.9450 (-1.5 pts); LiteRT int8 0.9500 / fp32 0.9450 (+0.5 pts)"
    assert _int8_cell({}) is None
    lines = subnets_table([{**row, "int8": cell}, {"device": "x", "budget": "1ms", "feasible": False}]).splitlines()
    assert lines[0].rstrip().endswith("int8 vs fp32 val top-1 (runtime)") and lines[2].endswith(cell)


def test_int8_ranking_picks_the_budgets_best_candidates_and_compares_rankings() -> None:
    from evit.export.int8 import final_candidates, rank_agreement

    pop = [{"key": f"a{i}", "top1": t, "latency_ms": ms, "flops_m": 1.0, "budgets": b}
           for i, (t, ms, b) in enumerate([(0.90, 0.3, ["0_4ms"]), (0.95, 0.5, ["0_4ms"]),  # over budget
                                           (0.80, 0.2, ["0_4ms"]), (0.85, 0.35, ["0_4ms", "1ms"]),
                                           (0.99, 0.1, ["1ms"])])]  # another budget's candidate
    got = final_candidates(pop, {"label": "0_4ms", "kind": "latency", "value": 0.4}, 3)
    assert [r["key"] for r in got] == ["a0", "a3", "a2"]

    def rows(f: list[float], q: list[float]) -> list[dict[str, float]]:
        return [{"float_val_top1": a, "int8_val_top1": b} for a, b in zip(f, q, strict=True)]

    same = rank_agreement(rows([0.9, 0.8, 0.7], [0.89, 0.75, 0.74]))
    assert same["spearman"] == 1.0 and same["same_best"] is True and same["candidates"] == 3
    swapped = rank_agreement(rows([0.9, 0.8, 0.7], [0.70, 0.85, 0.72]))
    assert swapped["spearman"] == -0.5 and swapped["same_best"] is False
    assert rank_agreement(rows([0.9, 0.8], [0.9, 0.8]))["spearman"] is None  # too few to rank
