"""The kinds whose timing first converts modules into a runtime's files (litert, executorch).

Both run the XNNPACK CPU kernels a phone runs (LiteRT's default delegate; ExecuTorch's
XNNPACK backend), here, on `threads` threads, with the shared timing discipline of
`evit.latency.devices.base.Device` (warm-up, inner repeats, interleaved rounds, in-context
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
- modules are converted together, one signature / method each, about `BATCH` blocks per
  file (a whole subnet counts its blocks: lowering's memory grows with the graph);
- LiteRT conversions go through long-lived converter processes
  (evit.formats.tflite.LiteRTConverter), paying the converter's start-up once per worker;
- files are cached by content hash under `EVIT_MODEL_CACHE` (default
  `.evit-cache/latency-models/`): the runtime's version, the evit static-module source,
  and every module's key and input shape; a resumed or repeated table build reuses them.
  Each file has a manifest beside it (`<file>.json`: namespace + which module is which
  name), so a build that groups modules differently (another device's plan) still finds
  every module already converted, and `share` (`evit.latency.devices.shared`) shares the
  cache through the DVC remote or an S3 bucket: a second device or machine fetches the
  files and converts nothing.
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import functools
import hashlib
import importlib
import itertools
import json
import logging
import math
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from evit import cancel
from evit.errors import DeviceError
from evit.host import available_memory, package_version, usable_cpus
from evit.io import write_json_atomic
from evit.latency.devices.base import Device, Item, Prepared, module_to_time
from evit.latency.measurement import Measurement

log = logging.getLogger(__name__)

BATCH = 48
"""Modules per converted file (one signature / method each)."""

DISK_RESERVE = 1 << 30
"""Bytes a table build leaves free on the model cache's disk: the paper space's tables and
held-out subnets took ~30 GB of files for ExecuTorch and LiteRT together, and a disk filled to
the last byte breaks everything else on it (the tracking database, a test run beside it), not
just this build."""


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


Modules = dict[str, tuple[nn.Module | Callable[[], nn.Module], tuple[int, ...]]]
"""What one file holds: signature / method name -> (module or its factory, input shape)."""


INT8_CALIBRATION = 4
"""Seeded random calibration inputs per module of an int8 table (int8 kernel time depends on
shapes and the float policy, not on the scales the calibration picks)."""


@dataclass
class LoadedCopy:
    """One loaded copy of a converted file (a program / interpreter with its own weights)."""

    handle: Any
    nbytes: int
    """The file's size: what `loaded_share` counts."""
    keys: set[str]
    """The items prepared from it (dropped with it)."""


@dataclass(frozen=True)
class ConvertedFile:
    """One converted file: where it is cached and which module (content key) is which name."""

    path: Path
    names: dict[str, str]
    """content key -> signature / method name."""
    modules: Modules


def convert_workers(requested: int | None, files: int) -> int:
    """Parallel conversions: `convert_jobs`, else one per usable CPU; never more than files."""
    return max(1, min(requested or usable_cpus(), files))


