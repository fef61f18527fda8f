"""Mobile formats and runtimes: .pte / .tflite exports, their checks, registry fetch, and the
in-process `executorch` / `litert` latency devices.

Fast tests use ExecuTorch (in the main lock). Tests marked slow need the LiteRT converter
venv: it is created on demand from requirements-litert.lock the first time (minutes, on a
brand-new machine too), then reused (`.venv-litert`, or EVIT_LITERT_VENV).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fixtures_servers import MlflowServer, mlflow_server  # noqa: F401
from search_export_helpers import TINY, make_export, registry_params

from evit.blocks import arch_blocks
from evit.config import DeviceParams
from evit.errors import UserError
from evit.export.checks import ExportError
from evit.io import read_json, sha256_file
from evit.latency.devices import Item, get_device
from evit.nn.static import block_input_shape, build_block


def _chain(arch) -> list[Item]:  # noqa: ANN001
    blocks = arch_blocks(arch, TINY)
    return [Item(functools.partial(build_block, b), block_input_shape(b), key=f"{b.key}#{i}", file_key=b.key)
            for i, b in enumerate(blocks)]


# --- ExecuTorch (fast) ------------------------------------------------------------------------

def test_pte_export_is_checked_and_on_the_card(tmp_path: Path) -> None:
    folder, static = make_export(tmp_path, seed=2, formats=("onnx", "pte"))
    card = read_json(folder / "card.json")
    assert card["files"]["model.pte"] == sha256_file(folder / "model.pte")
    pte = card["pte"]
    assert 1 <= pte["partitions"] <= 2 and pte["outside_ops"] == {}
    assert pte["max_abs_diff_vs_torch"] < 1e-4
    from evit.formats.pte import run_pte

    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        assert (run_pte(folder / "model.pte", x) - static(x)).abs().max() < 1e-4


def test_pte_export_fails_when_the_runtime_disagrees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evit.export import checks

    real = checks.run_pte
    monkeypatch.setattr(checks, "run_pte", lambda *a, **k: real(*a, **k) + 0.5)
    with pytest.raises(ExportError, match="ExecuTorch output differs from PyTorch by 0.5"):
        make_export(tmp_path, seed=2, formats=("onnx", "pte"))
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_executorch_device_prepared_outside_timing_with_other_threads(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread pool is sized before methods load (resizing it under loaded methods aborts)."""
    monkeypatch.setenv("EVIT_MODEL_CACHE", str(tmp_path / "cache"))
    arch = TINY.smallest()
    shape = (1, 3, arch.resolution, arch.resolution)
    for threads in (2, 1):
        dev = get_device(DeviceParams(name="et", kind="executorch", threads=threads, warmup=1, repeats=3, rounds=1))
        try:
            dev.prepare(Item(functools.partial(_static, arch), shape, key="subnet"))
            m = dev.measure_many([Item(functools.partial(_static, arch), shape, key="subnet")])[0]
        finally:
            dev.close()
        assert m.n == 3 and m.median_ms > 0


