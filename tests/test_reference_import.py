"""Importing the paper's released supernet (issue 15), against the reference fixture.

`../shared/fixtures/reference-supernet/` was made with the reference code: a shrunk
reference supernet's exact state_dict with randomised weights and BN stats, its space
config, 8 subnets and the reference's eval-mode logits for each. The imported supernet,
its extracted static subnets and their ONNX exports must reproduce those logits (1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from evit.arch import Arch
from evit.space import SearchSpace
from evit.space.reference import ReferenceConfigError, load_reference_space, read_reference_config, reference_space
from evit.train.import_reference import ReferenceImportError, import_reference, select_state_dict

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("EVIT_REFERENCE_FIXTURE", REPO.parent / "shared" / "fixtures" / "reference-supernet"))
pytestmark = pytest.mark.skipif(not (FIXTURE / "reference_supernet.safetensors").is_file(),
                                reason=f"reference fixture not found at {FIXTURE} (set EVIT_REFERENCE_FIXTURE)")
ATOL = 1e-5


def _cases() -> list[dict[str, Any]]:
    if not (FIXTURE / "cases.json").is_file():
        return []
    return json.loads((FIXTURE / "cases.json").read_text())["cases"]


CASES = _cases()
CASE_IDS = [c["name"] for c in CASES]


def plain_arch(plain: dict[str, Any]) -> Arch:
    """The fixture's plain per-stage form -> an evit Arch (same fields, minus the stage type)."""
    return Arch.from_dict({"resolution": plain["resolution"], "stem": plain["stem"],
                           "stages": [{k: v for k, v in s.items() if k != "type"} for s in plain["stages"]]})


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return load_reference_space(FIXTURE / "space.json")


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "supernet.pt"
    summary = import_reference(FIXTURE / "reference_supernet.safetensors", FIXTURE / "space.json", out)
    assert summary["tensors"] == 331 and summary["weights"] == "raw"
    return out


@pytest.fixture(scope="module")
def supernet(imported: Path) -> Any:
    from evit.train.checkpoint import load_supernet

    net, meta = load_supernet(imported)  # the documented call: a module with forward(x, arch)
    assert meta["imported"]["format"] == "reference"
    return net


@pytest.fixture(scope="module")
def io() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return load_file(str(FIXTURE / "inputs.safetensors")), load_file(str(FIXTURE / "outputs.safetensors"))


# --- the space ----------------------------------------------------------------------------------

def test_space_from_reference_yaml_matches_the_plain_choices() -> None:
    for name in ("space.json", "space_original.json"):
        plain = json.loads((FIXTURE / name).read_text())["plain_space"]
        sp = load_reference_space(FIXTURE / name)
        assert sp.variant == "reference" and all(s.variant == "reference" for s in sp.stages)
        assert list(sp.resolutions) == plain["resolutions"]
        assert list(sp.stem_widths) == plain["stem"]["widths"] and list(sp.stem_kernels) == plain["stem"]["kernels"]
        assert sp.num_classes == plain["head"]["num_classes"]
        assert (sp.head_expansion, sp.head_width) == (plain["head"]["classifier_mul"], plain["head"]["pre_head_hidden"])
        for ss, ps in zip(sp.stages, plain["stages"], strict=True):
            assert (ss.kind, list(ss.widths), list(ss.depths), ss.stride) == \
                (ps["type"], ps["widths"], ps["depths"], ps["stride"])
            if ss.kind == "mbconv":
                assert (list(ss.expansions), list(ss.kernels), ss.se) == (ps["expansions"], ps["kernels"], ps["se"])
            else:
                assert (list(ss.mlp_ratios), list(ss.v_scales)) == (ps["mlp_ratios"], ps["v_scales"])
    for case in CASES:
        load_reference_space(FIXTURE / "space.json").validate(plain_arch(case["plain"]))


def test_reference_space_round_trips_through_checkpoint_dicts(space: SearchSpace) -> None:
    from evit.resolve import restore_space

    assert restore_space(space.to_dict()) == space == SearchSpace.from_dict(space.to_dict())
    # default spaces keep their old dict form (no variant key), so old checkpoints still match
    from evit.space import CPU

    assert "variant" not in CPU.to_dict() and all("variant" not in s for s in CPU.to_dict()["stages"])


def test_bad_reference_configs_fail_with_one_clear_line(tmp_path: Path) -> None:
    cfg = read_reference_config(FIXTURE / "space.json")
    bad = json.loads(json.dumps(cfg))
    bad["search_space"]["windows_size"] = [[1, 2]] * 4
    with pytest.raises(ReferenceConfigError, match="windows_size"):
        reference_space(bad)
    bad = json.loads(json.dumps(cfg))
    bad["search_space"]["max_channels"] = [24, 24, 32]
    with pytest.raises(ReferenceConfigError, match="max_channels has 3 entries"):
        reference_space(bad)
    (tmp_path / "x.yaml").write_text("name: x\n")
    with pytest.raises(ReferenceConfigError, match="search_space"):
        load_reference_space(tmp_path / "x.yaml")
    with pytest.raises(ReferenceConfigError, match="not found"):
        load_reference_space(tmp_path / "missing.yaml")


