"""Phone runner scripts (infra/devices/*.sh) against a fake `adb` that replays the real tools' output.

There is no phone here. The fake `adb` on PATH keeps pushed files in a folder standing
for the phone and answers `adb shell` with what LiteRT's `benchmark_model` and
ExecuTorch's `executor_runner` print (the formats quoted in issue #10), a failing run,
or garbage, as FAKE_ADB_MODE says; it records every command line. The `command` device
is then checked to hand the runner the model in the format it asks for (`format: pte`).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LITERT = REPO / "infra" / "devices" / "litert_benchmark.sh"
EXECUTORCH = REPO / "infra" / "devices" / "executorch_benchmark.sh"
ONNX = REPO / "infra" / "devices" / "adb_benchmark.sh"

FAKE_ADB = r'''
import os, re, shutil, sys
from pathlib import Path
phone = Path(os.environ["FAKE_PHONE"])
mode = os.environ.get("FAKE_ADB_MODE", "ok")
with open(phone / "adb.log", "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\n")
args = sys.argv[1:]
if args[0] == "push":
    dest = phone / Path(args[2]).name
    shutil.copyfile(args[1], dest)
    print(f"{args[1]}: 1 file pushed.")
    sys.exit(0)
assert args[0] == "shell", args
cmd = " ".join(args[1:])
if cmd.startswith("mkdir"):
    sys.exit(0)
if mode == "adb-dies":
    print("adb: device offline", file=sys.stderr)
    sys.exit(1)
if mode == "garbage":
    print("Segmentation fault\n\x00\x01 weird 123 bytes")
    print("evit-exit=0")
    sys.exit(0)
if mode == "fail":
    print("ERROR: Failed to load model: model.tflite" if "benchmark_model" in cmd else
          "E executorch:executor_runner.cpp:92] Loading of method forward failed with status 0x14")
    print("evit-exit=1")
    sys.exit(0)
if "benchmark_model" in cmd:
    model = phone / "model.tflite"
    assert model.read_bytes()[4:8] == b"TFL3", "not a .tflite"
    gpu = "--use_gpu=true" in cmd
    avg = 2345.6 if gpu else 901.2
    print("INFO: STARTING!\nINFO: Num threads: [1]\nINFO: Graph: [model.tflite]\n"
          + ("INFO: Created TensorFlow Lite delegate for GPU.\n" if gpu else
             "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
          + "INFO: Initialized session in 12.3ms.\n"
          "INFO: count=50 first=1234 curr=890 min=850 max=1300 avg=%s std=40\n"
          "INFO: Inference timings in us: Init: 12345, First inference: 1234, Warmup (avg): 950.5, "
          "Inference (avg): %s\n"
          "INFO: Memory footprint delta from the start of the tool (MB): init=5.1 overall=6.2" % (avg, avg))
    print("evit-exit=0")
elif "onnxruntime_perf_test" in cmd:
    assert (phone / "model.onnx").exists(), "no model.onnx"
    print("Session creation time cost: 0.0123 s\nTotal inference time cost: 0.617 s\n"
          "Total inference requests: 50\nAverage inference time cost: 12.34 ms")
elif "executor_runner" in cmd:
    model = phone / "model.pte"
    assert model.read_bytes()[4:6] == b"ET", "not a .pte"
    n = int(re.search(r"--num_executions=(\d+)", cmd).group(1))
    print("I 00:00:00.001 executorch:executor_runner.cpp:82] Model file model.pte is loaded.\n"
          "I 00:00:00.001 executorch:executor_runner.cpp:91] Using method forward\n"
          "I 00:00:00.010 executorch:executor_runner.cpp:161] Method loaded.\n"
          f"I 00:00:00.100 executorch:executor_runner.cpp:180] Model executed successfully {n} time(s) in {0.91 * n:f} ms.\n"
          "I 00:00:00.100 executorch:executor_runner.cpp:184] 1 outputs:\nOutput 0: tensor(sizes=[1, 10], [0.1, ...])")
    print("evit-exit=0")
else:
    print(f"/system/bin/sh: {cmd.split()[0]}: not found")
    print("evit-exit=127")
'''


@pytest.fixture()
def fake_adb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake `adb` first on PATH; returns the folder standing for the phone."""
    bindir, phone = tmp_path / "bin", tmp_path / "phone"
    bindir.mkdir()
    phone.mkdir()
    adb = bindir / "adb"
    adb.write_text(f"#!{sys.executable}\n" + textwrap.dedent(FAKE_ADB))
    adb.chmod(adb.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PHONE", str(phone))
    return phone


def _model(tmp_path: Path, suffix: str) -> Path:
    path = tmp_path / f"m{suffix}"
    magic = b"\x1c\x00\x00\x00TFL3" if suffix == ".tflite" else b"\x00\x00\x00\x00ET12"
    path.write_bytes(magic + b"\x00" * 64)
    return path


def _run(script: Path | str, *args: str, mode: str = "ok", cwd: Path | None = None,
         **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**os.environ, "FAKE_ADB_MODE": mode, **env})


