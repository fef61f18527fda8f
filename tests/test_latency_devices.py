"""Latency devices: real measurements on this machine, and clear errors for bad devices."""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path

import pytest
import torch
from test_latency_helpers import device_params
from torch import nn

from evit.config import ConfigError, DeviceParams, parse_params
from evit.errors import DeviceError
from evit.host import cpu_model
from evit.latency.devices import Item, get_device
from evit.latency.measurement import Measurement


def _conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardswish()).eval()


def _ok(m: Measurement, n: int) -> None:
    assert m.n == n and len(m.samples) == n
    assert 0 < m.p10_ms <= m.median_ms <= m.p90_ms
    assert m.std_ms >= 0 and math.isfinite(m.mean_ms)


def test_measurement_statistics() -> None:
    m = Measurement.from_samples([float(x) for x in range(1, 11)])
    assert (m.median_ms, m.n, m.mean_ms) == (5.5, 10, 5.5)
    assert m.p10_ms == pytest.approx(1.9) and m.p90_ms == pytest.approx(9.1)
    assert "samples" not in m.to_dict()
    assert Measurement.from_dict(m.to_dict()).median_ms == 5.5


@pytest.mark.parametrize("runtime", ["eager", "torchscript"])
def test_torch_cpu_measures_and_restores_threads(runtime: str) -> None:
    dev = get_device(device_params(threads=1, runtime=runtime, repeats=5))
    dev.check_available()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _ok(dev.measure(_conv(), (1, 8, 12, 12)), 5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    d = dev.describe()
    assert d["kind"] == "torch-cpu" and d["threads"] == 1 and d["torch"] == torch.__version__
    assert d["cpu"] == cpu_model() and d["hostname"] and d["clock"] == "thread"


def test_onnxruntime_cpu_measures_its_onnx_export() -> None:
    dev = get_device(device_params(kind="onnxruntime-cpu", repeats=5))
    dev.check_available()
    try:
        ms = dev.measure_many([Item(_conv(), (1, 8, 12, 12)), Item(nn.Identity(), (1, 8, 12, 12))])
    finally:
        dev.close()
    for m in ms:
        _ok(m, 5)
    assert ms[0].median_ms > ms[1].median_ms  # a conv costs more than a copy
    assert dev.describe()["onnxruntime"]


@pytest.mark.parametrize("kind", ["torch-cpu", "onnxruntime-cpu"])
def test_chains_feed_each_module_the_previous_output(kind: str) -> None:
    dev = get_device(device_params(kind=kind, repeats=6, rounds=3))
    chain = [Item(_conv(), (1, 8, 12, 12), key="a"), Item(nn.Conv2d(16, 4, 1).eval(), (1, 16, 12, 12), key="b")]
    try:
        (ms,) = dev.measure_chains([chain])
    finally:
        dev.close()
    assert len(ms) == 2
    for m in ms:
        _ok(m, 6)


def test_prepared_modules_and_exported_files_are_bounded() -> None:
    """Paper-scale tables cannot keep every block's module and ONNX file; the caches stay bounded."""
    dev = get_device(device_params(kind="onnxruntime-cpu", repeats=3))
    dev._CACHE_BYTES = 1  # keep one prepared module, one file
    dev._FILE_BYTES = 1
    chain = [Item(_conv(), (1, 8, 12, 12), key="a", file_key="a"),
             Item(nn.Conv2d(16, 4, 1).eval(), (1, 16, 12, 12), key="b", file_key="b"),
             Item(nn.Conv2d(4, 4, 1).eval(), (1, 4, 12, 12), key="c", file_key="c")]
    try:
        (ms,) = dev.measure_chains([chain])
        assert len(ms) == 3 and all(m.median_ms > 0 for m in ms)
        assert list(dev._prepared) == ["c"] and list(dev._files) == ["c"]
        assert sum(1 for _ in Path(dev._tmp.name).rglob("*.onnx")) == 1
        (again,) = dev.measure_chains([chain])  # evicted items are simply prepared again
        assert len(again) == 3
    finally:
        dev.close()


def test_wall_clock_for_multithreaded_devices() -> None:
    assert get_device(device_params(threads=2)).clock_name == "wall"
    assert get_device(device_params(clock="wall")).clock_name == "wall"
    with pytest.raises(Exception, match="clock 'thread'"):
        device_params(threads=2, clock="thread")


def test_cuda_device_without_gpu_is_a_clear_error() -> None:
    dev = get_device(device_params(kind="cuda", dtype="float16"))
    if torch.cuda.is_available():  # pragma: no cover - only on a GPU machine
        dev.check_available()
        _ok(dev.measure(_conv(), (1, 8, 12, 12)), 4)
        return
    with pytest.raises(DeviceError, match=r"device 't1' \(kind cuda\) needs an NVIDIA GPU, but none is present"):
        dev.check_available()


# --- command devices: real local commands ---------------------------------------------------

PY = shlex.quote(sys.executable)


def test_command_device_runs_a_real_benchmark_runner() -> None:
    cmd = f"{PY} -m evit.latency.ort_runner {{model}} --input-shape {{input_shape}} --threads {{threads}} --repeats 5"
    dev = get_device(device_params(kind="command", command=cmd))
    dev.check_available()
    try:
        ms = dev.measure_many([Item(_conv(), (1, 8, 12, 12)), Item(_conv(), (1, 8, 24, 24))])
    finally:
        dev.close()
    assert all(m.n == 1 and m.median_ms > 0 for m in ms)
    assert dev.describe()["command"] == cmd


def test_command_receives_resolution_and_shape() -> None:
    # prints "<resolution> <product of the shape>"; the last number is the latency
    script = "import sys; s=[int(x) for x in sys.argv[2].split(',')]; print('res', sys.argv[1], 'ms', s[0]*s[1])"
    cmd = f"{PY} -c {shlex.quote(script)} {{resolution}} {{input_shape}}"
    dev = get_device(device_params(kind="command", command=cmd))
    (m,) = dev.measure_many([Item(_conv(), (1, 8, 12, 12))])
    assert m.median_ms == 8.0


def test_failing_command_reports_status_command_and_stderr() -> None:
    script = "import sys; sys.stderr.write('adb: device offline\\n'); sys.exit(3)"
    cmd = f"{PY} -c {shlex.quote(script)} {{model}}"
    dev = get_device(device_params(kind="command", command=cmd))
    with pytest.raises(DeviceError) as exc:
        dev.measure(_conv(), (1, 8, 12, 12))
    msg = str(exc.value)
    assert "exited with status 3" in msg and "adb: device offline" in msg and "-c" in msg


def test_garbage_output_is_an_error() -> None:
    dev = get_device(device_params(kind="command", command="echo latency: unknown {model}"))
    with pytest.raises(DeviceError, match="printed no positive latency"):
        dev.measure(_conv(), (1, 8, 12, 12))
    dev = get_device(device_params(kind="command", command="echo -5"))
    with pytest.raises(DeviceError, match="no positive latency"):
        dev.measure(_conv(), (1, 8, 12, 12))


def test_command_timeout_is_an_error() -> None:
    cmd = f"{PY} -c 'import time; time.sleep(5)' {{model}}"
    dev = get_device(device_params(kind="command", command=cmd, command_timeout_s=0.5))
    with pytest.raises(DeviceError, match="timed out after 0.5 s"):
        dev.measure(_conv(), (1, 8, 12, 12))


def test_bad_command_templates_fail_up_front() -> None:
    with pytest.raises(DeviceError, match=r"bad placeholder.*\{model\}"):
        get_device(device_params(kind="command", command="bench {modle}")).check_available()
    with pytest.raises(DeviceError, match="'no-such-benchmark-tool' of its command was not found"):
        get_device(device_params(kind="command", command="no-such-benchmark-tool {model}")).check_available()


def test_device_params_errors_name_the_device() -> None:
    with pytest.raises(ValueError, match="dtype 'float16' needs kind 'cuda'"):
        DeviceParams(name="x", kind="torch-cpu", dtype="float16")
    with pytest.raises(ValueError, match="runtime 'torchscript' applies to kinds"):
        DeviceParams(name="x", kind="onnxruntime-cpu", runtime="torchscript")
    with pytest.raises(ValueError, match="no 'command' template"):
        DeviceParams(name="x", kind="command")
    params = parse_params({"devices": [{"name": "cpu-1t", "kind": "torch-cpu"}]})
    with pytest.raises(ConfigError, match=r"unknown device 'pixel9'; params.yaml declares: \['cpu-1t'\]"):
        params.device("pixel9")


def test_a_timed_module_has_no_zeroed_bn_scale_and_trained_weights_are_untouched() -> None:
    """A fresh subnet zeroes each MBConv's last BN gamma (training start); LiteRT's converter
    folds such a branch away, so the module a device times must not carry it."""
    import functools

    from search_export_helpers import TINY
    from test_nn import randomise

    from evit.latency.devices.base import module_to_time
    from evit.nn.static import StaticSubnet

    arch = TINY.largest()
    fresh = StaticSubnet(arch, TINY)
    zeroed = [m for m in fresh.modules() if isinstance(m, nn.BatchNorm2d) and not m.weight.any()]
    assert zeroed, "the fresh subnet should start with zeroed BN scales"
    timed = module_to_time(functools.partial(StaticSubnet, arch, TINY))
    assert not timed.training
    assert all(m.weight.any() for m in timed.modules() if isinstance(m, nn.BatchNorm2d))
    trained = StaticSubnet(arch, TINY)
    randomise(trained, 0)
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    module_to_time(trained)
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