# --- the layout ---------------------------------------------------------------------------------

def test_supernet_layout_is_the_reference_state_dict(space: SearchSpace) -> None:
    from evit.nn.reference import ReferenceSupernet

    ours = {k: list(v.shape) for k, v in ReferenceSupernet(space).state_dict().items()}
    assert ours == json.loads((FIXTURE / "state_dict_keys.json").read_text())
    full = load_reference_space(FIXTURE / "space_original.json")
    with torch.device("meta"):
        ours_full = {k: list(v.shape) for k, v in ReferenceSupernet(full).state_dict().items()}
    want = json.loads((FIXTURE / "state_dict_keys_original.json").read_text())
    assert list(ours_full) == list(want) and ours_full == want


# --- exactness ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_imported_supernet_static_subnet_and_onnx_reproduce_the_reference(
        case: dict[str, Any], supernet: Any, io: Any, tmp_path: Path) -> None:
    import onnxruntime as ort

    from evit.formats.onnx import export_onnx
    from evit.nn.static import extract

    inputs, outputs = io
    x, want = inputs[case["input_key"]], outputs[case["output_key"]]
    arch = plain_arch(case["plain"])
    with torch.no_grad():
        got = supernet(x, arch)
        static = extract(supernet, arch)
        got_static = static(x)
    assert (got - want).abs().max().item() < ATOL, case["name"]
    assert (got_static - want).abs().max().item() < ATOL, case["name"]
    path = export_onnx(static, arch.resolution, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_onnx = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got_onnx - want.numpy()).max() < ATOL, case["name"]


def test_reference_flops_convention_reproduces_the_fixture(space: SearchSpace) -> None:
    """The reference's own counter (`ref_flops_M`) under evit's `reference` FLOPs convention (issue 11)."""
    from evit import flops

    ref = space.with_convention("reference")
    for case in CASES:
        assert flops.flops_m(plain_arch(case["plain"]), ref) == pytest.approx(case["ref_flops_M"], abs=1e-4), \
            case["name"]


def test_bn_recalibration_runs_on_imported_subnets(supernet: Any, io: Any) -> None:
    """Evaluation recalibrates BN per subnet (as the reference's eval_one_subnet does); the
    reference blocks expose their BNs to `recalibrate_bn` like evit's own."""
    from evit.evaluate import recalibrate_bn
    from evit.nn.static import extract

    arch = plain_arch(CASES[0]["plain"])
    x = io[0][CASES[0]["input_key"]]
    net = extract(supernet, arch)
    before = net(x).detach()
    recalibrate_bn(net, [(x, torch.zeros(len(x), dtype=torch.long))], 1, batch_size=len(x))
    assert not torch.allclose(net(x), before)  # the running stats were re-estimated


# --- reading released files -----------------------------------------------------------------------

def _ref_state() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "reference_supernet.safetensors"))


