"""Export: files of a budget folder, the model card, the ONNX check, stage errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from search_export_helpers import TINY, make_export

from evit.export.checks import ExportError, check_onnx
from evit.export.stage import export_device
from evit.formats.bundle import MODEL_FILES
from evit.host import git_commit
from evit.io import read_json, sha256_file
from evit.search.budgets import Budget
from evit.space import CPU, IMAGENET, SearchSpace

REPO = Path(__file__).resolve().parents[1]


def test_space_round_trips_through_the_card() -> None:
    for space in (TINY, CPU, IMAGENET.with_classes(7)):
        back = SearchSpace.from_dict(json.loads(json.dumps(space.to_dict())))
        assert back.to_dict() == space.to_dict()


def test_budget_folder_has_model_files_and_a_card_that_vouches_for_them(tmp_path: Path) -> None:
    folder, static = make_export(tmp_path, seed=3, val_top1=0.42, budget=Budget("latency", 2.5))
    assert folder.name.startswith("2_5ms")
    assert sorted(p.name for p in folder.iterdir()) == sorted([*MODEL_FILES, "card.json", "card.md"])
    card = read_json(folder / "card.json")
    assert card["files"] == {name: sha256_file(folder / name) for name in MODEL_FILES}
    assert card["budget"]["label"] == "2_5ms" and card["budget"]["text"] == "2.5 ms"
    assert card["onnx"]["opset"] == 17 and card["onnx"]["max_abs_diff_vs_torch"] < 1e-3
    for key in ("data_version", "supernet_sha256", "git_commit", "evit_version"):
        assert card["provenance"][key]
    md = (folder / "card.md").read_text()
    for fact in ("0.4200", "2.5 ms", card["arch_key"], card["files"]["model.onnx"], "data-v1"):
        assert fact in md
    # the files rebuild the very same module, without the supernet
    from evit.formats.bundle import load_static

    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(load_static(folder)(x), static(x))


def test_export_is_byte_reproducible(tmp_path: Path) -> None:
    """Same weights -> same files -> same content hash (what makes registration idempotent)."""
    from evit.registry import content_hash

    a, _ = make_export(tmp_path / "a", seed=5)
    b, _ = make_export(tmp_path / "b", seed=5)
    c, _ = make_export(tmp_path / "c", seed=6)
    ca, cb, cc = (read_json(f / "card.json") for f in (a, b, c))
    assert ca["files"] == cb["files"] and ca["weights_sha256"] == cb["weights_sha256"]
    assert content_hash(ca) == content_hash(cb) != content_hash(cc)


def test_onnx_check_catches_a_model_that_differs(tmp_path: Path) -> None:
    folder, static = make_export(tmp_path, seed=4)
    assert check_onnx(folder / "model.onnx", static, 24) < 1e-3
    with torch.no_grad():
        for p in static.parameters():
            p.add_(0.5)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        check_onnx(folder / "model.onnx", static, 24)


def test_git_commit() -> None:
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", git_commit(REPO))
    assert git_commit("/") == "unknown"


def test_export_without_a_search_result_names_the_fix(tiny_params) -> None:  # noqa: ANN001
    from evit.config import load_params

    params = load_params(tiny_params())
    with pytest.raises(ExportError, match=r"run `evit search -d cpu-1t` first"):
        export_device(params, "cpu-1t")
