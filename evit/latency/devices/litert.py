"""Kind `litert`: the LiteRT interpreter (ai-edge-litert, XNNPACK delegate), in process, on
.tflite files made by the converter's own environment (`evit.formats.tflite`).

`precision: int8` converts every block and subnet the way the export makes
`model.int8.tflite`: LiteRT's int8 forms (`evit.formats.quantize.litert_int8_forms`) before
`torch.export`, then the same quantize function with `litert_worker.litert_quantizer` in the
converter venv. Calibration: `INT8_CALIBRATION` seeded standard-normal inputs of each module's own
shape, for the reason the executorch device gives (kernel time depends on shapes and on
which ops are quantized, not on the scales' values; images would only matter for accuracy).
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import queue
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from evit import cancel
from evit.errors import DeviceError
from evit.formats.inputs import seeded_input
from evit.formats.litert_env import lock_file
from evit.formats.quantize import litert_int8_forms
from evit.formats.tflite import LiteRTConverter, convert_modules, export_pt2, interpreter
from evit.latency.devices.base import Item, Prepared
from evit.latency.devices.converting import INT8_CALIBRATION, ConvertedFile, ConvertingDevice, build_module


class LiteRTDevice(ConvertingDevice):
    """LiteRT (ai-edge-litert interpreter, XNNPACK delegate), in process, on .tflite files
    made by the converter venv."""

    suffix = ".tflite"
    runtime_packages = ("ai-edge-litert",)
    quantize_modules = ("evit.formats.quantize", "evit.formats.litert_worker")
    loaded_share = 0.25
    """An interpreter packs every signature's weights (~2x the file's bytes once run): the
    paper-space 5-minute table's ~100 files, a copy per repeated position, held at once, were
    killed at 22.6 GB; bounded, that build peaked at 15 GB."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._converter: Any = None

    def _int8_forms(self, module: nn.Module) -> nn.Module:
        """The module to convert: a copy in LiteRT's int8 forms when the table is int8 (the
        caller's module is left as it is)."""
        return litert_int8_forms(copy.deepcopy(module)) if self.int8 else module

    def check_available(self) -> None:
        if self.params.gpu:
            raise DeviceError(
                f"device '{self.name}': gpu: true is LiteRT's GPU delegate on a phone; in process this machine "
                "times the CPU (XNNPACK) path only. Declare the phone as kind: command with format: tflite and "
                "infra/devices/litert_benchmark.sh --gpu (README, 'Deploy to a phone')")
        try:
            import ai_edge_litert.interpreter  # noqa: F401
        except ImportError as exc:
            raise DeviceError(f"device '{self.name}' (kind litert) needs the ai-edge-litert package "
                              f"(requirements.lock): {exc}") from None
        if not lock_file().is_file():
            raise DeviceError(f"device '{self.name}': the LiteRT converter lock {lock_file()} is missing")

    def close(self) -> None:
        if self._converter is not None:
            self._converter.close()
            self._converter = None
        super().close()

    def _convert(self, modules: dict[str, tuple[nn.Module, tuple[int, ...]]], path: Path) -> None:
        if self._converter is None:
            self._converter = LiteRTConverter()
        convert_modules(self._converter, {n: (self._int8_forms(m), shape) for n, (m, shape) in modules.items()},
                        path, INT8_CALIBRATION if self.int8 else 0)

    def _convert_parallel(self, files: Sequence[ConvertedFile], workers: int, t0: float) -> None:
        """One converter process per worker thread; torch.export runs here, one file at a time."""
        if self._converter is None:
            self._converter = LiteRTConverter()
        converters: queue.Queue[Any] = queue.Queue()
        extra = [LiteRTConverter() for _ in range(workers - 1)]
        for c in (self._converter, *extra):
            converters.put(c)

        def convert(programs: list[tuple[str, Path, list[tuple[int, ...]]]], path: Path, folder: Path) -> None:
            conv = converters.get()
            try:
                conv.convert_programs(programs, path, INT8_CALIBRATION if self.int8 else 0)
            finally:
                converters.put(conv)
                shutil.rmtree(folder, ignore_errors=True)  # the programs hold the weights again: free them now

        with tempfile.TemporaryDirectory(prefix="evit-pt2-") as tmp, \
                cf.ThreadPoolExecutor(workers, thread_name_prefix="litert-convert") as pool:
            try:
                futures: dict[cf.Future[Any], ConvertedFile] = {}
                done = 0
                for i, f in enumerate(files):
                    cancel.check(f"{self.name}: converting files, the ones done are cached")
                    # exporting runs ahead of the converters by at most one file each (bounded temp disk)
                    done = self._wait(futures, len(files), t0, done, keep=2 * workers - 1)
                    built = {n: build_module(m, shape) for n, (m, shape) in f.modules.items()}
                    folder = Path(tmp) / f"f{i}"
                    programs = export_pt2({n: (self._int8_forms(m), shape) for n, (m, shape) in built.items()}, folder)
                    futures[pool.submit(convert, programs, f.path, folder)] = f
                self._wait(futures, len(files), t0, done)
            finally:
                for c in extra:  # stops their processes; a running conversion ends with an error
                    c.close()
                pool.shutdown(wait=True, cancel_futures=True)

    def _open(self, path: Path) -> Any:
        return interpreter(path, self.params.threads)

    def _load(self, interp: Any, name: str, item: Item) -> Prepared:
        runner = interp.get_signature_runner(name)
        sig = interp.get_signature_list()[name]
        in_name, out_name = sig["inputs"][0], sig["outputs"][0]

        def step(v: np.ndarray) -> np.ndarray:
            return runner(**{in_name: v})[out_name]

        return Prepared(step, seeded_input(item.input_shape).numpy())