def test_released_pth_layout_prefers_ema_and_strips_module(tmp_path: Path, supernet: Any, io: Any) -> None:
    """A .pth like the reference's: EMA + DDP-prefixed raw weights + bookkeeping, numpy scalars included."""
    from evit.train.checkpoint import load_supernet

    ema = _ref_state()
    raw = {f"module.{k}": (torch.zeros_like(v) if v.is_floating_point() else v) for k, v in ema.items()}
    ckpt = {"epoch": 599, "state_dict": raw, "model_ema": ema, "optimizer": {"state": {}, "param_groups": []},
            "arch": "elasticvit", "bank": {"100": [[1.0, 2.0]]}, "extras": {"best_top1": np.float64(80.0)}}
    torch.save(ckpt, tmp_path / "ckpt.pth")
    assert import_reference(tmp_path / "ckpt.pth", FIXTURE / "space.json", tmp_path / "a.pt")["weights"] == "ema"
    net, meta = load_supernet(tmp_path / "a.pt")
    case = CASES[2]
    with torch.no_grad():
        assert torch.allclose(net(io[0][case["input_key"]], plain_arch(case["plain"])), io[1][case["output_key"]],
                              atol=ATOL)
    assert meta["weights"] == "ema"
    out = import_reference(tmp_path / "ckpt.pth", FIXTURE / "space.json", tmp_path / "b.pt", prefer="raw")
    assert out["weights"] == "raw"  # the `module.` prefix was stripped, else the key check fails


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": _ref_state()}, tmp_path / "args.pth")
    with pytest.raises(ReferenceImportError, match="argparse.Namespace"):
        import_reference(tmp_path / "args.pth", FIXTURE / "space.json", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_select_state_dict_names_what_it_found() -> None:
    with pytest.raises(ReferenceImportError, match="no weights found"):
        select_state_dict({"epoch": 3, "optimizer": {}})
    with pytest.raises(ReferenceImportError, match="no 'model_ema'"):
        select_state_dict({"a": torch.zeros(1)}, prefer="ema")


def test_cli_names_missing_unexpected_and_misshaped_keys(tmp_path: Path) -> None:
    state = _ref_state()
    state.pop("classifer.bias")
    state["feature_exactor.2.layers.0.qkv.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    out = tmp_path / "out.pt"
    proc = subprocess.run([sys.executable, "-m", "evit.cli", "import-reference", str(tmp_path / "bad.safetensors"),
                           "--config", str(FIXTURE / "space.json"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr
    assert "1 missing: classifer.bias" in err and "1 unexpected: extra.weight" in err
    assert "feature_exactor.2.layers.0.qkv.weight [3, 3] (expected [160, 32])" in err
    assert not out.exists()


# --- downstream stages ------------------------------------------------------------------------------

@pytest.mark.slow
def test_lut_search_export_take_the_imported_checkpoint(tiny_params: Any, prepared_digits: Path) -> None:
    """`space.preset: reference` + the imported models/supernet.pt run lut -> search -> export
    (the digits data has 10 classes, like the fixture's classifier)."""
    from evit import stages
    from evit.config import load_params

    path = tiny_params({
        "data": {"out_dir": str(prepared_digits)},
        "space": {"preset": "reference", "reference_config": str(FIXTURE / "space.json"), "levels": [1, 2, 4, 8],
                  "tolerance": 0.5},
        "devices": [{"name": "cpu-1t", "kind": "torch-cpu", "warmup": 1, "repeats": 3, "rounds": 1,
                     "validate_subnets": 10, "lut_mode": "sampled", "sample_subnets": 12, "budgets_ms": [50.0]}],
        "search": {"population": 6, "generations": 1, "top_k": 3, "mutations": 2, "crossovers": 2,
                   "flops_budgets_m": [5], "bn_calib_batches": 1, "eval_batch_size": 64},
        "export": {"register_model": False},
    })
    import_reference(FIXTURE / "reference_supernet.safetensors", FIXTURE / "space.json", Path("models/supernet.pt"))
    params = load_params(path)
    stages.lut(params, "cpu-1t")
    stages.search(params, "cpu-1t")
    out = stages.export(params, "cpu-1t")
    assert len(out["exported"]) == 2
    for folder in out["exported"]:
        card = json.loads((Path(folder) / "card.json").read_text())
        assert card["space"]["variant"] == "reference"
        assert card["onnx"]["max_abs_diff_vs_torch"] < 1e-3


def test_torchscript_and_rebuilt_static_subnet_match(supernet: Any, io: Any, tmp_path: Path) -> None:
    """The other export paths: a traced TorchScript file, and `load_static` from the exported state_dict."""
    from evit.formats.torchscript import export_torchscript
    from evit.nn.static import extract, load_static

    case = CASES[3]
    arch = plain_arch(case["plain"])
    x, want = io[0][case["input_key"]], io[1][case["output_key"]]
    static = extract(supernet, arch)
    traced = torch.jit.load(str(export_torchscript(static, arch.resolution, tmp_path / "m.pt")))
    rebuilt = load_static(arch, supernet.space, static.state_dict())
    with torch.no_grad():
        assert (traced(x) - want).abs().max().item() < ATOL
        assert (rebuilt(x) - want).abs().max().item() < ATOL


def test_train_refuses_to_replace_an_imported_supernet(imported: Path, tiny_params: Any) -> None:
    import shutil

    from evit import stages
    from evit.config import load_params

    path = tiny_params({})
    Path("models").mkdir()
    shutil.copy(imported, "models/supernet.pt")
    with pytest.raises(ReferenceImportError, match="evit train --fresh"):
        stages.train(load_params(path))


def test_params_space_reference_needs_its_config() -> None:
    from evit.config import ConfigError, parse_params
    from evit.resolve import space_from_params

    with pytest.raises(ConfigError, match="reference_config"):
        parse_params({"space": {"preset": "reference"}})
    with pytest.raises(ConfigError, match="only used with preset: reference"):
        parse_params({"space": {"preset": "cpu", "reference_config": "x.yaml"}})
    p = parse_params({"space": {"preset": "reference", "reference_config": str(FIXTURE / "space.json"),
                                "levels": [2, 4], "tolerance": 0.5}})
    sp = space_from_params(p.space, 10)
    assert sp.variant == "reference" and sp.levels == (2, 4) and sp.tolerance == 0.5


def test_fixed_archs_work_with_the_reference_preset(space: SearchSpace, tmp_path: Path) -> None:
    """`search.fixed_archs` is checked against the reference space itself (it used to look up a
    preset named 'reference' and fail for every entry)."""
    from evit.config import ConfigError, parse_params
    from evit.resolve import check_params

    arch_file = tmp_path / "smallest.json"
    arch_file.write_text(space.smallest().to_json())
    sp = {"preset": "reference", "reference_config": str(FIXTURE / "space.json")}
    check_params(parse_params({"space": sp, "search": {"fixed_archs": [str(arch_file)]}}))
    with pytest.raises(ConfigError, match=r"fixed_archs entry 'T1': arch\.resolution = 128 is outside the "
                                          r"'reference' space"):
        check_params(parse_params({"space": sp, "search": {"fixed_archs": ["T1"]}}))
