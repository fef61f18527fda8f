"""Kind `executorch`: ExecuTorch with the XNNPACK delegate, in process (what a phone's
`executor_runner` links), on programs lowered in spawned worker processes.

`precision: int8` lowers every block and subnet through the export's int8 function
(`evit.formats.quantize.quantize_int8`), so the table times the int8 kernels the shipped
`model.int8.pte` runs. The activation scales come from `INT8_CALIBRATION` seeded
standard-normal inputs of each module's own shape, not from images: a block deep in a
subnet never sees images, and the time of XNNPACK's int8 kernels depends on the shapes
and on which ops are quantized (the float policy, a property of the graph), not on the
values of the scales and zero points, so random calibration does not bias the timing
(it would bias accuracy, which is why the export calibrates on the search split).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evit.errors import DeviceError
from evit.formats.inputs import seeded_input
from evit.formats.pte import export_pte_methods, load_program, set_threads
from evit.latency.devices.base import Item, Prepared
from evit.latency.devices.converting import INT8_CALIBRATION, ConvertedFile, ConvertingDevice, Modules, build_module


def lower_modules(modules: dict[str, tuple[nn.Module, tuple[int, ...]]], path: str | Path, int8: bool) -> None:
    """Lower built modules (name -> (module, input shape)) into one .pte, in int8 when asked."""
    calib = ({n: [seeded_input((INT8_CALIBRATION, *shape[1:]), seed=1)] for n, (_m, shape) in modules.items()}
             if int8 else None)
    export_pte_methods({n: (m, seeded_input(shape)) for n, (m, shape) in modules.items()}, path,
                       int8_calibration=calib)


WORKER_FILES = 6
"""Files each lowering worker makes before its pool is replaced. A worker's memory grows with
every program it lowers and is not given back (measured 2026-12-06, paper-space files of
~47 blocks: 1.8 GB after the first file, +0.15-0.3 GB per file, 6.7 GB after ~20), so two
long-lived workers filled a 24 GB machine. A fresh pool costs a few seconds of imports and
the wait for its last file, against ~50-100 s per file."""


def _lower_pte_file(modules: Modules, path: str, int8: bool = False) -> float:
    """Worker process: build the modules and lower them into one .pte (returns CPU seconds)."""
    torch.set_num_threads(1)
    t = time.process_time()
    lower_modules({n: build_module(m, shape) for n, (m, shape) in modules.items()}, path, int8)
    return time.process_time() - t


class ExecuTorchDevice(ConvertingDevice):
    """ExecuTorch with the XNNPACK delegate, in process (the runtime a phone's executor_runner links)."""

    suffix = ".pte"
    runtime_packages = ("executorch",)

    def _prepare_batch(self, items: Sequence[Item]) -> None:
        # ExecuTorch's XNNPACK thread pool is process-wide and must be sized before any
        # method is loaded: resizing it under loaded methods crashes the process
        set_threads(self.params.threads)
        super()._prepare_batch(items)

    def check_available(self) -> None:
        try:
            from executorch.runtime import Runtime

            ok = Runtime.get().backend_registry.is_available("XnnpackBackend")
        except ImportError as exc:
            raise DeviceError(f"device '{self.name}' (kind executorch) needs the executorch package "
                              f"(requirements.lock): {exc}") from None
        if not ok:
            raise DeviceError(f"device '{self.name}': this executorch build has no XnnpackBackend")

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        set_threads(self.params.threads)
        with torch.inference_mode():
            yield

    def _convert(self, modules: dict[str, tuple[nn.Module, tuple[int, ...]]], path: Path) -> None:
        lower_modules(modules, path, self.int8)

    def _convert_parallel(self, files: Sequence[ConvertedFile], workers: int, t0: float) -> None:
        # spawned, not forked: this process has torch's and the ExecuTorch runtime's threads.
        # A fresh pool every `workers * WORKER_FILES` files (lowering's memory is not given
        # back); not `max_tasks_per_child`, which deadlocks on Python 3.11-3.13 once a worker
        # retires with tasks still queued (cpython gh-115634)
        chunk = workers * WORKER_FILES
        done = 0
        for start in range(0, len(files), chunk):
            part = files[start:start + chunk]
            with cf.ProcessPoolExecutor(min(workers, len(part)), mp_context=multiprocessing.get_context("spawn")) as pool:
                try:
                    done = self._wait({pool.submit(_lower_pte_file, f.modules, str(f.path), self.int8): f
                                       for f in part}, len(files), t0, done)
                except BaseException:
                    for proc in list(getattr(pool, "_processes", {}).values()):  # do not wait for running lowerings
                        proc.terminate()
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise

    def _open(self, path: Path) -> Any:
        return load_program(path)

    def _load(self, program: Any, name: str, item: Item) -> Prepared:
        method = program.load_method(name)
        execute = method.execute

        def step(v: torch.Tensor) -> torch.Tensor:
            return execute((v,))[0]

        step.keep = (program, method)  # type: ignore[attr-defined]  # the method runs in the program's memory

        return Prepared(step, seeded_input(item.input_shape))
