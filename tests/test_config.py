"""params.yaml validation: every bad value fails up front, naming key, value and what is accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evit.cli import app
from evit.config import ConfigError, DataParams, Params, load_params, parse_params

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