def test_executorch_converts_ahead_in_parallel_once_per_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A LUT build's files are lowered before timing, in worker processes, one method per
    distinct block; each position of a repeated block still runs its own loaded instance."""
    monkeypatch.setenv("EVIT_MODEL_CACHE", str(tmp_path / "cache"))
    dp = DeviceParams(name="et", kind="executorch", threads=1, warmup=1, repeats=3, rounds=1, convert_jobs=2)
    arch = TINY.largest()
    blocks = arch_blocks(arch, TINY)
    assert len({b.key for b in blocks}) < len(blocks)  # the case under test: a block repeated in the subnet
    whole = [Item(functools.partial(_static, a), (1, 3, a.resolution, a.resolution), key=f"e2e|{a.key}")
             for a in (arch, TINY.smallest())]
    dev = get_device(dp)
    dev.check_available()
    assert dev.clock_name == "thread" and dev.describe()["executorch"] == "1.5.1"
    try:
        dev.prepare_ahead([_chain(arch), whole])
        assert dev.files_made == 2 and dev.files_reused == 0
        files = sorted((tmp_path / "cache").glob("*.pte"))
        from evit.formats.pte import load_program

        methods = sorted(len(load_program(f).method_names) for f in files)
        assert methods == [2, len({b.key for b in blocks})]  # the repeated block lowered once
        chain = dev.measure_chains([_chain(arch)])[0]
        e2e = dev.measure_many(whole)
        assert dev.files_made == 2  # timing converted nothing
        assert len(chain) == len(blocks) and all(m.n == 3 and m.median_ms > 0 for m in chain)
        assert all(m.median_ms > 0 for m in e2e)
        # each position its own program instance (own weights, own buffers)
        assert sorted(i for (_, i) in dev._loaded) == [0, 0, 1]
    finally:
        dev.close()
    again = get_device(dp)  # a repeated build: the files come from the cache
    try:
        again.measure_chains([_chain(arch)])
    finally:
        again.close()
    assert again.files_made == 0 and again.files_reused == 1


def test_parallel_conversion_stops_on_cancel_and_keeps_no_partial_file(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from evit import cancel

    monkeypatch.setenv("EVIT_MODEL_CACHE", str(tmp_path / "cache"))
    dev = get_device(DeviceParams(name="et", kind="executorch", convert_jobs=2))
    items = [Item(functools.partial(_static, a), (1, 3, a.resolution, a.resolution), key=f"e2e|{a.key}")
             for a in (TINY.largest(), TINY.smallest())]
    cancel.request()
    try:
        with pytest.raises(cancel.Cancelled):
            dev.prepare_ahead([items[:1], items[1:]])
    finally:
        cancel.reset()
        dev.close()
    assert not list((tmp_path / "cache").glob("*.pte*"))


def _static(arch):  # noqa: ANN001, ANN202
    from evit.nn.static import StaticSubnet

    return StaticSubnet(arch, TINY)


def test_litert_gpu_flag_is_for_phones() -> None:
    from evit.errors import DeviceError

    dev = get_device(DeviceParams(name="lt-gpu", kind="litert", gpu=True))
    with pytest.raises(DeviceError, match="GPU delegate on a phone"):
        dev.check_available()


def test_converter_env_failure_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evit.formats.litert_env import LiteRTEnvError, ensure_env

    lock = tmp_path / "bad.lock"
    lock.write_text("evit-no-such-package-anywhere==0.0.1\n")
    monkeypatch.setenv("EVIT_LITERT_LOCK", str(lock))
    monkeypatch.setenv("EVIT_LITERT_VENV", str(tmp_path / "venv"))
    with pytest.raises(LiteRTEnvError, match="could not create the LiteRT converter environment") as err:
        ensure_env()
    assert isinstance(err.value, UserError) and "--no-deps -r" in str(err.value)
    monkeypatch.setenv("EVIT_LITERT_LOCK", str(tmp_path / "missing.lock"))
    with pytest.raises(LiteRTEnvError, match="lock file .* is missing"):
        ensure_env()


def test_converter_venv_shares_identical_files_by_hard_links(tmp_path: Path) -> None:
    from evit.formats.litert_env import share_identical_files

    site = "lib/python3.11/site-packages/pkg"
    for venv, tail in (("main", b"same"), ("conv", b"same")):
        (tmp_path / venv / site).mkdir(parents=True)
        (tmp_path / venv / site / "big.so").write_bytes(b"x" * 4096 + tail)
        (tmp_path / venv / site / "differs.so").write_bytes(b"y" * 4096 + venv.encode())
        (tmp_path / venv / site / "small.py").write_bytes(b"z")
    saved = share_identical_files(tmp_path / "conv", tmp_path / "main", min_bytes=1024)
    conv, main = tmp_path / "conv" / site, tmp_path / "main" / site
    assert saved == 4100
    assert (conv / "big.so").stat().st_ino == (main / "big.so").stat().st_ino
    assert (conv / "differs.so").read_bytes().endswith(b"conv")  # different content: its own copy
    assert (conv / "small.py").stat().st_ino != (main / "small.py").stat().st_ino  # under min_bytes
    assert share_identical_files(tmp_path / "conv", tmp_path / "main", min_bytes=1024) == 0  # idempotent


# --- LiteRT (slow: the converter venv) --------------------------------------------------------

@pytest.fixture(scope="module")
def converter():  # noqa: ANN201
    from evit.formats.tflite import LiteRTConverter

    with LiteRTConverter() as conv:
        yield conv


@pytest.mark.slow
def test_tflite_export_checked_fully_delegated_and_fetchable(converter, mlflow_server: MlflowServer,  # noqa: ANN001, F811
                                                              tmp_path: Path) -> None:
    from evit import registry
    from evit.formats.tflite import full_delegation, run_tflite

    folder, static = make_export(tmp_path / "exp", seed=4, formats=("onnx", "tflite", "pte"), converter=converter)
    card = read_json(folder / "card.json")
    assert card["tflite"]["max_abs_diff_vs_torch"] < 1e-4
    assert card["files"]["model.tflite"] == sha256_file(folder / "model.tflite")
    ok, text = full_delegation(folder / "model.tflite")
    assert ok, text[-2000:]
    x = np.random.default_rng(0).standard_normal((1, 3, 24, 24)).astype(np.float32)
    with torch.no_grad():
        assert np.abs(run_tflite(folder / "model.tflite", x) - static(torch.from_numpy(x)).numpy()).max() < 1e-4

    params = registry_params(mlflow_server.url)
    reg = registry.register_export(params, folder)
    for fmt, name in (("tflite", "model.tflite"), ("pte", "model.pte")):
        out = registry.fetch_model(params, f"{reg['name']}@champion", fmt, tmp_path / fmt)
        assert sha256_file(Path(out["files"][name])) == card["files"][name]
        assert json.loads((tmp_path / fmt / "fetch.json").read_text())["format"] == fmt


@pytest.mark.slow
@pytest.mark.parametrize("space_name", ["cpu", "imagenet"])
def test_litert_fully_delegates_preset_subnets(converter, tmp_path: Path, space_name: str) -> None:  # noqa: ANN001
    from safetensors.torch import save_file

    from evit.formats.tflite import full_delegation, run_tflite
    from evit.nn.static import StaticSubnet
    from evit.space import CPU, IMAGENET
    from tests.test_nn import randomise

    space = CPU if space_name == "cpu" else IMAGENET.with_classes(100)
    arch = space.largest() if space_name == "cpu" else space.smallest()
    net = StaticSubnet(arch, space)
    randomise(net, 0)
    net.eval()
    (tmp_path / "arch.json").write_text(arch.to_json())
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    converter.convert_subnet(tmp_path / "arch.json", tmp_path / "model.safetensors", space.to_dict(),
                             tmp_path / "model.tflite")
    ok, text = full_delegation(tmp_path / "model.tflite")
    assert ok, text[-2000:]
    x = torch.randn(1, 3, arch.resolution, arch.resolution)
    with torch.no_grad():
        ref = net(x).numpy()
    assert np.abs(run_tflite(tmp_path / "model.tflite", x.numpy()) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.slow
def test_litert_device_times_blocks_from_one_multi_signature_file(converter, tmp_path: Path,  # noqa: ANN001
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVIT_MODEL_CACHE", str(tmp_path / "cache"))
    dev = get_device(DeviceParams(name="lt", kind="litert", threads=1, warmup=2, repeats=6, rounds=2))
    dev.check_available()
    dev._converter = converter  # share the module's converter process (the device would start its own)
    arch = TINY.largest()
    try:
        chain = dev.measure_chains([_chain(arch)])[0]
    finally:
        dev._converter = None
        dev.close()
    assert all(m.n == 6 and m.median_ms > 0 for m in chain)
    assert len(list((tmp_path / "cache").glob("*.tflite"))) == 1


def test_a_stopped_conversion_leaves_what_it_made_findable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build stopped half-way (killed, out of memory) has written the manifest of every file
    it finished, so a resumed build that groups the modules differently (a re-measured probe
    changed its plan) converts only what is missing."""
    from evit.latency.devices import converting

    monkeypatch.setenv("EVIT_MODEL_CACHE", str(tmp_path / "cache"))
    dp = DeviceParams(name="et", kind="executorch", threads=1, warmup=1, repeats=3, rounds=1, convert_jobs=1)
    blocks = list({b.key: b for b in arch_blocks(TINY.smallest(), TINY)}.values())[:3]
    items = [Item(functools.partial(build_block, b), block_input_shape(b), key=b.key) for b in blocks]
    monkeypatch.setattr(converting, "BATCH", 1)  # one block per file: the second conversion fails
    dev = get_device(dp)
    real, calls = dev._convert, []

    def convert(modules: Any, path: Path) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise MemoryError("killed")
        real(modules, path)

    monkeypatch.setattr(dev, "_convert", convert)
    with pytest.raises(MemoryError):
        dev.prepare_ahead([items])
    assert len(list((tmp_path / "cache").glob("*.pte.json"))) == 1
    monkeypatch.setattr(converting, "BATCH", 48)  # the resumed plan: all three in one file
    again = get_device(dp)
    try:
        again.prepare_ahead([items])
        assert again.files_reused == 1 and again.files_made == 1
        assert len(again.measure_many(items)) == 3 and again.files_made == 1
    finally:
        again.close()