class ConvertingDevice(Device):
    """Shared batching, caching and parallel conversion; subclasses convert files and load entries."""

    per_call_overhead = True
    suffix = ""
    runtime_packages: tuple[str, ...] = ()
    quantize_modules: tuple[str, ...] = ("evit.formats.quantize",)
    """The code an int8 file of this runtime depends on (its cache key, `_file_variant`)."""
    loaded_share: float | None = None
    """Where loading one copy of a file costs memory for every entry in it (LiteRT: the
    interpreter packs all signatures' weights), the loaded copies hold at most this share of
    the memory available when timing starts, in file bytes; the least recently used copy not
    needed by the current batch is dropped (and loaded again when needed: ~0.05 s). None: no
    bound (ExecuTorch loads only the methods it runs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._code = _code_digest()
        self.convert_seconds = 0.0
        """Wall seconds spent converting (parallel conversions count once)."""
        self.files_made = 0
        """Files this device converted, counted as each is made (a stopped build counts its own)."""
        self.bytes_made = 0
        """Their bytes (what `_check_disk` projects the files still to make from)."""
        self.files_reused = 0
        self._index: dict[str, tuple[Path, str]] = {}
        """content key -> (file, signature / method name) `prepare_ahead` put it in."""
        self._instances: dict[tuple[Path, str], int] = {}
        """(file, name) -> instances loaded so far (each position of a block gets its own)."""
        self._copy_of: dict[str, tuple[Path, int]] = {}
        """item key -> (file, instance) it runs in: kept when that copy is dropped, so the
        item comes back in the same copy (its own weights, not another position's)."""
        self._loaded: OrderedDict[tuple[Path, int], LoadedCopy] = OrderedDict()
        """(file, instance) -> its loaded copy, least recently used first."""
        self._loaded_bytes = 0
        self._loaded_cap: int | None = None
        self._isolate = False
        """Convert in worker processes even one file at a time (`isolate_conversions`)."""
        self.files_fetched = 0
        """Of `files_reused`, the files fetched from the shared store."""
        self._store: Any = None
        self._store_names: set[str] | None = None
        self._modules: dict[str, tuple[Path, str]] | None = None
        """content key -> (file, name) of every manifest in the local cache (and the store)."""

    def share(self, store: Any) -> None:
        self._store = store
        self._store_names = None
        self._modules = None

    def close(self) -> None:
        super().close()
        self._instances.clear()
        self._copy_of.clear()
        self._loaded.clear()
        self._loaded_bytes = 0
        self._loaded_cap = None

    def conversion_stats(self) -> dict[str, Any]:
        return {"files_made": self.files_made, "bytes_made": self.bytes_made, "files_reused": self.files_reused,
                "files_fetched": self.files_fetched, "seconds": round(self.convert_seconds, 1),
                **({"shared": self._store.location} if self._store is not None else {})}

    def isolate_conversions(self) -> None:
        # keeps this process's GIL free: the pipeline converts beside training, in the same process
        self._isolate = True

    @property
    def int8(self) -> bool:
        return self.params.precision == "int8"

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({p: package_version(p) for p in self.runtime_packages})
        d["delegate"] = "xnnpack"
        d["precision"] = self.params.precision
        if self.int8:
            d["int8_calibration"] = (f"{INT8_CALIBRATION} seeded standard-normal inputs per module (int8 kernel time "
                                     "depends on shapes and the float policy, not on the scales)")
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

    def _plan_files(self, items: Sequence[Item]) -> list[ConvertedFile]:
        """Files for `items` (one module per content key), split evenly by blocks into files of
        about BATCH blocks (a whole subnet counts all of its blocks, `Item.blocks`)."""
        modules: dict[str, tuple[Any, tuple[int, ...]]] = {}
        weight: dict[str, int] = {}
        for it in items:
            if it.key is None:
                it.key = f"anon|{id(it)}"
            c = self._content_key(it)
            modules.setdefault(c, (it.module, it.input_shape))
            weight.setdefault(c, max(1, it.blocks))
        keys = list(modules)
        cumulative = list(itertools.accumulate((weight[k] for k in keys), initial=0))
        total = cumulative[-1]
        n_files = min(len(keys), math.ceil(total / BATCH))
        # file i starts at the first key with i/n_files of the blocks before it (unit blocks:
        # keys[i*len//n:(i+1)*len//n], the split the cached files' names were made with)
        starts = [bisect.bisect_left(cumulative, i * total // n_files) for i in range(n_files)] + [len(keys)]
        ns = self._namespace
        files = []
        for i in range(n_files):
            group = keys[starts[i]:starts[i + 1]]
            if not group:
                continue
            contents = sorted(group)
            # the namespace with the contents after "code" (the order the cached files' names were made with)
            key = {"kind": ns["kind"], "code": ns["code"], "contents": contents,
                   **{k: v for k, v in ns.items() if k not in ("kind", "code")}}
            digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
            names = {c: f"m{j}" for j, c in enumerate(contents)}
            files.append(ConvertedFile(cache_dir() / f"{digest}{self.suffix}", names,
                               {names[c]: modules[c] for c in contents}))
        return files

    @functools.cached_property
    def _namespace(self) -> dict[str, Any]:
        """What a converted file depends on besides its modules (its manifest's namespace);
        fixed for the device's life, so the package versions and the int8 code hash are
        read once, not per file."""
        return {"kind": self.params.kind, "code": self._code,
                "runtime": [package_version(p) for p in self.runtime_packages], **self._file_variant()}

    def _remote_names(self) -> set[str]:
        if self._store_names is None:
            self._store_names = self._store.names() if self._store is not None else set()
        return self._store_names

    def _module_index(self) -> dict[str, tuple[Path, str]]:
        """Every module some manifest of this namespace holds: local ones, and the store's
        (their manifests fetched, small; the files themselves only when needed)."""
        if self._modules is not None:
            return self._modules
        root = cache_dir()
        if self._store is not None:
            root.mkdir(parents=True, exist_ok=True)
            local = {p.name for p in root.glob("*.json")} if root.is_dir() else set()
            for name in sorted(self._remote_names()):
                if name.endswith(f"{self.suffix}.json") and name not in local:
                    self._store.get(name, root / name)
        ns = self._namespace
        index: dict[str, tuple[Path, str]] = {}
        for manifest in sorted(root.glob(f"*{self.suffix}.json")) if root.is_dir() else []:
            try:
                data = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            if data.get("namespace") != ns:
                continue
            path = manifest.with_suffix("")
            for content, name in data.get("names", {}).items():
                index.setdefault(content, (path, name))
        self._modules = index
        return index

    def _have(self, path: Path) -> bool:
        """The file is in the local cache, or fetched now from the shared store."""
        if path.is_file():
            return True
        if self._store is not None and path.name in self._remote_names():
            path.parent.mkdir(parents=True, exist_ok=True)
            if self._store.get(path.name, path):
                self.files_fetched += 1
                return True
        return False

    def _publish(self, f: ConvertedFile, *, made: bool) -> None:
        """Write the file's manifest (if missing) and put both in the shared store (if not there).

        Called as each file is made, not after the last: a build stopped half-way (killed,
        cancelled, out of memory) leaves manifests for what it converted, so a resumed
        build whose plan groups the modules differently still finds them."""
        manifest = f.path.with_name(f"{f.path.name}.json")
        if made:
            self.bytes_made += f.path.stat().st_size
            self.files_made += 1
        if not manifest.is_file():
            write_json_atomic(manifest, {"namespace": self._namespace, "names": f.names})
        if self._modules is not None:
            for c, name in f.names.items():
                self._modules.setdefault(c, (f.path, name))
        if self._store is not None:
            remote = self._remote_names()
            for p in (f.path, manifest):  # the file first: a manifest never names a file the store lacks
                if made or p.name not in remote:
                    self._store.put(p)
                    remote.add(p.name)

    def prepare_ahead(self, groups: Sequence[Sequence[Item]]) -> None:
        """Convert every file the timing of `groups` will need, before any timing, in parallel.

        Each group is planned into files on its own (a group's modules share files), so
        the same groups give the same files and a resumed build finds them in the cache.
        Modules already converted, cached or indexed are skipped.
        """
        files: list[ConvertedFile] = []
        planned: set[str] = set(self._index)
        known = self._module_index()
        found: dict[Path, dict[str, str]] = {}
        for group in groups:
            todo = [it for it in group if (it.key is None or it.key not in self._prepared)
                    and self._content_key(it) not in planned]
            planned.update(self._content_key(it) for it in todo)
            fresh = []
            for it in todo:  # converted before, in a file another plan grouped differently
                hit = known.get(self._content_key(it))
                if hit is not None and hit[0] not in {f.path for f in files} and self._have(hit[0]):
                    found.setdefault(hit[0], {})[self._content_key(it)] = hit[1]
                else:
                    fresh.append(it)
            if fresh:
                files.extend(self._plan_files(fresh))
        missing = [f for f in files if not self._have(f.path)]
        self.files_reused += len(files) - len(missing) + len(found)
        if missing:
            self._convert_files(missing)  # publishes each file as soon as it is made
        made = {f.path for f in missing}
        for f in files:
            if f.path not in made:
                self._publish(f, made=False)
            for c, name in f.names.items():
                self._index[c] = (f.path, name)
        for path, names in found.items():
            for c, name in names.items():
                self._index[c] = (path, name)

    def _convert_files(self, files: Sequence[ConvertedFile]) -> None:
        """Convert `files` (all missing from the cache): in this process, or in parallel workers."""
        workers = convert_workers(self.params.convert_jobs, len(files))
        n_modules = sum(len(f.names) for f in files)
        log.info("%s: converting %d module(s) into %d %s file(s), %d at a time", self.name, n_modules, len(files),
                 self.suffix, workers)
        for f in files:
            f.path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        self._check_disk(len(files))
        if workers == 1 and not self._isolate:
            for i, f in enumerate(files, 1):
                cancel.check(f"{self.name}: converting files, the ones done are cached")
                self._convert({n: build_module(m, shape) for n, (m, shape) in f.modules.items()}, f.path)
                self._publish(f, made=True)
                self._check_disk(len(files) - i)
                log.info("%s: converted %d/%d file(s) (%d modules), %.0f s", self.name, i, len(files),
                         len(f.names), time.monotonic() - t0)
        else:
            self._convert_parallel(files, workers, t0)
        self.convert_seconds += time.monotonic() - t0

    def _check_disk(self, left: int) -> None:
        """Stop converting, with what to do, once the files still to make would not fit.

        Projected from the mean size of the files this build made so far (a file's size
        follows its blocks' weights, which the plan does not know before building them), so
        it is checked after every file: the build stops early instead of at the disk's last
        byte, and every file made is cached, so a re-run resumes from them."""
        if left <= 0:
            return
        per_file = self.bytes_made / max(1, self.files_made)
        need = per_file * left + DISK_RESERVE
        free = shutil.disk_usage(cache_dir()).free
        if free < need:
            raise DeviceError(
                f"{self.name}: {left} more {self.suffix} file(s) to convert need about {need / 1e9:.1f} GB on the "
                f"disk of the model cache {cache_dir()} ({per_file / 1e6:.0f} MB per file so far, plus "
                f"{DISK_RESERVE / 1e9:.1f} GB kept free) and {free / 1e9:.1f} GB is free. The {self.files_made} "
                "file(s) made are cached and a re-run goes on from them: free space there, or set "
                "EVIT_MODEL_CACHE to a directory on a larger disk (lut.share keeps a copy in the DVC remote / S3).")

    def _convert_parallel(self, files: Sequence[ConvertedFile], workers: int, t0: float) -> None:
        raise NotImplementedError

    def _file_variant(self) -> dict[str, Any]:
        """What else a converted file depends on (an int8 program: the precision and the code
        that quantizes, `quantize_modules`); empty for fp32, so fp32 files cached before
        precisions existed are still found."""
        if not self.int8:
            return {}
        code = b"".join(Path(str(importlib.import_module(m).__file__)).read_bytes() for m in self.quantize_modules)
        return {"precision": "int8", "quantize": hashlib.sha256(code).hexdigest()[:16]}

    def _wait(self, futures: dict[cf.Future[Any], ConvertedFile], total: int, t0: float, done_n: int = 0,
              keep: int = 0) -> int:
        """Wait until at most `keep` conversions are still running (0: all done), logging each
        (`done_n` of `total` done before these) and taking the finished ones out of `futures`;
        stop on a cancel request or the first failure. Returns the files done."""
        while len(futures) > keep:
            cancel.check(f"{self.name}: converting files, the ones done are cached")
            done, _ = cf.wait(set(futures), timeout=1.0, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                fut.result()  # re-raises the worker's error
                f = futures.pop(fut)
                self._publish(f, made=True)
                done_n += 1
                log.info("%s: converted %d/%d file(s) (%d modules), %.0f s", self.name, done_n, total,
                         len(f.names), time.monotonic() - t0)
                self._check_disk(total - done_n)
        return done_n

    def _prepare_batch(self, items: Sequence[Item]) -> None:
        """Load every not-yet-prepared item, converting (about BATCH blocks per file) what no file holds yet."""
        with self.preparing():
            self._load_batch(items)

    def _load_batch(self, items: Sequence[Item]) -> None:
        todo = [it for it in items if it.key is None or it.key not in self._prepared]
        fresh = [it for it in todo if self._content_key(it) not in self._index]
        if fresh:
            self.prepare_ahead([fresh])
        batch: set[tuple[Path, int]] = set()
        for it in items:
            path, name = self._index[self._content_key(it)]
            copy = self._copy_of.get(it.key)  # type: ignore[arg-type]
            if copy is None:
                instance = self._instances.get((path, name), 0)
                self._instances[(path, name)] = instance + 1
                copy = self._copy_of[it.key] = (path, instance)  # type: ignore[index]
            loaded = self._loaded.get(copy)
            if loaded is None:
                loaded = self._loaded[copy] = LoadedCopy(self._open(path), path.stat().st_size, set())
                self._loaded_bytes += loaded.nbytes
            self._loaded.move_to_end(copy)
            batch.add(copy)
            if it.key not in self._prepared:  # the same key twice in `items` is loaded once
                self._prepared[it.key] = self._load(loaded.handle, name, it)  # type: ignore[index]
                self._prepared_bytes[it.key] = 0  # type: ignore[index]
                loaded.keys.add(it.key)  # type: ignore[arg-type]
        self._drop_copies(keep=batch)

    def _drop_copies(self, keep: set[tuple[Path, int]]) -> None:
        """Drop least recently used loaded copies (not in `keep`) while they exceed `loaded_share`;
        what still runs from a dropped copy keeps it alive until done."""
        if self.loaded_share is None:
            return
        if self._loaded_cap is None:
            self._loaded_cap = int(self.loaded_share * available_memory())
        for copy in [c for c in self._loaded if c not in keep]:
            if self._loaded_bytes <= self._loaded_cap:
                break
            dropped = self._loaded.pop(copy)
            for key in dropped.keys:
                self._prepared.pop(key, None)
                self._prepared_bytes.pop(key, None)
            self._loaded_bytes -= dropped.nbytes

    def _prepare(self, module: nn.Module, item: Item, workdir: Path) -> Prepared:  # pragma: no cover
        raise AssertionError("mobile devices prepare in batches (_prepare_batch)")

    def _convert(self, modules: dict[str, tuple[nn.Module, tuple[int, ...]]], path: Path) -> None:
        raise NotImplementedError

    def _open(self, path: Path) -> Any:
        """Load one copy of a converted file (its own weights and buffers)."""
        raise NotImplementedError

    def _load(self, handle: Any, name: str, item: Item) -> Prepared:
        """Entry `name` of a loaded copy (`_open`)."""
        raise NotImplementedError


def build_module(module: nn.Module | Callable[[], nn.Module],
                 shape: tuple[int, ...]) -> tuple[nn.Module, tuple[int, ...]]:
    """The module to convert (`module_to_time`), with its input shape."""
    return module_to_time(module), shape


def clear_cache() -> None:
    """Remove every cached converted file (`evit` never needs this; for disk space)."""
    shutil.rmtree(cache_dir(), ignore_errors=True)
