"""Latency devices: one small interface over every runtime a subnet can be timed on.

`get_device(dp)` turns a validated `DeviceParams` into a `Device`:
- `describe()`: what the numbers were measured on (kind, threads, clock, host, CPU/GPU
  model, torch/onnxruntime versions), stored in every LUT;
- `check_available()`: raises `DeviceError` up front (a cuda device without a GPU, a
  command whose program is missing or whose template has an unknown placeholder);
- `measure(module, input_shape)` / `measure_many(items)`: each module timed on its own;
- `measure_chains(chains)`: each module timed while it runs inside a sequence of others
  fed the previous output (how the LUT times blocks in the context of a real subnet).
Each returns `Measurement`s (median, p10, p90, mean, std, n and the raw samples).

Benchmark practice, shared by the in-process kinds (torch-cpu, onnxruntime-cpu, cuda):
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

`litert` and `executorch` (evit/latency/mobile.py) time the phone runtimes in process,
with this same discipline, on converted files.

The `command` kind runs an external benchmark (adb + TFLite `benchmark_model`, a remote
board, ...) once per module: the module is exported to ONNX with the pipeline's exporter
(or, with `format: tflite | pte`, converted to LiteRT / lowered to ExecuTorch)
and the command template gets {model}, {input_shape}, {resolution} (and {batch_size},
{threads}, {warmup}, {repeats}); it does its own warm-up/repeats and prints the latency
in ms as the last stand-alone number on stdout (`evit.latency.ort_runner` is an example).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evit.config import THREAD_CLOCK_KINDS, DeviceParams
from evit.errors import DeviceError

log = logging.getLogger(__name__)

_MIN_SAMPLE_S = 0.0005
"""A timed sample repeats the module until it lasts at least this long (0.5 ms)."""
_MAX_INNER = 1000

@dataclass(frozen=True)
class Measurement:
    """Latency statistics of one module on one device, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    n: int
    samples: tuple[float, ...] = field(default=(), repr=False, compare=False)
    """The raw samples (ms), so measurements of one module at several times can be pooled."""

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> Measurement:
        a = np.asarray(samples_ms, dtype=np.float64)
        if a.size == 0:
            raise ValueError("no samples")
        return cls(
            median_ms=float(np.median(a)),
            p10_ms=float(np.percentile(a, 10)),
            p90_ms=float(np.percentile(a, 90)),
            mean_ms=float(a.mean()),
            std_ms=float(a.std()),
            n=int(a.size),
            samples=tuple(float(x) for x in a),
        )

    def to_dict(self) -> dict[str, float | int]:
        """The statistics (not the raw samples), rounded to nanoseconds."""
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items() if k != "samples"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        return cls(**{k: d[k] for k in ("median_ms", "p10_ms", "p90_ms", "mean_ms", "std_ms", "n")})


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


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo; elsewhere the platform's answer)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _ort_version() -> str | None:
    try:
        import onnxruntime

        return str(onnxruntime.__version__)
    except ImportError:
        return None


def random_input(shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g)


def export_onnx_file(module: nn.Module, input_shape: Sequence[int], path: Path, opset: int = 17) -> Path:
    """Export `module` for `input_shape` with the pipeline's own exporter (`evit.nn.export`).

    So a block, or a whole static subnet, is timed from exactly the kind of file that
    `evit export` ships (same exporter, opset and options).
    """
    from evit.formats.onnx import export_onnx_input

    return export_onnx_input(module, random_input(input_shape), path, opset)


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
    in_process: bool = True
    """False for kinds that hand a file to an external runner (no in-context timing, and
    one invocation per module: the runner does its own repeats)."""
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

    @property
    def name(self) -> str:
        return self.params.name

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
            "hostname": socket.gethostname(),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": _ort_version(),
            "numpy": np.__version__,
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
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="evit-lat-")
        self._counter += 1
        workdir = Path(self._tmp.name) / f"m{self._counter}"
        workdir.mkdir()
        module = item.module if isinstance(item.module, nn.Module) else item.module()
        nbytes = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
        prepared = self._prepare(module.eval(), item, workdir)
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
        return "thread" if dp.kind in THREAD_CLOCK_KINDS and dp.threads == 1 and not dp.gpu else "wall"

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


