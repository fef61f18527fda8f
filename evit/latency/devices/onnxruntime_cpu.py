"""Kind `onnxruntime-cpu`: onnxruntime's CPU provider on each module's ONNX export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from evit.errors import DeviceError
from evit.formats.inputs import seeded_input
from evit.formats.onnx import session
from evit.latency.devices.base import Device, Item, Prepared


class OnnxRuntimeCPUDevice(Device):
    """onnxruntime's CPU provider on the module's ONNX export (one session per module)."""

    per_call_overhead = True

    def check_available(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise DeviceError(f"device '{self.name}' (kind onnxruntime-cpu) needs the onnxruntime package: {exc}") \
                from None
        if "CPUExecutionProvider" not in ort.get_available_providers():
            raise DeviceError(f"device '{self.name}': onnxruntime has no CPUExecutionProvider; available: "
                              f"{ort.get_available_providers()}")

    def session(self, onnx_path: Path) -> Any:
        return session(onnx_path, self.params.threads, timing=True)

    def _prepare(self, module: nn.Module, item: Item, workdir: Path) -> Prepared:
        """A session run through IOBinding: input and a preallocated output stay ORT values.

        So a chain hands each block the previous block's output without a copy to numpy
        and back, as activations stay inside onnxruntime within a whole-subnet session;
        `session.run` would add an output allocation and copy per block, which grows with
        the activation size and is not part of a subnet's latency.
        """
        import onnxruntime as ort

        path = self._onnx_file(module, item, workdir)
        sess = self.session(path)
        in_name, out_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name
        x = seeded_input(item.input_shape).numpy()
        out_shape = sess.run([out_name], {in_name: x})[0].shape
        y = ort.OrtValue.ortvalue_from_shape_and_type(out_shape, np.float32)
        io = sess.io_binding()
        io.bind_ortvalue_output(out_name, y)
        bind, run = io.bind_ortvalue_input, sess.run_with_iobinding

        def step(v: Any) -> Any:
            bind(in_name, v)
            run(io)
            return y

        return Prepared(step, ort.OrtValue.ortvalue_from_numpy(x))
