"""What every latency device is: describe it, check it is there, time modules on it.

A device kind (one module each in this package) fills in hooks only; the base class owns
the timing discipline, so every kind measures the same way:
- `describe()`: what the numbers were measured on (kind, threads, clock, host, CPU/GPU
  model, library versions), stored in every LUT;
- `check_available()`: raises `DeviceError` up front (a cuda device without a GPU, a
  command whose program is missing or whose template has an unknown placeholder);
- `measure(module, input_shape)` / `measure_many(items)`: each module timed on its own;
- `measure_chains(chains)`: each module timed while it runs inside a sequence of others
  fed the previous output (how the LUT times blocks in the context of a real subnet).
Each returns `Measurement`s (median, p10, p90, mean, std, n and the raw samples).

Benchmark practice, shared by the in-process kinds:
- threads pinned for the measurement (torch.set_num_threads, restored afterwards;
  onnxruntime: intra-op threads = `threads`, inter-op 1, sequential execution);
- `warmup` untimed runs, then `repeats` timed samples; on its own, a sample runs the
  module back to back until it lasts at least `_MIN_SAMPLE_S` (so timer resolution and
  per-call jitter do not dominate blocks of a few microseconds) and records the mean;
- samples of the modules of one call are taken round robin over `rounds` passes
  (interleaving), so a burst of load from another process spreads over all of them;
- the clock: wall time, or for single-threaded CPU devices the calling thread's CPU
  time (`DeviceParams.clock`), which other processes taking the core cannot inflate;
  CUDA uses CUDA events, synchronised once per sample;
- inputs are seeded standard-normal tensors of the module's own shape (batch from params).

What a kind is (timed on this thread, converts files, runs elsewhere) is declared once in
`evit.config.devices.KINDS` and read here (`traits`, `in_process`, `converts_files`), not
guessed from which attributes an object happens to have.
"""

from __future__ import annotations

import abc
import contextlib
import math
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evit.config import DeviceParams, KindTraits
from evit.formats.inputs import seeded_input
from evit.formats.onnx import export_onnx_input
from evit.host import runtime_facts
from evit.latency.measurement import Measurement
from evit.nn.common import undo_zero_init

_MIN_SAMPLE_S = 0.0005
"""A timed sample repeats the module until it lasts at least this long (0.5 ms)."""
_MAX_INNER = 1000


@dataclass
class Item:
    """One thing to time: a module (or a factory of one) and its input shape.

    `onnx_path` reuses an already exported file (ONNX kinds); `key` lets a device prepare
    the module once and reuse it when it appears again (a LUT block in several chains).
    """

    module: nn.Module | Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    onnx_path: Path | None = None
    key: str | None = None
    file_key: str | None = None
    """Items with the same `file_key` (the same block at several positions of a subnet) may
    share one exported file; each still gets its own session and so its own weights."""
    blocks: int = 1
    """How many blocks' worth of graph the module is (a whole subnet: all of its blocks): a
    converting device puts about `converting.BATCH` blocks in one file, so a file's graph,
    and the time and memory its lowering takes, stays bounded (a group of eight paper-space
    subnets is ~4x a 48-block file)."""


def export_onnx_file(module: nn.Module, input_shape: Sequence[int], path: Path, opset: int = 17) -> Path:
    """Export `module` for `input_shape` with the pipeline's own exporter (`evit.formats.onnx`).

    So a block, or a whole static subnet, is timed from exactly the kind of file that
    `evit export` ships (same exporter, opset and options).
    """
    return export_onnx_input(module, seeded_input(input_shape), path, opset)