def test_litert_runner_parses_benchmark_model_cpu_and_gpu(fake_adb: Path, tmp_path: Path) -> None:
    model = _model(tmp_path, ".tflite")
    cpu = _run(LITERT, str(model), "--threads", "2", "--runs", "50", "--warmup", "5")
    assert cpu.returncode == 0, cpu.stderr
    assert cpu.stdout.strip().splitlines()[-1] == "0.901200"
    gpu = _run(LITERT, str(model), "--gpu")
    assert gpu.returncode == 0 and gpu.stdout.strip() == "2.345600"
    log = (fake_adb / "adb.log").read_text()
    assert "--num_threads=2 --use_gpu=false" in log and "--num_runs=50 --warmup_runs=5" in log
    assert "--use_gpu=true" in log


def test_executorch_runner_divides_the_total_by_the_executions(fake_adb: Path, tmp_path: Path) -> None:
    out = _run(EXECUTORCH, str(_model(tmp_path, ".pte")), "--runs", "40", "--threads", "4", "--warmup", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.910000"
    log = (fake_adb / "adb.log").read_text()
    assert "--num_executions=3 --cpu_threads=4" in log and "--num_executions=40 --cpu_threads=4" in log


@pytest.mark.parametrize("script,suffix", [(LITERT, ".tflite"), (EXECUTORCH, ".pte")], ids=["litert", "executorch"])
@pytest.mark.parametrize("mode", ["fail", "garbage"])
def test_runner_fails_loudly_on_a_failing_run_or_garbage(fake_adb: Path, tmp_path: Path, script: Path, suffix: str,
                                                         mode: str) -> None:
    out = _run(script, str(_model(tmp_path, suffix)), mode=mode)
    assert out.returncode == 1 and out.stdout == ""
    assert "failed" in out.stderr and ("Failed" in out.stderr or "failed with status" in out.stderr
                                       or "Segmentation fault" in out.stderr)


def test_runner_rejects_bad_arguments_before_touching_the_phone(fake_adb: Path, tmp_path: Path) -> None:
    out = _run(LITERT, str(tmp_path / "missing.tflite"))
    assert out.returncode == 2 and "not found" in out.stderr
    out = _run(EXECUTORCH, str(_model(tmp_path, ".pte")), "--bogus")
    assert out.returncode == 2 and "unknown argument" in out.stderr
    assert not (fake_adb / "adb.log").exists()


def test_runner_rejects_a_flag_of_the_other_tool_and_a_missing_value(fake_adb: Path, tmp_path: Path) -> None:
    """--gpu is LiteRT's own flag; the options' shared parser (adb_lib.sh) does not take it for ExecuTorch."""
    out = _run(EXECUTORCH, str(_model(tmp_path, ".pte")), "--gpu")
    assert out.returncode == 2 and "unknown argument: --gpu" in out.stderr
    assert out.stderr.startswith("usage: executorch_benchmark.sh MODEL.pte")
    out = _run(LITERT, str(_model(tmp_path, ".tflite")), "--runs")
    assert out.returncode != 0 and "usage: litert_benchmark.sh MODEL.tflite" in out.stderr
    assert not (fake_adb / "adb.log").exists()


@pytest.mark.parametrize("script,suffix", [(LITERT, ".tflite"), (EXECUTORCH, ".pte")], ids=["litert", "executorch"])
def test_runner_reports_adb_failing_itself(fake_adb: Path, tmp_path: Path, script: Path, suffix: str) -> None:
    """adb's own failure (phone gone during the run, no evit-exit line) is a failed run too."""
    out = _run(script, str(_model(tmp_path, suffix)), mode="adb-dies")
    assert out.returncode == 1 and out.stdout == ""
    assert "failed (adb status 1, " in out.stderr and "status ?)" in out.stderr and "device offline" in out.stderr


@pytest.mark.parametrize("script,suffix", [(LITERT, ".tflite"), (EXECUTORCH, ".pte")], ids=["litert", "executorch"])
def test_runner_finds_its_library_from_any_directory_and_honours_evit_adb_dir(
        fake_adb: Path, tmp_path: Path, script: Path, suffix: str) -> None:
    """The scripts source adb_lib.sh next to themselves, whatever the working directory and however called."""
    model = _model(tmp_path, suffix)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for how in (str(script), os.path.relpath(script, elsewhere)):
        out = _run(how, str(model), "--runs", "10", cwd=elsewhere, EVIT_ADB_DIR="/data/local/tmp/other")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() in ("0.901200", "0.910000")
    log = (fake_adb / "adb.log").read_text()
    assert f"push {model} /data/local/tmp/other/model{suffix}" in log
    assert "shell mkdir -p /data/local/tmp/other" in log and "shell cd /data/local/tmp/other && ./" in log
    assert "/data/local/tmp/evit" not in log


def test_onnx_runner_pushes_and_parses_onnxruntime_perf_test(fake_adb: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"\x08\x07" + b"\x00" * 64)
    out = _run(ONNX, str(model), "224", cwd=tmp_path, EVIT_ADB_RUNS="7", EVIT_ADB_THREADS="3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "12.34"
    log = (fake_adb / "adb.log").read_text().splitlines()
    assert log[:2] == ["shell mkdir -p /data/local/tmp/evit", f"push {model} /data/local/tmp/evit/model.onnx"]
    assert "-r 7 -x 3 -y 1 model.onnx" in log[2]
    out = _run(ONNX, str(model), "224", mode="garbage")
    assert out.returncode == 1 and "no latency in onnxruntime_perf_test output" in out.stderr


def test_command_device_hands_the_runner_a_pte(fake_adb: Path) -> None:
    """kind: command with format: pte lowers the block to ExecuTorch and the runner times that file."""
    from evit.blocks import Block
    from evit.config import DeviceParams
    from evit.latency.devices import Item, get_device
    from evit.nn.static import block_input_shape, build_block

    dp = DeviceParams(name="phone-et", kind="command", format="pte",
                      command=f"{EXECUTORCH} {{model}} --threads {{threads}} --runs {{repeats}} --warmup {{warmup}}",
                      repeats=20, warmup=2)
    dev = get_device(dp)
    dev.check_available()
    block = Block("mbconv", 8, 16, 16, expansion=2, kernel=3)
    try:
        m = dev.measure_many([Item(build_block(block), block_input_shape(block))])[0]
    finally:
        dev.close()
    assert m.median_ms == pytest.approx(0.91)
    assert "--num_executions=20 --cpu_threads=1" in (fake_adb / "adb.log").read_text()


def test_command_device_refuses_a_format_on_other_kinds() -> None:
    from pydantic import ValidationError

    from evit.config import DeviceParams

    with pytest.raises(ValidationError, match="format 'pte' applies to kind 'command' only"):
        DeviceParams(name="x", kind="torch-cpu", format="pte")
    with pytest.raises(ValidationError, match="gpu applies to kinds"):
        DeviceParams(name="x", kind="executorch", gpu=True)