@pytest.mark.slow
def test_conversion_stops_before_the_disk_fills_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The paper space's files took ~30 GB; a build that fills the disk breaks everything else
    on it. After each file the files still to make are projected from the mean size so far:
    with too little free space the build stops with what to do, keeping what it made, and a
    re-run with room converts only the rest. On LiteRT's parallel path (two converter
    processes, the programs exported at most one file per converter ahead and deleted once
    converted)."""
    import shutil
    import tempfile

    from evit.latency.devices import converting

    monkeypatch.setenv("EVIT_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(converting, "BATCH", 1)  # one block per file
    blocks = list({b.key: b for b in arch_blocks(TINY.smallest(), TINY)}.values())[:5]  # > 2 ahead per converter
    assert len(blocks) == 5
    items = [Item(functools.partial(build_block, b), block_input_shape(b), key=b.key) for b in blocks]
    dp = DeviceParams(name="lt", kind="litert", threads=1, warmup=1, repeats=2, rounds=1, convert_jobs=2)
    real = shutil.disk_usage

    def full(path: Any) -> Any:  # room for the reserve and nothing more
        return real(path)._replace(free=converting.DISK_RESERVE + 1)

    monkeypatch.setattr(converting.shutil, "disk_usage", full)
    dev = get_device(dp)
    try:
        with pytest.raises(UserError, match=r"more \.tflite file\(s\) to convert need about .* EVIT_MODEL_CACHE"):
            dev.prepare_ahead([items])
        made = sorted((tmp_path / "cache").glob("*.tflite.json"))
        assert 1 <= len(made) < 5 and dev.files_made == len(made)
        assert dev.bytes_made == sum(p.with_suffix("").stat().st_size for p in made)
    finally:
        dev.close()
    monkeypatch.setattr(converting.shutil, "disk_usage", real)
    again = get_device(dp)
    try:
        again.prepare_ahead([items])
        # conversions already running when it stopped may have finished their files: reused too
        assert again.files_reused >= len(made) and again.files_reused + again.files_made == 5
        assert all(m.n == 2 for m in again.measure_many(items))
    finally:
        again.close()
    assert not any((tmp_path / "tmp").iterdir())  # no exported programs left behind


def test_lowering_workers_are_replaced_and_every_file_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parallel lowering runs in pools of `workers * WORKER_FILES` files (a worker's memory is
    never given back): three files, two workers, one file per worker -> two pools, all made."""
    from evit.latency.devices import converting, executorch

    monkeypatch.setenv("EVIT_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(converting, "BATCH", 1)
    monkeypatch.setattr(executorch, "WORKER_FILES", 1)
    blocks = list({b.key: b for b in arch_blocks(TINY.smallest(), TINY)}.values())[:3]
    items = [Item(functools.partial(build_block, b), block_input_shape(b), key=b.key) for b in blocks]
    pools = []
    real_pool = executorch.cf.ProcessPoolExecutor

    def pool(*args: Any, **kwargs: Any) -> Any:
        pools.append(args[0])
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(executorch.cf, "ProcessPoolExecutor", pool)
    dev = get_device(DeviceParams(name="et", kind="executorch", threads=1, warmup=1, repeats=3, rounds=1,
                                  convert_jobs=2))
    try:
        dev.prepare_ahead([items])
        assert dev.files_made == 3 and pools == [2, 1]
        assert len(list((tmp_path / "cache").glob("*.pte.json"))) == 3
    finally:
        dev.close()


def test_loaded_copies_are_bounded_and_items_come_back_in_their_own_copy(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A LiteRT interpreter packs every signature of its file, so a paper-space table's ~100
    files, a copy per repeated position, do not fit in memory at once (the 5-minute LiteRT table
    was killed at 22.6 GB). Loaded copies beyond `loaded_share` are dropped, least recently used
    first and never the current batch's; an item comes back in its own copy (its own weights),
    not a new one. Checked on ExecuTorch (the mechanism is the shared converting device's)."""
    from evit.latency.devices import converting

    monkeypatch.setenv("EVIT_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(converting, "BATCH", 1)
    b0, b1 = list({b.key: b for b in arch_blocks(TINY.smallest(), TINY)}.values())[:2]
    first, again, other = (Item(functools.partial(build_block, b), block_input_shape(b), key=k, file_key=b.key)
                           for b, k in ((b0, b0.key), (b0, f"{b0.key}#1"), (b1, b1.key)))
    dev = get_device(DeviceParams(name="et", kind="executorch", threads=1, warmup=1, repeats=2, rounds=1,
                                  convert_jobs=1))
    dev.loaded_share = 1e-15  # every copy the current batch does not use is dropped
    try:
        assert all(m.n == 2 for m in dev.measure_many([first, again]))
        f0 = dev._index[dev._content_key(first)][0]
        assert set(dev._loaded) == {(f0, 0), (f0, 1)}  # the repeated position: a copy of its own
        dev.measure_many([other])
        f1 = dev._index[dev._content_key(other)][0]
        assert set(dev._loaded) == {(f1, 0)} and first.key not in dev._prepared
        dev.measure_many([first, again])
        assert set(dev._loaded) == {(f0, 0), (f0, 1)}
        assert dev._copy_of[again.key] == (f0, 1) and dev._instances[dev._index[dev._content_key(first)]] == 2
        assert dev.files_made == 2
    finally:
        dev.close()
