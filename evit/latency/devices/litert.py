"""Kind `litert`: the LiteRT interpreter (ai-edge-litert, XNNPACK delegate), in process, on
.tflite files made by the converter's own environment (`evit.formats.tflite`)."""

from __future__ import annotations

import concurrent.futures as cf
import queue
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
from evit.formats.tflite import LiteRTConverter, convert_modules, export_pt2, interpreter
from evit.latency.devices.base import Item, Prepared
from evit.latency.devices.converting import ConvertedFile, ConvertingDevice, build_module


class LiteRTDevice(ConvertingDevice):
    """LiteRT (ai-edge-litert interpreter, XNNPACK delegate), in process, on .tflite files
    made by the converter venv."""

    suffix = ".tflite"
    runtime_packages = ("ai-edge-litert",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._converter: Any = None
        self._interpreters: dict[tuple[Path, int], Any] = {}

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
        self._interpreters.clear()
        super().close()

    def _convert(self, modules: dict[str, tuple[nn.Module, tuple[int, ...]]], path: Path) -> None:
        if self._converter is None:
            self._converter = LiteRTConverter()
        convert_modules(self._converter, modules, path)

    def _convert_parallel(self, files: Sequence[ConvertedFile], workers: int, t0: float) -> None:
        """One converter process per worker thread; torch.export runs here, one file at a time."""
        if self._converter is None:
            self._converter = LiteRTConverter()
        converters: queue.Queue[Any] = queue.Queue()
        extra = [LiteRTConverter() for _ in range(workers - 1)]
        for c in (self._converter, *extra):
            converters.put(c)

        def convert(programs: list[tuple[str, Path, list[tuple[int, ...]]]], path: Path) -> None:
            conv = converters.get()
            try:
                conv.convert_programs(programs, path)
            finally:
                converters.put(conv)

        with tempfile.TemporaryDirectory(prefix="evit-pt2-") as tmp, \
                cf.ThreadPoolExecutor(workers, thread_name_prefix="litert-convert") as pool:
            try:
                futures = {}
                for i, f in enumerate(files):
                    cancel.check(f"{self.name}: converting files, the ones done are cached")
                    programs = export_pt2({n: build_module(m, shape) for n, (m, shape) in f.modules.items()},
                                          Path(tmp) / f"f{i}")
                    futures[pool.submit(convert, programs, f.path)] = f
                self._wait(futures, len(files), t0)
            finally:
                for c in extra:  # stops their processes; a running conversion ends with an error
                    c.close()
                pool.shutdown(wait=True, cancel_futures=True)

    def _load(self, path: Path, name: str, item: Item, instance: int) -> Prepared:
        interp = self._interpreters.get((path, instance))
        if interp is None:
            interp = self._interpreters[(path, instance)] = interpreter(path, self.params.threads)
        runner = interp.get_signature_runner(name)
        sig = interp.get_signature_list()[name]
        in_name, out_name = sig["inputs"][0], sig["outputs"][0]

        def step(v: np.ndarray) -> np.ndarray:
            return runner(**{in_name: v})[out_name]

        return Prepared(step, seeded_input(item.input_shape).numpy())
