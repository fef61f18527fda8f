"""Latency devices `litert` and `executorch`: the phone runtimes, timed in this process.

Both run the XNNPACK CPU kernels a phone runs (LiteRT's default delegate; ExecuTorch's
XNNPACK backend), here, on `threads` threads, with the shared timing discipline of
`evit.latency.devices.Device` (warm-up, inner repeats, interleaved rounds, in-context
chains, the thread clock for single-threaded runs).

What is expensive is making the files: a whole subnet takes 15-85 s to convert (LiteRT)
or 25-120 s to lower (ExecuTorch) here, and the cost grows with the graph's size. So:
- a block repeated inside a subnet is converted once: its positions share one signature
  (LiteRT) or method (ExecuTorch), and each position loads its own instance of it (a
  program or interpreter of its own), so each still runs with its own weights and
  buffers, as in the deployed subnet;
- `prepare_ahead` converts everything a table build will time before timing starts, in
  `convert_jobs` parallel workers (spawned processes lowering ExecuTorch programs; LiteRT
  converter processes), so the conversions no longer sit between measurements and use
  every core;
- modules are converted together, one signature / method each, at most `BATCH` per file;
- LiteRT conversions go through long-lived converter processes
  (evit.formats.tflite.LiteRTConverter), paying the converter's start-up once per worker;
- files are cached by content hash under `EVIT_MODEL_CACHE` (default
  `.evit-cache/latency-models/`): the runtime's version, the evit static-module source,
  and every module's key and input shape; a resumed or repeated table build reuses them.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evit import cancel
from evit.errors import DeviceError
from evit.latency.devices import Device, Item, Measurement, Prepared, random_input

log = logging.getLogger(__name__)

BATCH = 48
"""Modules per converted file (one signature / method each)."""


def cache_dir() -> Path:
    return Path(os.environ.get("EVIT_MODEL_CACHE") or Path(".evit-cache") / "latency-models")


def _code_digest() -> str:
    """The module definitions a converted file was made from (a change invalidates the cache)."""
    import evit.nn.common
    import evit.nn.static

    h = hashlib.sha256()
    for mod in (evit.nn.static, evit.nn.common):
        h.update(Path(str(mod.__file__)).read_bytes())
    return h.hexdigest()[:16]


def _pkg_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"


Modules = dict[str, tuple[nn.Module | Callable[[], nn.Module], tuple[int, ...]]]
"""What one file holds: signature / method name -> (module or its factory, input shape)."""


@dataclass(frozen=True)
class _File:
    """One converted file: where it is cached and which module (content key) is which name."""

    path: Path
    names: dict[str, str]
    """content key -> signature / method name."""
    modules: Modules


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def convert_workers(requested: int | None, files: int) -> int:
    """Parallel conversions: `convert_jobs`, else one per usable CPU; never more than files."""
    return max(1, min(requested or usable_cpus(), files))


class _MobileDevice(Device):
    """Shared batching, caching and parallel conversion; subclasses convert files and load entries."""

    per_call_overhead = True
    suffix = ""
    runtime_packages: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._code = _code_digest()
        self.convert_seconds = 0.0
        """Wall seconds spent converting (parallel conversions count once)."""
        self.files_made = 0
        self.files_reused = 0
        self._index: dict[str, tuple[Path, str]] = {}
        """content key -> (file, signature / method name) `prepare_ahead` put it in."""
        self._instances: dict[tuple[Path, str], int] = {}
        """(file, name) -> instances loaded so far (each position of a block gets its own)."""
        self.isolate_conversions = False
        """Convert in worker processes even one file at a time (keeps this process's GIL free:
        the pipeline converts beside training, in the same process)."""

    def close(self) -> None:
        super().close()
        self._instances.clear()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({p: _pkg_version(p) for p in self.runtime_packages})
        d["delegate"] = "xnnpack"
        return d

    # --- batching ----------------------------------------------------------------------
    def measure_many(self, items: Sequence[Item], **kw: Any) -> list[Measurement]:
        self._prepare_batch(items)
        return super().measure_many(items, **kw)

    def measure_chains(self, chains: Sequence[Sequence[Item]], **kw: Any) -> list[list[Measurement]]:
        self._prepare_batch([it for ch in chains for it in ch])
        return super().measure_chains(chains, **kw)

    def prepare(self, item: Item) -> Prepared:
        if item.key is None or item.key not in self._prepared:
            self._prepare_batch([item])
        return super().prepare(item)

    def _content_key(self, item: Item) -> str:
        """What a file must hold for `item`: its block (`file_key`: every position of a block in
        a subnet shares one converted signature / method) and input shape."""
        return f"{item.file_key or item.key}|{'x'.join(map(str, item.input_shape))}"

    def _plan_files(self, items: Sequence[Item]) -> list[_File]:
        """Files for `items` (one module per content key), split evenly into files of at most BATCH."""
        modules: dict[str, tuple[Any, tuple[int, ...]]] = {}
        for it in items:
            if it.key is None:
                it.key = f"anon|{id(it)}"
            modules.setdefault(self._content_key(it), (it.module, it.input_shape))
        keys = list(modules)
        n_files = math.ceil(len(keys) / BATCH)
        files = []
        for i in range(n_files):
            group = keys[i * len(keys) // n_files:(i + 1) * len(keys) // n_files]
            contents = sorted(group)
            digest = hashlib.sha256(json.dumps({"kind": self.params.kind, "code": self._code, "contents": contents,
                                                "runtime": [_pkg_version(p) for p in self.runtime_packages]})
                                    .encode()).hexdigest()[:24]
            names = {c: f"m{j}" for j, c in enumerate(contents)}
            files.append(_File(cache_dir() / f"{digest}{self.suffix}", names,
                               {names[c]: modules[c] for c in contents}))
        return files

    def prepare_ahead(self, groups: Sequence[Sequence[Item]]) -> None:
        """Convert every file the timing of `groups` will need, before any timing, in parallel.

        Each group is planned into files on its own (a group's modules share files), so
        the same groups give the same files and a resumed build finds them in the cache.
        Modules already converted, cached or indexed are skipped.
        """
        files: list[_File] = []
        planned: set[str] = set(self._index)
        for group in groups:
            todo = [it for it in group if (it.key is None or it.key not in self._prepared)
                    and self._content_key(it) not in planned]
            planned.update(self._content_key(it) for it in todo)
            if todo:
                files.extend(self._plan_files(todo))
        missing = [f for f in files if not f.path.is_file()]
        self.files_reused += len(files) - len(missing)
        if missing:
            self._convert_files(missing)
        for f in files:
            for c, name in f.names.items():
                self._index[c] = (f.path, name)

    def _convert_files(self, files: Sequence[_File]) -> None:
        """Convert `files` (all missing from the cache): in this process, or in parallel workers."""
        workers = convert_workers(self.params.convert_jobs, len(files))
        n_modules = sum(len(f.names) for f in files)
        log.info("%s: converting %d module(s) into %d %s file(s), %d at a time", self.name, n_modules, len(files),
                 self.suffix, workers)
        for f in files:
            f.path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        if workers == 1 and not self.isolate_conversions:
            for i, f in enumerate(files, 1):
                cancel.check(f"{self.name}: converting files, the ones done are cached")
                self._convert({n: _built(m, shape) for n, (m, shape) in f.modules.items()}, f.path)
                log.info("%s: converted %d/%d file(s) (%d modules), %.0f s", self.name, i, len(files),
                         len(f.names), time.monotonic() - t0)
        else:
            self._convert_parallel(files, workers, t0)
        self.convert_seconds += time.monotonic() - t0
        self.files_made += len(files)

    def _convert_parallel(self, files: Sequence[_File], workers: int, t0: float) -> None:
        raise NotImplementedError

    def _wait(self, futures: dict[cf.Future[Any], _File], total: int, t0: float) -> None:
        """Wait for every conversion, logging each; stop on a cancel request or the first failure."""
        pending = set(futures)
        done_n = 0
        while pending:
            cancel.check(f"{self.name}: converting files, the ones done are cached")
            done, pending = cf.wait(pending, timeout=1.0, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                fut.result()  # re-raises the worker's error
                done_n += 1
                log.info("%s: converted %d/%d file(s) (%d modules), %.0f s", self.name, done_n, total,
                         len(futures[fut].names), time.monotonic() - t0)

    def _prepare_batch(self, items: Sequence[Item]) -> None:
        """Load every not-yet-prepared item, converting (BATCH per file) what no file holds yet."""
        todo = [it for it in items if it.key is None or it.key not in self._prepared]
        fresh = [it for it in todo if self._content_key(it) not in self._index]
        if fresh:
            self.prepare_ahead([fresh])
        for it in todo:
            if it.key in self._prepared:  # the same key twice in `items`
                continue
            path, name = self._index[self._content_key(it)]
            instance = self._instances.get((path, name), 0)
            self._instances[(path, name)] = instance + 1
            self._prepared[it.key] = self._load(path, name, it, instance)  # type: ignore[index]
            self._prepared_bytes[it.key] = 0  # type: ignore[index]

    def _prepare(self, module: nn.Module, item: Item, workdir: Path) -> Prepared:  # pragma: no cover
        raise AssertionError("mobile devices prepare in batches (_prepare_batch)")

    def _convert(self, modules: dict[str, tuple[nn.Module, tuple[int, ...]]], path: Path) -> None:
        raise NotImplementedError

    def _load(self, path: Path, name: str, item: Item, instance: int) -> Prepared:
        """Entry `name` of the file, from its `instance`-th loaded copy (own weights and buffers)."""
        raise NotImplementedError


def _built(module: nn.Module | Callable[[], nn.Module], shape: tuple[int, ...]) -> tuple[nn.Module, tuple[int, ...]]:
    m = module if isinstance(module, nn.Module) else module()
    return m.eval(), shape


def _lower_pte_file(modules: Modules, path: str) -> float:
    """Worker process: build the modules and lower them into one .pte (returns CPU seconds)."""
    from evit.formats.pte import export_pte_methods

    torch.set_num_threads(1)
    t = time.process_time()
    built = {n: _built(m, shape) for n, (m, shape) in modules.items()}
    export_pte_methods({n: (m, random_input(shape)) for n, (m, shape) in built.items()}, path)
    return time.process_time() - t


class ExecuTorchDevice(_MobileDevice):
    """ExecuTorch with the XNNPACK delegate, in process (the runtime a phone's executor_runner links)."""

    suffix = ".pte"
    runtime_packages = ("executorch",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._programs: dict[tuple[Path, int], Any] = {}

    def _prepare_batch(self, items: Sequence[Item]) -> None:
        # ExecuTorch's XNNPACK thread pool is process-wide and must be sized before any
        # method is loaded: resizing it under loaded methods crashes the process
        from evit.formats.pte import set_threads

        set_threads(self.params.threads)
        super()._prepare_batch(items)

    def close(self) -> None:
        super().close()
        self._programs.clear()

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
        from evit.formats.pte import set_threads

        set_threads(self.params.threads)
        with torch.inference_mode():
            yield

    def _convert(self, modules: dict[str, tuple[nn.Module, tuple[int, ...]]], path: Path) -> None:
        from evit.formats.pte import export_pte_methods

        export_pte_methods({n: (m, random_input(shape)) for n, (m, shape) in modules.items()}, path)

    def _convert_parallel(self, files: Sequence[_File], workers: int, t0: float) -> None:
        # spawned, not forked: this process has torch's and the ExecuTorch runtime's threads
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                self._wait({pool.submit(_lower_pte_file, f.modules, str(f.path)): f for f in files}, len(files), t0)
            except BaseException:
                for proc in list(getattr(pool, "_processes", {}).values()):  # do not wait for running lowerings
                    proc.terminate()
                pool.shutdown(wait=False, cancel_futures=True)
                raise

    def _load(self, path: Path, name: str, item: Item, instance: int) -> Prepared:
        from evit.formats.pte import load_program

        program = self._programs.get((path, instance))
        if program is None:
            program = self._programs[(path, instance)] = load_program(path)
        method = program.load_method(name)
        execute = method.execute

        def step(v: torch.Tensor) -> torch.Tensor:
            return execute((v,))[0]

        step.keep = (program, method)  # type: ignore[attr-defined]  # the method runs in the program's memory

        return Prepared(step, random_input(item.input_shape))


class LiteRTDevice(_MobileDevice):
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
        from evit.formats.litert_env import lock_file

        if not lock_file().is_file():
            raise DeviceError(f"device '{self.name}': the LiteRT converter lock {lock_file()} is missing")

    def close(self) -> None:
        if self._converter is not None:
            self._converter.close()
            self._converter = None
        self._interpreters.clear()
        super().close()

    def _convert(self, modules: dict[str, tuple[nn.Module, tuple[int, ...]]], path: Path) -> None:
        from evit.formats.tflite import LiteRTConverter

        if self._converter is None:
            self._converter = LiteRTConverter()
        convert_tflite(self._converter, modules, path)

    def _convert_parallel(self, files: Sequence[_File], workers: int, t0: float) -> None:
        """One converter process per worker thread; torch.export runs here, one file at a time."""
        import queue
        import tempfile

        from evit.formats.tflite import LiteRTConverter

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
                    programs = export_pt2({n: _built(m, shape) for n, (m, shape) in f.modules.items()},
                                          Path(tmp) / f"f{i}")
                    futures[pool.submit(convert, programs, f.path)] = f
                self._wait(futures, len(files), t0)
            finally:
                for c in extra:  # stops their processes; a running conversion ends with an error
                    c.close()
                pool.shutdown(wait=True, cancel_futures=True)

    def _load(self, path: Path, name: str, item: Item, instance: int) -> Prepared:
        from evit.formats.tflite import interpreter

        interp = self._interpreters.get((path, instance))
        if interp is None:
            interp = self._interpreters[(path, instance)] = interpreter(path, self.params.threads)
        runner = interp.get_signature_runner(name)
        sig = interp.get_signature_list()[name]
        in_name, out_name = sig["inputs"][0], sig["outputs"][0]

        def step(v: np.ndarray) -> np.ndarray:
            return runner(**{in_name: v})[out_name]

        return Prepared(step, random_input(item.input_shape).numpy())


def export_pt2(modules: dict[str, tuple[nn.Module, tuple[int, ...]]],
               folder: Path) -> list[tuple[str, Path, list[tuple[int, ...]]]]:
    """Modules -> `torch.export` programs saved as .pt2 in `folder` (what the LiteRT converter reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    programs = []
    with torch.no_grad():
        for name, (m, shape) in modules.items():
            ep = torch.export.export(m.eval(), (random_input(shape),))
            pt2 = folder / f"{name}.pt2"
            torch.export.save(ep, str(pt2))
            programs.append((name, pt2, [shape]))
    return programs


def convert_tflite(converter: Any, modules: dict[str, tuple[nn.Module, tuple[int, ...]]], path: Path) -> None:
    """Modules (name -> (module, input shape)) -> one .tflite with a signature each, via .pt2 files."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="evit-pt2-") as tmp:
        converter.convert_programs(export_pt2(modules, Path(tmp)), path)


def model_file(fmt: str, module: nn.Module, input_shape: Sequence[int], workdir: Path, converter: Any = None) -> Path:
    """`module` as a .tflite or .pte file for an external runner (the `command` kind's `format`).

    `converter`: a running LiteRTConverter (tflite); the caller keeps and closes it.
    """
    if fmt == "pte":
        from evit.formats.pte import export_pte

        path = workdir / "model.pte"
        export_pte(module.eval(), random_input(input_shape), path)
        return path
    if fmt == "tflite":
        path = workdir / "model.tflite"
        convert_tflite(converter, {"serving_default": (module, tuple(input_shape))}, path)
        return path
    raise ValueError(f"unknown model format {fmt!r}")


def clear_cache() -> None:
    """Remove every cached converted file (`evit` never needs this; for disk space)."""
    shutil.rmtree(cache_dir(), ignore_errors=True)


MOBILE_KINDS: dict[str, type[Device]] = {"litert": LiteRTDevice, "executorch": ExecuTorchDevice}
