"""Latency devices: one module per device kind, one interface (`base.Device`).

`get_device(dp)` turns a validated `DeviceParams` into its kind's `Device`:

| kind | module |
|---|---|
| `torch-cpu` | `torch_cpu` (eager or traced+frozen TorchScript) |
| `onnxruntime-cpu` | `onnxruntime_cpu` (the pipeline's own ONNX export) |
| `cuda` | `cuda` (CUDA events) |
| `litert`, `executorch` | `litert`, `executorch` on `converting` (the phone runtimes, in process) |
| `command` | `command` (an external runner: adb + a phone, a board) |

What each kind is (timed on the calling thread, converts files, runs elsewhere) is
declared in `evit.config.devices.KINDS`; this table only says which class implements it.
"""

from __future__ import annotations

from evit.config import KINDS, DeviceParams
from evit.errors import DeviceError
from evit.latency.devices.base import (
    Device,
    Item,
    Prepared,
    export_onnx_file,
    split_repeats,
    torch_threads,
)
from evit.latency.devices.command import CommandDevice
from evit.latency.devices.cuda import CudaDevice
from evit.latency.devices.executorch import ExecuTorchDevice
from evit.latency.devices.litert import LiteRTDevice
from evit.latency.devices.onnxruntime_cpu import OnnxRuntimeCPUDevice
from evit.latency.devices.torch_cpu import TorchCPUDevice
from evit.latency.measurement import Measurement

DEVICE_CLASSES: dict[str, type[Device]] = {
    "torch-cpu": TorchCPUDevice,
    "onnxruntime-cpu": OnnxRuntimeCPUDevice,
    "cuda": CudaDevice,
    "litert": LiteRTDevice,
    "executorch": ExecuTorchDevice,
    "command": CommandDevice,
}
assert set(DEVICE_CLASSES) == set(KINDS), "every declared device kind needs its class"

__all__ = ["DEVICE_CLASSES", "CommandDevice", "CudaDevice", "Device", "ExecuTorchDevice", "Item", "LiteRTDevice",
           "Measurement", "OnnxRuntimeCPUDevice", "Prepared", "TorchCPUDevice", "export_onnx_file", "get_device",
           "split_repeats", "torch_threads"]


def get_device(dp: DeviceParams, *, opset: int = 17) -> Device:
    """The `Device` for one validated `devices:` entry (`opset` for kinds that export ONNX)."""
    try:
        cls = DEVICE_CLASSES[dp.kind]
    except KeyError:  # pragma: no cover - DeviceParams already restricts the kinds
        raise DeviceError(f"device '{dp.name}': unknown kind {dp.kind!r}; accepted: {sorted(DEVICE_CLASSES)}") from None
    return cls(dp, opset=opset)
