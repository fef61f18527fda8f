"""params.yaml validation: every bad value fails up front, naming key, value and what is accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evit.cli import app
from evit.config import ConfigError, DataParams, Params, load_params, parse_params
from evit.resolve import check_params

REPO = Path(__file__).resolve().parents[1]

runner = CliRunner()


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_params(data, "bad.yaml")
    return str(info.value)


def test_repo_params_are_valid_and_match_the_defaults() -> None:
    p = load_params(REPO / "params.yaml")
    assert isinstance(p, Params)
    assert p.data.source == "digits"
    # params.yaml spells out every data knob (no silent defaults)
    written = yaml.safe_load((REPO / "params.yaml").read_text())["data"]
    assert set(written) == set(DataParams.model_fields)


def test_unknown_key_names_key_and_value() -> None:
    msg = _error({"data": {"sourc": "digits"}})
    assert "bad.yaml" in msg
    assert "data.sourc" in msg and "unknown key" in msg and "'digits'" in msg


def test_unknown_section() -> None:
    msg = _error({"dta": {"source": "digits"}})
    assert "dta" in msg and "unknown key" in msg


def test_wrong_type_names_key_value_and_accepted_type() -> None:
    msg = _error({"data": {"storage_resolution": "big"}})
    assert "data.storage_resolution" in msg and "'big'" in msg and "valid integer" in msg


def test_out_of_range_names_bound() -> None:
    msg = _error({"data": {"storage_resolution": 4}})
    assert "data.storage_resolution = 4" in msg and "greater than or equal to 8" in msg
    msg = _error({"data": {"search_fraction": 0.0}})
    assert "data.search_fraction = 0.0" in msg and "greater than 0" in msg


def test_choice_lists_accepted_values() -> None:
    msg = _error({"train": {"sampler": "random"}})
    assert "train.sampler = 'random'" in msg
    for accepted in ("elastic", "complexity", "uniform", "flat"):
        assert accepted in msg


def test_cross_field_rules() -> None:
    msg = _error({"data": {"search_fraction": 0.5, "val_fraction": 0.45}})
    assert "search_fraction + val_fraction" in msg and "0.95" in msg
    msg = _error({"data": {"source": "s3://Bad_Bucket/x"}})
    assert "data.source" in msg and "Bad_Bucket" in msg and "s3://bucket/prefix" in msg


def test_all_errors_reported_at_once() -> None:
    msg = _error({"data": {"storage_resolution": 2, "shard_size": 0, "nope": 1}})
    assert "3 invalid setting(s)" in msg
    assert "data.storage_resolution" in msg and "data.shard_size" in msg and "data.nope" in msg


def test_unknown_device_names_value_and_declared_devices() -> None:
    p = parse_params({})
    with pytest.raises(ConfigError) as info:
        p.device("pixel-9")
    assert "'pixel-9'" in str(info.value) and "cpu-1t" in str(info.value)


def test_top_level_must_be_mapping() -> None:
    with pytest.raises(ConfigError, match="mapping"):
        parse_params([1, 2], "bad.yaml")


# --- through the CLI: exit code 2, one clear message, no traceback ---------------------------

def _cli(args: list[str]):
    result = runner.invoke(app, args)
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "Traceback" not in text
    return result, text


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"data": {"shard_sise": 10}}, ["data.shard_sise", "unknown key"]),
        ({"data": {"seed": "zero"}}, ["data.seed", "'zero'", "valid integer"]),
        ({"data": {"val_fraction": 1.5}}, ["data.val_fraction = 1.5", "less than 1"]),
        ({"devices": [{"name": "x", "kind": "tpu"}]}, ["devices.0.kind", "'tpu'", "onnxruntime-cpu"]),
    ],
)
def test_cli_prepare_rejects_bad_params(tiny_params, overrides: dict, expected: list[str]) -> None:
    path = tiny_params(overrides, name="bad.yaml")
    result, text = _cli(["prepare", "--params", str(path)])
    assert result.exit_code == 2, text
    for fragment in expected:
        assert fragment in text
    assert not Path("data/prepared").exists()  # failed before any work


def test_cli_missing_and_malformed_params_file(tmp_path: Path) -> None:
    result, text = _cli(["prepare", "--params", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml" in text and "not found" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    result, text = _cli(["prepare", "--params", str(bad)])
    assert result.exit_code == 2 and "not valid YAML" in text


def test_cli_unknown_device(tiny_params) -> None:
    path = tiny_params()
    result, text = _cli(["lut", "--device", "pixel-9", "--params", str(path)])
    assert result.exit_code == 2
    assert "pixel-9" in text and "cpu-1t" in text


# --- overrides (--set KEY=VALUE | FILE, $EVIT_OVERRIDES) ---------------------------------------

def test_overrides_merge_files_keys_and_devices_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVIT_OVERRIDES", raising=False)
    profile = REPO / "params.imagenet.yaml"
    p = load_params(profile, [str(REPO / "params.smoke.yaml"), "train.epochs=3", "data.source=/data/tiny"])
    assert p.train.epochs == 3 and p.train.steps_per_epoch == 2 and p.data.source == "/data/tiny"
    cpu4 = p.device("cpu-4t")
    assert cpu4.lut_mode == "sampled" and cpu4.budgets_ms == [20.0]  # merged by name: others kept
    assert cpu4.kind == "onnxruntime-cpu" and cpu4.warmup == 0
    assert [d.name for d in p.devices] == ["gpu-bf16", "cpu-4t", "pixel6"]
    assert p.space.flops_convention == "reference" and p.train.lr == 0.001  # not a budget knob: untouched
    monkeypatch.setenv("EVIT_OVERRIDES", "train.epochs=5\nsearch.generations=2")
    p = load_params(profile, ["train.epochs=7"])  # the environment first, then the explicit items
    assert (p.train.epochs, p.search.generations) == (7, 2)
    monkeypatch.delenv("EVIT_OVERRIDES")
    with pytest.raises(ConfigError, match=r"(?s)--set train.epochs.*train.epochs = 0"):
        load_params(profile, ["train.epochs=0"])
    with pytest.raises(ConfigError, match=r"no entry named \['cpu-9t'\]"):
        load_params(profile, ["devices.cpu-9t.repeats=3"])
    with pytest.raises(ConfigError, match="neither KEY=VALUE"):
        load_params(profile, [str(tmp_path / "missing.yaml")])


def test_cli_set_reaches_the_stage_and_bad_override_is_one_line(tiny_params) -> None:
    tiny_params()
    out = runner.invoke(app, ["arch", "info", "T1", "-p", "params.yaml", "--set", "space.preset=imagenet",
                              "--set", "space.flops_convention=reference"])
    assert out.exit_code == 0, out.output
    assert '"flops_m": 62.9151' in out.output
    bad = runner.invoke(app, ["prepare", "--set", "data.shard_size=-1"])
    assert bad.exit_code == 2 and "data.shard_size" in bad.output and "Traceback" not in bad.output


def _space_error(data: dict) -> str:
    """The error of the checks that need the search space (made by every shell before any work)."""
    with pytest.raises(ConfigError) as info:
        check_params(parse_params(data, "bad.yaml"), "bad.yaml")
    return str(info.value)


def test_fixed_archs_and_teachers_are_checked_up_front(tiny_params) -> None:
    assert "outside the 'cpu' space" in _space_error({"search": {"fixed_archs": ["T1"]}})
    assert "neither a released model" in _space_error({"space": {"preset": "imagenet"},
                                                       "search": {"fixed_archs": ["T7"]}})
    assert "share the label 'l1_5'" in _space_error({"space": {"preset": "imagenet"},
                                                     "search": {"fixed_archs": ["L1.5", "l1.5"]}})
    p = parse_params({"space": {"preset": "imagenet"}, "search": {"fixed_archs": ["T1", "l1.5"]}})
    check_params(p)
    assert p.search.fixed_archs == ["T1", "l1.5"]
    # every command checks them before doing anything (exit 2, one line)
    tiny_params({"search": {"fixed_archs": ["T1"]}})
    bad = runner.invoke(app, ["prepare"])
    assert bad.exit_code == 2 and "search.fixed_archs entry 'T1'" in bad.output and "Traceback" not in bad.output
    # one teacher (the older spelling) is a list of one; weights null means the hub
    p = parse_params({"train": {"teacher": {"model": "resnet18", "weights": "/w.pth"}}})
    assert [t.model for t in p.train.teachers] == ["resnet18"]
    assert parse_params({"train": {"teachers": [{"model": "resnet18"}]}}).train.teachers[0].weights is None
    assert parse_params({"train": {"teacher": None}}).train.teachers == []


def test_cli_export_arch_rejects_a_bad_name_before_loading_anything(tiny_params) -> None:
    tiny_params()
    bad = runner.invoke(app, ["export", "-d", "cpu-1t", "--arch", "T9"])
    assert bad.exit_code == 2 and "neither a released model" in bad.output and "Traceback" not in bad.output
