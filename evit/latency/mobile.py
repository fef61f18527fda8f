"""Latency devices `litert` and `executorch`: the phone runtimes, timed in this process.

Both run the XNNPACK CPU kernels a phone runs (LiteRT's default delegate; ExecuTorch's
XNNPACK backend), here, on `threads` threads, with the shared timing discipline of
`evit.latency.devices.Device` (warm-up, inner repeats, interleaved rounds, in-context
chains, the thread clock for single-threaded runs).

What is expensive is making the files: a whole subnet takes 15-85 s to convert (LiteRT)
or 25-120 s to lower (ExecuTorch) here. So:
- a call's modules are converted together: every module not prepared yet becomes one
  signature (LiteRT) or method (ExecuTorch) of one file per batch of `BATCH` modules;
- LiteRT conversions go through one long-lived converter process per device object
  (evit.export.tflite.LiteRTConverter), paying the converter's start-up once;
- files are cached by content hash under `EVIT_MODEL_CACHE` (default
  `.evit-cache/latency-models/`): the runtime's version, the evit static-module source,
  and every module's key and input shape; a resumed or repeated table build reuses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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


class _MobileDevice(Device):
    """Shared batching and caching; subclasses convert a batch and prepare one entry of it."""

    per_call_overhead = True
    suffix = ""
    runtime_packages: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._code = _code_digest()
        self.convert_seconds = 0.0
        self.files_made = 0
        self.files_reused = 0

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
        """One signature/method per item key: the n-th repeat of a block in a subnet gets its own
        (own weights and buffers; a method fed its own output buffer would overwrite its input)."""
        return f"{item.key}|{'x'.join(map(str, item.input_shape))}"

    def _prepare_batch(self, items: Sequence[Item]) -> None:
        """Convert (or find in the cache) every not-yet-prepared item, BATCH per file."""
        todo: dict[str, Item] = {}
        for it in items:
            if it.key is None:
                it.key = f"anon|{id(it)}"
            if it.key not in self._prepared:
                todo.setdefault(it.key, it)
        pending = list(todo.values())
        for start in range(0, len(pending), BATCH):
            group = pending[start:start + BATCH]
            contents = sorted({self._content_key(it) for it in group})
            digest = hashlib.sha256(json.dumps({"kind": self.params.kind, "code": self._code, "contents": contents,
                                                "runtime": [_pkg_version(p) for p in self.runtime_packages]})
                                    .encode()).hexdigest()[:24]
            path = cache_dir() / f"{digest}{self.suffix}"
            names = {c: f"m{i}" for i, c in enumerate(contents)}
            if path.is_file():
                self.files_reused += 1
            else:
                modules: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}
                for it in group:
                    name = names[self._content_key(it)]
                    if name not in modules:
                        m = it.module if isinstance(it.module, nn.Module) else it.module()
                        modules[name] = (m.eval(), it.input_shape)
                path.parent.mkdir(parents=True, exist_ok=True)
                t0 = time.monotonic()
                self._convert(modules, path)
                self.convert_seconds += time.monotonic() - t0
                self.files_made += 1
            for it in group:
                prepared = self._load(path, names[self._content_key(it)], it)
                self._prepared[it.key] = prepared  # type: ignore[index]
                self._prepared_bytes[it.key] = 0  # type: ignore[index]

    def _prepare(self, module: nn.Module, item: Item, workdir: Path) -> Prepared:  # pragma: no cover
        raise AssertionError("mobile devices prepare in batches (_prepare_batch)")

    def _convert(self, modules: dict[str, tuple[nn.Module, tuple[int, ...]]], path: Path) -> None:
        raise NotImplementedError

    def _load(self, path: Path, name: str, item: Item) -> Prepared:
        raise NotImplementedError


class ExecuTorchDevice(_MobileDevice):
    """ExecuTorch with the XNNPACK delegate, in process (the runtime a phone's executor_runner links)."""

    suffix = ".pte"
    runtime_packages = ("executorch",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._programs: dict[Path, Any] = {}

    def _prepare_batch(self, items: Sequence[Item]) -> None:
        # ExecuTorch's XNNPACK thread pool is process-wide and must be sized before any
        # method is loaded: resizing it under loaded methods crashes the process
        from evit.export.pte import set_threads

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
        from evit.export.pte import set_threads

        set_threads(self.params.threads)
        with torch.inference_mode():
            yield

    def _convert(self, modules: dict[str, tuple[nn.Module, tuple[int, ...]]], path: Path) -> None:
        from evit.export.pte import export_pte_methods

        export_pte_methods({n: (m, random_input(shape)) for n, (m, shape) in modules.items()}, path)

    def _load(self, path: Path, name: str, item: Item) -> Prepared:
        from evit.export.pte import load_program

        program = self._programs.get(path)
        if program is None:
            program = self._programs[path] = load_program(path)
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
        self._interpreters: dict[Path, Any] = {}

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
        from evit.export.litert_env import lock_file

        if not lock_file().is_file():
            raise DeviceError(f"device '{self.name}': the LiteRT converter lock {lock_file()} is missing")

    def close(self) -> None:
        if self._converter is not None:
            self._converter.close()
            self._converter = None
        self._interpreters.clear()
        super().close()

    def _convert(self, modules: dict[str, tuple[nn.Module, tuple[int, ...]]], path: Path) -> None:
        from evit.export.tflite import LiteRTConverter

        if self._converter is None:
            self._converter = LiteRTConverter()
        convert_tflite(self._converter, modules, path)

    def _load(self, path: Path, name: str, item: Item) -> Prepared:
        from evit.export.tflite import interpreter

        interp = self._interpreters.get(path)
        if interp is None:
            interp = self._interpreters[path] = interpreter(path, self.params.threads)
        runner = interp.get_signature_runner(name)
        sig = interp.get_signature_list()[name]
        in_name, out_name = sig["inputs"][0], sig["outputs"][0]

        def step(v: np.ndarray) -> np.ndarray:
            return runner(**{in_name: v})[out_name]

        return Prepared(step, random_input(item.input_shape).numpy())


def convert_tflite(converter: Any, modules: dict[str, tuple[nn.Module, tuple[int, ...]]], path: Path) -> None:
    """Modules (name -> (module, input shape)) -> one .tflite with a signature each, via .pt2 files."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="evit-pt2-") as tmp, torch.no_grad():
        programs = []
        for name, (m, shape) in modules.items():
            ep = torch.export.export(m.eval(), (random_input(shape),))
            pt2 = Path(tmp) / f"{name}.pt2"
            torch.export.save(ep, str(pt2))
            programs.append((name, pt2, [shape]))
        converter.convert_programs(programs, path)


def model_file(fmt: str, module: nn.Module, input_shape: Sequence[int], workdir: Path, converter: Any = None) -> Path:
    """`module` as a .tflite or .pte file for an external runner (the `command` kind's `format`).

    `converter`: a running LiteRTConverter (tflite); the caller keeps and closes it.
    """
    if fmt == "pte":
        from evit.export.pte import export_pte

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