class TorchCPUDevice(Device):
    """PyTorch on the CPU, eager or traced+frozen TorchScript, with pinned intra-op threads."""

    def check_available(self) -> None:
        cores = os.cpu_count() or 1
        if self.params.threads > cores:
            log.warning("device '%s': threads=%d but this machine has %d CPUs; timings will be oversubscribed",
                        self.name, self.params.threads, cores)

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with torch_threads(self.params.threads), torch.inference_mode():
            yield

    def _prepare(self, module: nn.Module, item: Item, workdir: Path) -> Prepared:
        x = random_input(item.input_shape)
        if self.params.runtime == "torchscript":
            module = _script(module, x)
        return Prepared(module, x)


def _script(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """Trace and freeze (folds BN into convs, as a TorchScript deployment would)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (x,))
        return torch.jit.freeze(traced)


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
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.params.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        return ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])

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
        x = random_input(item.input_shape).numpy()
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


class CudaDevice(Device):
    """A CUDA GPU: CUDA-event timing, module and input in `dtype`, synchronised per sample."""

    def check_available(self) -> None:
        if not torch.cuda.is_available():
            built = torch.version.cuda or "none (CPU-only build)"
            raise DeviceError(
                f"device '{self.name}' (kind cuda) needs an NVIDIA GPU, but none is present: "
                f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build {built}, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). "
                "Run this device's stage on a GPU machine, or remove it from params.yaml `devices:`."
            )
        if self.params.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise DeviceError(f"device '{self.name}': dtype bfloat16 is not supported on "
                              f"{torch.cuda.get_device_name(0)}; accepted here: float32, float16")

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            d["gpu"] = props.name
            d["gpu_capability"] = f"{props.major}.{props.minor}"
            d["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            d["cudnn"] = torch.backends.cudnn.version()
        return d

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with torch.inference_mode():
            yield

    def _prepare(self, module: nn.Module, item: Item, workdir: Path) -> Prepared:
        dev = torch.device("cuda", 0)
        dtype = getattr(torch, self.params.dtype)
        x = random_input(item.input_shape).to(dev, dtype)
        module = module.to(dev, dtype)
        if self.params.runtime == "torchscript":
            module = _script(module, x)
        return Prepared(module, x)

    def _time_loop(self, p: Prepared, k: int) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()  # nothing queued before the start event
        start.record()
        for _ in range(k):
            p.step(p.x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def _time_chain(self, chain: Sequence[Prepared]) -> list[float]:
        """Events between consecutive modules; one synchronisation per pass, not per module."""
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(chain) + 1)]
        torch.cuda.synchronize()
        x = chain[0].x
        events[0].record()
        for p, ev in zip(chain, events[1:]):
            x = p.step(x)
            ev.record()
        events[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]


_NUMBER = re.compile(r"(?<![\w.\-/])([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?:ms)?(?![\w.])")
"""A stand-alone number (optionally with an 'ms' suffix): digits inside words or paths
(`/tmp/m1/model.onnx`, `abc123`) are not latencies."""
_PLACEHOLDERS = ("model", "input_shape", "resolution", "batch_size", "threads", "warmup", "repeats")


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "<empty>"


class CommandDevice(Device):
    """An external benchmark command: ONNX file in, one latency in ms printed on stdout."""

    per_call_overhead = True
    in_process = False
    _CACHE_SIZE = 0  # a runner invocation is prepared right before it runs, never reused

    def check_available(self) -> None:
        template = self.params.command or ""
        try:
            self._render(Path("model.onnx"), (1, 3, 32, 32))
        except (KeyError, IndexError, ValueError) as exc:
            raise DeviceError(
                f"device '{self.name}': command template {template!r} has a bad placeholder ({exc}); "
                f"accepted placeholders: {', '.join('{' + p + '}' for p in _PLACEHOLDERS)}"
            ) from None
        try:
            argv0 = shlex.split(template)[0]
        except (ValueError, IndexError):
            raise DeviceError(f"device '{self.name}': command template {template!r} is not a valid shell "
                              "command line") from None
        if not any(ch in argv0 for ch in "{$=") and shutil.which(argv0) is None:
            raise DeviceError(f"device '{self.name}': program {argv0!r} of its command was not found "
                              "(not on PATH and not an executable file)")

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["command"] = self.params.command
        return d

    def _render(self, model: Path, input_shape: Sequence[int]) -> str:
        dp = self.params
        values = {
            "model": shlex.quote(str(model)),
            "input_shape": ",".join(str(s) for s in input_shape),
            "resolution": str(input_shape[-1]),
            "batch_size": str(dp.batch_size),
            "threads": str(dp.threads),
            "warmup": str(dp.warmup),
            "repeats": str(dp.repeats),
        }
        return (dp.command or "").format(**values)

    def run_command(self, model: Path, input_shape: Sequence[int]) -> float:
        """Run the template on one ONNX file; the last number on stdout is the latency (ms)."""
        cmd = self._render(model, input_shape)
        timeout = self.params.command_timeout_s
        try:
            proc = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            raise DeviceError(f"device '{self.name}': command timed out after {timeout:g} s "
                              f"(devices[].command_timeout_s): {cmd}\nstderr (last lines):\n{_tail(err)}") from None
        if proc.returncode != 0:
            raise DeviceError(f"device '{self.name}': command exited with status {proc.returncode}: {cmd}\n"
                              f"stderr (last lines):\n{_tail(proc.stderr)}")
        numbers = _NUMBER.findall(proc.stdout)
        value = float(numbers[-1]) if numbers else float("nan")
        if not math.isfinite(value) or value <= 0:
            raise DeviceError(
                f"device '{self.name}': command printed no positive latency (expected the last number on stdout "
                f"to be milliseconds): {cmd}\nstdout (last lines):\n{_tail(proc.stdout)}\n"
                f"stderr (last lines):\n{_tail(proc.stderr)}"
            )
        return value

    def measure_many(self, items: Sequence[Item], *, repeats: int | None = None, warmup: int | None = None,
                     rounds: int | None = None) -> list[Measurement]:
        """One command run per module (the command does its own warm-up and repeats)."""
        out = []
        for it in items:
            p = self.prepare(it)
            out.append(Measurement.from_samples([p.step(p.x)]))
        return out

    def measure_chains(self, chains: Sequence[Sequence[Item]], *, repeats: int | None = None,
                       warmup: int | None = None, rounds: int | None = None) -> list[list[Measurement]]:
        """An external runner cannot time a module inside a sequence: each is timed on its own."""
        return [self.measure_many(chain) for chain in chains]

    def close(self) -> None:
        converter = getattr(self, "_converter", None)
        if converter is not None:
            converter.close()
            self._converter = None
        super().close()

    def _prepare(self, module: nn.Module, item: Item, workdir: Path) -> Prepared:
        shape = item.input_shape
        if self.params.format == "onnx":
            path = self._onnx_file(module, item, workdir)
        else:  # the runner asks for a mobile format (format: tflite | pte)
            from evit.latency.mobile import model_file

            if self.params.format == "tflite" and getattr(self, "_converter", None) is None:
                from evit.formats.tflite import LiteRTConverter

                self._converter = LiteRTConverter()
            path = model_file(self.params.format, module, shape, workdir, getattr(self, "_converter", None))
        return Prepared(lambda _x: self.run_command(path, shape), None)


_KINDS: dict[str, type[Device]] = {
    "torch-cpu": TorchCPUDevice,
    "onnxruntime-cpu": OnnxRuntimeCPUDevice,
    "cuda": CudaDevice,
    "command": CommandDevice,
}

def get_device(dp: DeviceParams, *, opset: int = 17) -> Device:
    """The `Device` for one validated `devices:` entry (`opset` for kinds that export ONNX)."""
    if dp.kind in ("litert", "executorch"):
        from evit.latency.mobile import MOBILE_KINDS  # its own module: the mobile runtimes load lazily

        return MOBILE_KINDS[dp.kind](dp, opset=opset)
    try:
        cls = _KINDS[dp.kind]
    except KeyError:  # pragma: no cover - DeviceParams already restricts the kinds
        raise DeviceError(f"device '{dp.name}': unknown kind {dp.kind!r}; accepted: {sorted(_KINDS)}") from None
    return cls(dp, opset=opset)
