"""The prepare stage: digits and ImageFolder sources, bad data, split determinism, atomicity."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from evit.cli import app
from evit.config import load_params, parse_params
from evit.data import prepare as prepare_mod
from evit.data.loader import PreparedData
from evit.data.prepare import prepare_data
from evit.errors import DataError
from evit.io import sha256_file, sha256_json

OUT = Path("data/prepared")


def _manifest(out: Path = OUT) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _paths(out: Path, split: str) -> list[str]:
    return (out / f"{split}-paths.txt").read_text().splitlines()


def _no_temp_dirs(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def _check_consistent(out: Path) -> dict:
    """Manifest, shards, labels and paths agree with each other and with the recorded hashes."""
    m = _manifest(out)
    assert [f["name"] for f in m["files"]] == sorted(f["name"] for f in m["files"])
    for f in m["files"]:
        assert sha256_file(out / f["name"]) == f["sha256"]
    assert m["content_hash"] == sha256_json({
        "format": m["format"], "classes": m["classes"], "storage_resolution": m["storage_resolution"],
        "files": {f["name"]: f["sha256"] for f in m["files"]},
    })
    s = m["storage_resolution"]
    for split, info in m["splits"].items():
        shards = [np.load(out / sh["name"]) for sh in info["shards"]]
        assert all(a.dtype == np.uint8 and a.shape[1:] == (s, s, 3) for a in shards)
        labels = np.load(out / info["labels"])
        assert labels.dtype == np.int64 and len(labels) == info["num"] == sum(len(a) for a in shards)
        assert len(_paths(out, split)) == info["num"]
        counts = np.bincount(labels, minlength=len(m["classes"]))
        assert dict(zip(m["classes"], counts.tolist(), strict=True)) == m["counts"][split]
        assert min(counts) >= 1  # every class in every split
    return m


# --- digits ----------------------------------------------------------------------------------

def test_digits_default(tiny_params) -> None:
    summary = prepare_data(load_params(tiny_params()))
    m = _check_consistent(OUT)
    assert m["classes"] == [str(d) for d in range(10)]
    assert m["source"] == {"kind": "digits", "uri": "digits", "has_val": False}
    assert m["excluded"] == []
    assert sum(m["totals"].values()) == 1797
    assert m["totals"] == summary["totals"] == {"train": 1259, "search": 269, "val": 269}
    assert m["params"]["search_fraction"] == 0.15 and m["storage_resolution"] == 48
    # the three splits partition the 1,797 images
    all_paths = [p for s in ("train", "search", "val") for p in _paths(OUT, s)]
    assert len(set(all_paths)) == 1797
    # stratified: each class holds out round(n * 0.15) for search and for val
    for cls in m["classes"]:
        n = sum(m["counts"][s][cls] for s in ("train", "search", "val"))
        assert m["counts"]["search"][cls] == int(n * 0.15 + 0.5) == m["counts"]["val"][cls]
    # digits really are digits: stroke pixels bright on a dark background, grey (R == G == B)
    train = np.load(OUT / "train-00000.npy", mmap_mode="r")
    assert train[..., 0].mean() < 100 and train.max() == 255
    assert np.array_equal(train[..., 0], train[..., 2])


def test_split_determinism_and_seed(tiny_params) -> None:
    path = tiny_params({"data": {"storage_resolution": 16}})
    prepare_data(load_params(path))
    first = {p.name: p.read_bytes() for p in OUT.iterdir()}
    prepare_data(load_params(path))
    second = {p.name: p.read_bytes() for p in OUT.iterdir()}
    assert first == second  # byte-identical shards, labels, paths and manifest

    tiny_params({"data": {"storage_resolution": 16, "seed": 1}})
    prepare_data(load_params(path))
    other = _manifest()
    assert other["counts"] == json.loads(first["manifest.json"])["counts"]  # same proportions
    assert other["content_hash"] != json.loads(first["manifest.json"])["content_hash"]
    assert set(_paths(OUT, "search")) != {p for p in first["search-paths.txt"].decode().splitlines()}


def test_content_hash_independent_of_out_dir(tmp_path: Path) -> None:
    a = prepare_data(parse_params({"data": {"out_dir": str(tmp_path / "a"), "storage_resolution": 12}}))
    b = prepare_data(parse_params({"data": {"out_dir": str(tmp_path / "b" / "c"), "storage_resolution": 12}}))
    assert a["content_hash"] == b["content_hash"]


def test_max_per_class_and_shards(tiny_params) -> None:
    prepare_data(load_params(tiny_params({"data": {"storage_resolution": 8, "max_per_class": 20, "shard_size": 50}})))
    m = _check_consistent(OUT)
    assert sum(m["totals"].values()) == 200
    assert [s["rows"] for s in m["splits"]["train"]["shards"]] == [50, 50, 40]


def test_cli_prepare(tiny_params) -> None:
    path = tiny_params({"data": {"storage_resolution": 8}})
    result = CliRunner().invoke(app, ["prepare", "--params", str(path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["totals"] == {"train": 1259, "search": 269, "val": 269}
    assert summary["content_hash"] == _manifest()["content_hash"]


# --- ImageFolder -----------------------------------------------------------------------------

EXPECTED_EXCLUDED = {
    "train/README.md": "not inside a class directory",
    "train/bee/broken.jpg": "corrupt or truncated image",
    "train/bee/empty.jpg": "empty file",
    "train/bee/garbage.png": "not a recognised image format",
    "train/cat/.DS_Store": "hidden file",
    "train/cat/notes.txt": "not an image file (.txt)",
}


def test_folder_with_bad_files(tiny_params, messy_image_folder, tmp_path: Path) -> None:
    src = messy_image_folder(tmp_path / "src")
    prepare_data(load_params(tiny_params({"data": {"source": str(src), "storage_resolution": 16}})))
    m = _check_consistent(OUT)
    assert m["classes"] == ["ant", "bee", "cat"]
    assert m["source"] == {"kind": "folder", "uri": str(src), "has_val": False}
    got = {e["path"]: e["reason"] for e in m["excluded"]}
    assert set(got) == set(EXPECTED_EXCLUDED)
    for path, reason in EXPECTED_EXCLUDED.items():
        assert got[path].startswith(reason), (path, got[path])
    totals = {c: sum(m["counts"][s][c] for s in m["counts"]) for c in m["classes"]}
    assert totals == {"ant": 10, "bee": 9, "cat": 9}  # the nested .bmp counts, the bad files do not
    assert "train/ant/extra/tall.bmp" in {p for s in ("train", "search", "val") for p in _paths(OUT, s)}
    # a stored image is its source file centre-cropped to a square and resized
    for rel in ("train/ant/img000.png", "train/ant/extra/tall.bmp"):
        split = next(s for s in ("train", "search", "val") if rel in _paths(OUT, s))
        stored = np.load(OUT / f"{split}-00000.npy")[_paths(OUT, split).index(rel)]
        with Image.open(src / rel) as im:
            expected = np.asarray(ImageOps.fit(im.convert("RGB"), (16, 16), method=Image.Resampling.BICUBIC))
        assert np.array_equal(stored, expected)


def test_folder_with_own_val(tiny_params, image_folder, tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", train={"ant": 8, "bee": 8}, val={"ant": 3, "bee": 2})
    prepare_data(load_params(tiny_params({"data": {"source": str(src), "storage_resolution": 16, "val_fraction": 0.0}})))
    m = _check_consistent(OUT)
    assert m["source"]["has_val"] is True
    assert m["counts"]["val"] == {"ant": 3, "bee": 2}
    assert all(p.startswith("val/") for p in _paths(OUT, "val"))
    assert all(p.startswith("train/") for s in ("train", "search") for p in _paths(OUT, s))
    assert m["counts"]["search"] == {"ant": 1, "bee": 1} and m["counts"]["train"] == {"ant": 7, "bee": 7}


def _prepare_error(tiny_params, overrides: dict) -> str:
    params = load_params(tiny_params(overrides))
    with pytest.raises(DataError) as info:
        prepare_data(params)
    assert not OUT.exists()  # validation failed before anything became visible
    assert not OUT.parent.exists() or _no_temp_dirs(OUT.parent)
    return str(info.value)


def test_empty_class_is_an_error(tiny_params, image_folder, tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", train={"ant": 8, "bee": 8})
    (src / "train" / "dog").mkdir()
    (src / "train" / "eel").mkdir()
    (src / "train" / "eel" / "bad.png").write_bytes(b"nope")
    msg = _prepare_error(tiny_params, {"data": {"source": str(src)}})
    assert "'dog' has no readable images in train/" in msg
    assert "'eel' has no readable images in train/ (1 excluded" in msg


def test_val_class_missing_from_train(tiny_params, image_folder, tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", train={"ant": 8, "bee": 8}, val={"ant": 2, "bee": 2, "zebra": 2})
    msg = _prepare_error(tiny_params, {"data": {"source": str(src)}})
    assert "zebra" in msg and "val/" in msg


def test_train_class_missing_from_val(tiny_params, image_folder, tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", train={"ant": 8, "bee": 8}, val={"ant": 2})
    msg = _prepare_error(tiny_params, {"data": {"source": str(src)}})
    assert "'bee' has no readable images in val/" in msg


def test_flat_val_dir_is_an_error(tiny_params, image_folder, tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", train={"ant": 8, "bee": 8})
    (src / "val").mkdir()
    (src / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"x")  # ImageNet's raw, unsorted val
    msg = _prepare_error(tiny_params, {"data": {"source": str(src)}})
    assert "val/ exists but has no class directories" in msg and "1 files excluded" in msg


def test_too_few_per_class_names_class_count_and_knob(tiny_params, image_folder, tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", train={"ant": 8, "bee": 4})
    msg = _prepare_error(tiny_params, {"data": {"source": str(src)}})
    assert "'bee'" in msg and "4 readable train images" in msg and "data.min_per_class = 5" in msg
    assert "'ant'" not in msg


def test_too_small_for_three_splits(tiny_params, image_folder, tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", train={"ant": 2, "bee": 2})
    msg = _prepare_error(tiny_params, {"data": {"source": str(src), "min_per_class": 1}})
    assert "0 remain for train" in msg and "'ant'" in msg and "'bee'" in msg


def test_single_class_and_no_val_share(tiny_params, image_folder, tmp_path: Path) -> None:
    src = image_folder(tmp_path / "one", train={"ant": 10})
    assert "at least 2" in _prepare_error(tiny_params, {"data": {"source": str(src)}})
    src = image_folder(tmp_path / "two", train={"ant": 10, "bee": 10})
    msg = _prepare_error(tiny_params, {"data": {"source": str(src), "val_fraction": 0.0}})
    assert "data.val_fraction = 0" in msg and "val/" in msg


@pytest.mark.parametrize("case", ["missing", "file", "no-train", "no-images", "bad-scheme"])
def test_bad_source_locations(tiny_params, tmp_path: Path, case: str) -> None:
    target = tmp_path / "src"
    if case == "file":
        target.write_text("x")
    elif case == "no-train":
        (target / "training").mkdir(parents=True)
    elif case == "no-images":
        (target / "train" / "ant").mkdir(parents=True)
        (target / "train" / "ant" / "a.txt").write_text("x")
    source = "gs://bucket/x" if case == "bad-scheme" else str(target)
    msg = _prepare_error(tiny_params, {"data": {"source": source}})
    assert source in msg
    expected = {"missing": "not found", "file": "not a directory", "no-train": "no train/ directory",
                "no-images": "no image files under train/", "bad-scheme": "unsupported URL scheme"}[case]
    assert expected in msg


def test_cli_data_error_is_one_message(tiny_params, tmp_path: Path) -> None:
    path = tiny_params({"data": {"source": str(tmp_path / "nowhere")}})
    result = CliRunner().invoke(app, ["prepare", "--params", str(path)])
    assert result.exit_code == 2
    assert "nowhere" in result.output and "Traceback" not in result.output


# --- atomic output -----------------------------------------------------------------------------

class _Crash(KeyboardInterrupt):
    """Stands in for Ctrl-C / a kill between two shard writes."""


def _crash_on_call(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    real = prepare_mod._write_array
    calls = {"n": 0}

    def write(path: Path, array: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == n:
            raise _Crash(f"simulated interruption before writing {path.name}")
        real(path, array)

    monkeypatch.setattr(prepare_mod, "_write_array", write)


def test_interrupted_first_run_leaves_nothing(tiny_params, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_params({"data": {"storage_resolution": 8}})
    _crash_on_call(monkeypatch, 3)
    with pytest.raises(_Crash):
        prepare_data(load_params(path))
    assert not OUT.exists()
    assert _no_temp_dirs(OUT.parent)


def test_interrupted_rerun_keeps_previous_complete_output(tiny_params, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_params({"data": {"storage_resolution": 8}})
    prepare_data(load_params(path))
    before = {p.name: p.read_bytes() for p in OUT.iterdir()}
    tiny_params({"data": {"storage_resolution": 8, "seed": 7}})
    _crash_on_call(monkeypatch, 4)
    with pytest.raises(_Crash):
        prepare_data(load_params(path))
    assert {p.name: p.read_bytes() for p in OUT.iterdir()} == before
    assert _no_temp_dirs(OUT.parent)
    PreparedData(OUT).verify()


def test_output_is_readable_by_others(tiny_params) -> None:
    prepare_data(load_params(tiny_params({"data": {"storage_resolution": 8}})))
    umask = os.umask(0)
    os.umask(umask)
    assert OUT.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    for f in OUT.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask


def test_copy_of_prepared_dir_still_loads(prepared_digits: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(prepared_digits, copy)
    PreparedData(copy).verify()