def module_to_time(module: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """The module a device times: built now when it is a factory, in eval mode, with no
    zero-initialised BN scale (`evit.nn.common.undo_zero_init`: a converter would fold the
    zeroed branch away and the table would time a network no trained subnet is)."""
    m = module if isinstance(module, nn.Module) else module()
    return undo_zero_init(m).eval()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Pin torch's intra-op threads to `n` for the block, then restore the previous value."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def split_repeats(repeats: int, rounds: int) -> list[int]:
    """Samples per round: `repeats` split as evenly as possible over `rounds` passes."""
    rounds = max(1, min(rounds, repeats))
    return [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]


@dataclass
class Prepared:
    """A module made ready on a device: `step(x)` runs one inference on a native input `x`."""

    step: Callable[[Any], Any]
    x: Any


class Device(abc.ABC):
    """A place subnets run: describe it, check it is there, time modules on it.

    Two ways to time: `measure_many` times each module on its own (what an end-to-end
    latency is), `measure_chains` times each module while it runs inside a sequence of
    others, feeding each the previous one's output (what a block costs *in context*: with
    the other blocks' weights and code competing for the caches, as inside a real subnet).
    """

    per_call_overhead: bool = False
    """True where each separately timed call pays a runtime cost (an onnxruntime
    `session.run`, a command's invocation) that a whole subnet pays only once."""
    _CACHE_SIZE = 1024
    _CACHE_BYTES = 1 << 30
    """Prepared modules kept for reuse: at most this many, holding at most this many weight bytes."""
    _FILE_BYTES = 2 << 30
    """Exported files kept for reuse (the paper space's 3718 blocks would take ~7 GB)."""

    def __init__(self, dp: DeviceParams, *, opset: int = 17) -> None:
        self.params = dp
        self.opset = opset
        self._prepared: OrderedDict[str, Prepared] = OrderedDict()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._counter = 0
        self._files: OrderedDict[str, tuple[Path, int]] = OrderedDict()
        self._prepared_bytes: dict[str, int] = {}
        self.prepare_seconds = 0.0
        """Seconds spent making modules ready (exports, conversions, loading) inside measure
        calls: host work, not device time (what a device-time budget counts leaves it out)."""
        self._prep_depth = 0

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Count the enclosed time as preparation (`prepare_seconds`; nested uses count once)."""
        self._prep_depth += 1
        t0 = time.monotonic()
        try:
            yield
        finally:
            self._prep_depth -= 1
            if self._prep_depth == 0:
                self.prepare_seconds += time.monotonic() - t0

    @property
    def name(self) -> str:
        return self.params.name

    @property
    def traits(self) -> KindTraits:
        """What this device's kind is (`evit.config.devices.KINDS`)."""
        return self.params.traits

    @property
    def in_process(self) -> bool:
        """False for kinds that hand a file to an external runner (no in-context timing, and
        one invocation per module: the runner does its own repeats)."""
        return not self.traits.external

    @property
    def converts_files(self) -> bool:
        """True for kinds whose timing first converts modules into a runtime's files."""
        return self.traits.converts_files

    def conversion_stats(self) -> dict[str, Any] | None:
        """Files converted / reused and the seconds spent converting, for kinds that convert
        (`converts_files`); None for the others."""
        return None

    def share(self, store: Any) -> None:
        """Fetch converted files from, and put new ones into, a shared store
        (`evit.latency.devices.shared.SharedStore`). Nothing to share for kinds that convert nothing."""

    def isolate_conversions(self) -> None:
        """Convert in worker processes even one file at a time, keeping this process free (the
        pipeline converts beside training, in the same process). Nothing to do for kinds that
        convert nothing."""

    def describe(self) -> dict[str, Any]:
        """What a measurement on this device depends on (stored in LUTs and metrics)."""
        dp = self.params
        return {
            "name": dp.name,
            "kind": dp.kind,
            "threads": dp.threads,
            "dtype": dp.dtype,
            "runtime": dp.runtime,
            "batch_size": dp.batch_size,
            "warmup": dp.warmup,
            "repeats": dp.repeats,
            "rounds": dp.rounds,
            "clock": self.clock_name,
            **runtime_facts(),
        }

    @abc.abstractmethod
    def check_available(self) -> None:
        """Raise DeviceError (naming the device and what is missing) unless it can run now."""

    def close(self) -> None:
        """Drop prepared modules/sessions and their exported files."""
        self._prepared.clear()
        self._prepared_bytes.clear()
        self._files.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def prepare_ahead(self, groups: Sequence[Sequence[Item]]) -> None:
        """Make ready, before any timing, what timing `groups` (the item lists of later
        measure calls) will need. Only kinds whose preparation is expensive enough to be
        worth doing up front and in parallel (litert, executorch: converting files) do anything."""

    # --- measuring ------------------------------------------------------------------------
    def measure(self, module: nn.Module, input_shape: Sequence[int], *, onnx_path: Path | None = None) -> Measurement:
        return self.measure_many([Item(module, tuple(input_shape), onnx_path)])[0]

    def measure_many(self, items: Sequence[Item], *, repeats: int | None = None, warmup: int | None = None,
                     rounds: int | None = None) -> list[Measurement]:
        """Time each module on its own: warm-up, inner count, `repeats` samples interleaved over `rounds`.

        `repeats`/`warmup`/`rounds` default to the device's params.
        """
        dp = self.params
        repeats = dp.repeats if repeats is None else repeats
        warmup = dp.warmup if warmup is None else warmup
        with self._context():
            prepared = [self.prepare(it) for it in items]
            inner: list[int] = []
            for p in prepared:
                n = max(warmup, 1)  # the warm-up runs double as the probe for the inner count
                probe = max(self._time_loop(p, n) / n, 1e-7)
                inner.append(int(min(_MAX_INNER, max(1, math.ceil(_MIN_SAMPLE_S / probe)))))
            samples: list[list[float]] = [[] for _ in prepared]
            for count in split_repeats(repeats, dp.rounds if rounds is None else rounds):
                for i, p in enumerate(prepared):
                    k = inner[i]
                    for _ in range(count):
                        samples[i].append(self._time_loop(p, k) / k * 1e3)
        return [Measurement.from_samples(s) for s in samples]

    def measure_chains(self, chains: Sequence[Sequence[Item]], *, repeats: int | None = None,
                       warmup: int | None = None, rounds: int | None = None) -> list[list[Measurement]]:
        """Time every module of every chain in context (see the class docstring).

        A pass runs a chain once, timing each module separately; each chain gets `warmup`
        untimed passes, then `repeats` timed passes split over `rounds` rounds that cycle
        through all chains (one untimed pass whenever the cycle comes back to a chain).
        """
        dp = self.params
        repeats = dp.repeats if repeats is None else repeats
        warmup = dp.warmup if warmup is None else warmup
        with self._context():
            prepared = [[self.prepare(it) for it in chain] for chain in chains]
            for ch in prepared:
                for _ in range(warmup):
                    self._time_chain(ch)
            samples: list[list[list[float]]] = [[[] for _ in ch] for ch in prepared]
            for count in split_repeats(repeats, dp.rounds if rounds is None else rounds):
                for ci, ch in enumerate(prepared):
                    self._time_chain(ch)
                    for _ in range(count):
                        for j, t in enumerate(self._time_chain(ch)):
                            samples[ci][j].append(t * 1e3)
        return [[Measurement.from_samples(s) for s in ch] for ch in samples]

    def prepare(self, item: Item) -> Prepared:
        """Export/compile/move `item` once; prepared items with a `key` are reused (LRU)."""
        if item.key is not None and item.key in self._prepared:
            self._prepared.move_to_end(item.key)
            return self._prepared[item.key]
        with self.preparing():
            return self._prepare_new(item)

    def _prepare_new(self, item: Item) -> Prepared:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="evit-lat-")
        self._counter += 1
        workdir = Path(self._tmp.name) / f"m{self._counter}"
        workdir.mkdir()
        module = module_to_time(item.module)
        nbytes = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
        prepared = self._prepare(module, item, workdir)
        if item.key is not None and self._CACHE_SIZE > 0:
            self._prepared[item.key] = prepared
            self._prepared_bytes[item.key] = nbytes
            while len(self._prepared) > 1 and (len(self._prepared) > self._CACHE_SIZE
                                               or sum(self._prepared_bytes.values()) > self._CACHE_BYTES):
                old, _ = self._prepared.popitem(last=False)
                self._prepared_bytes.pop(old, None)
        return prepared

    def _onnx_file(self, module: nn.Module, item: Item, workdir: Path) -> Path:
        """The item's ONNX file: given, already exported under its `file_key`, or exported now."""
        if item.onnx_path is not None:
            return item.onnx_path
        if item.file_key is not None and item.file_key in self._files:
            self._files.move_to_end(item.file_key)
            return self._files[item.file_key][0]
        path = export_onnx_file(module, item.input_shape, workdir / "model.onnx", self.opset)
        if item.file_key is not None:
            self._files[item.file_key] = (path, path.stat().st_size)
            while len(self._files) > 1 and sum(size for _, size in self._files.values()) > self._FILE_BYTES:
                _, (old, _) = self._files.popitem(last=False)
                old.unlink(missing_ok=True)  # sessions made from it have already loaded it
        return path

    # --- per-kind hooks -----------------------------------------------------------------
    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        yield

    @abc.abstractmethod
    def _prepare(self, module: nn.Module, item: Item, workdir: Path) -> Prepared:
        """Make `module` runnable here and give its native input for `item.input_shape`."""

    @property
    def clock_name(self) -> str:
        """'thread' (CPU time of the timing thread) or 'wall' (see DeviceParams.clock)."""
        dp = self.params
        if dp.clock != "auto":
            return dp.clock
        return "thread" if self.traits.thread_clock and dp.threads == 1 and not dp.gpu else "wall"

    def _clock(self) -> Callable[[], float]:
        return time.thread_time if self.clock_name == "thread" else time.perf_counter

    def _time_loop(self, p: Prepared, k: int) -> float:
        """Seconds for `k` back-to-back runs of one prepared module."""
        step, x = p.step, p.x
        clock = self._clock()
        t0 = clock()
        for _ in range(k):
            step(x)
        return clock() - t0

    def _time_chain(self, chain: Sequence[Prepared]) -> list[float]:
        """Seconds of each module in one pass over the chain (each fed the previous output)."""
        x = chain[0].x
        out: list[float] = []
        clock = self._clock()
        for p in chain:
            t0 = clock()
            x = p.step(x)
            out.append(clock() - t0)
        return out
