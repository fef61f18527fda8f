"""A latency device's settings, and what each device kind is, declared once.

`KINDS` is the one place that says which kinds time on the calling thread, which build
their tables mostly by converting modules into files, and which are timed elsewhere by an
external runner. The settings' validation below, the latency devices
(`evit.latency.devices`) and the Prefect flow (which converts ahead for the converting
kinds and lets an external device's table run beside the host's stages) all read it,
instead of each keeping its own list of kind names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, get_args

from pydantic import Field, model_validator

from evit.config.base import NonNegInt, PosInt, Section

Kind = Literal["torch-cpu", "onnxruntime-cpu", "cuda", "litert", "executorch", "command"]


@dataclass(frozen=True)
class KindTraits:
    """What a device kind is, as far as anything outside its own module needs to know."""

    thread_clock: bool
    """Its single-threaded runs execute on the calling thread, so clock 'thread' applies."""
    converts_files: bool
    """Timing a module first means converting it into a runtime's file (slow, worth doing
    ahead and in parallel: the pipeline's convert-ahead task)."""
    external: bool
    """Timed by an external runner (a phone over adb, a board): one invocation per module, no
    in-context timing, and nothing measured on this host's CPU."""


KINDS: dict[str, KindTraits] = {
    "torch-cpu": KindTraits(thread_clock=True, converts_files=False, external=False),
    "onnxruntime-cpu": KindTraits(thread_clock=True, converts_files=False, external=False),
    "cuda": KindTraits(thread_clock=False, converts_files=False, external=False),
    "litert": KindTraits(thread_clock=True, converts_files=True, external=False),
    "executorch": KindTraits(thread_clock=True, converts_files=True, external=False),
    "command": KindTraits(thread_clock=False, converts_files=False, external=True),
}
assert tuple(KINDS) == get_args(Kind), "every device kind needs its traits"

THREAD_CLOCK_KINDS = tuple(k for k, t in KINDS.items() if t.thread_clock)
"""Kinds whose single-threaded runs execute on the calling thread (clock 'thread' applies)."""


class DeviceLutParams(Section):
    """How a new device's table is made quickly (issue 24): a device-time budget and a prior.

    Both optional; without them a table is built as `lut_mode` says (the defaults).
    """

    device_minutes: Annotated[float, Field(gt=0)] | None = None
    """Minutes of this device's time the table may take (timing only: lowering files is host
    time). The planner picks carrier subnets (covering block kinds and sizes) and whole
    validation subnets to fit, says what it will measure and how long it expects before it
    starts, and predicts the blocks it did not measure (from `prior`, or a per-kind
    regression). null = no budget (`lut_mode` decides)."""
    prior: str | None = None
    """Another declared device whose finished table (luts/<prior>.json, same space) this one
    transfers from: its block costs mapped through a small per-kind model (scale, or a
    size-dependent power law) fitted on this device's few in-context block measurements,
    kept only where it predicts the validation subnets better held out than the table's
    own regression. null = no transfer."""


class DeviceParams(Section):
    """One latency target: how to run a subnet there and how to benchmark it.

    The measurement knobs (threads, warmup, repeats, rounds, batch size) are part of what a
    LUT is keyed on: change one and the device's LUT is rebuilt, never silently reused.
    """

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")]
    kind: Kind
    threads: PosInt = 1
    """torch-cpu: torch.set_num_threads while timing; onnxruntime-cpu: intra-op threads;
    litert / executorch: XNNPACK threads."""
    gpu: bool = False
    """litert on a phone (kind command with infra/devices/litert_benchmark.sh): the GPU
    delegate. The in-process litert kind times the CPU (XNNPACK) path only."""
    format: Literal["onnx", "tflite", "pte"] = "onnx"
    """kind=command: the model file the runner gets as {model} (onnx; tflite for LiteRT's
    benchmark_model; pte for ExecuTorch's executor_runner)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Half precisions are for kind=cuda only (CPU runtimes time float32)."""
    precision: Literal["fp32", "int8"] = "fp32"
    """kind=executorch / litert: int8 times blocks and subnets quantized by the export's own
    int8 function (evit.formats.quantize: PT2E static; XNNPACK quantizer / litert-torch's
    quantizer with LiteRT's forms), what `export.quantize: [fp32, int8]` ships as
    model.int8.pte / model.int8.tflite."""
    runtime: Literal["eager", "torchscript"] = "eager"
    """torch-cpu / cuda: time the eager module or its traced+frozen TorchScript."""
    command: str | None = None
    """For kind=command: a shell command template with {model} (the model file, in `format`), {input_shape}
    (e.g. 1,3,32,32) and {resolution} (input side); also {batch_size}, {threads}, {warmup},
    {repeats}. It must print the latency in ms as the last stand-alone number on stdout
    (e.g. `python -m evit.latency.ort_runner {model} --input-shape {input_shape}`)."""
    command_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    """kind=command: one invocation running longer than this is an error."""
    warmup: NonNegInt = 10
    repeats: PosInt = 30
    """Timed samples per LUT block (per carrier subnet it is timed in) and per validation
    subnet. In context a sample is one run; alone, a sample repeats a module for >= 0.5 ms."""
    rounds: PosInt = 3
    """The samples are taken in this many passes over everything being timed (all LUT
    blocks and validation subnets), so a burst of load from another job on a shared
    machine inflates a few samples of everything instead of all samples of a few."""
    estimator: Literal["median", "p10"] = "median"
    """The statistic a LUT entry, an end-to-end validation run and so the predictor use
    (every measurement records median, p10, p90, mean and std). median: the typical
    latency on a dedicated device. p10: on a machine shared with other jobs, where a
    sample is inflated whenever another process has just evicted the caches, the 10th
    percentile estimates the undisturbed latency far more stably than the median."""
    clock: Literal["auto", "wall", "thread"] = "auto"
    """wall: elapsed time. thread: CPU time of the timing thread, which equals the wall
    latency of a single-threaded run on an idle machine but leaves out the time other
    processes hold the core (shared CI machines). auto: thread for single-threaded CPU
    kinds, else wall. thread needs threads=1 and a CPU kind."""
    batch_size: PosInt = 1
    budgets_ms: list[Annotated[float, Field(gt=0)]] = []
    validate_subnets: Annotated[int, Field(ge=10)] = 100
    """Random subnets across the FLOPs levels timed end to end to validate the LUT."""
    lut_mode: Literal["full", "sampled"] = "full"
    """full: every unique block of the space; sampled: the blocks of `sample_subnets`
    subnets across the levels, other blocks predicted by a per-kind regression."""
    max_entries: PosInt = 5000
    """A full LUT needing more entries than this is refused (switch to lut_mode: sampled)."""
    sample_subnets: PosInt = 300
    convert_jobs: PosInt | None = None
    """litert / executorch: files converted in parallel before a LUT build times anything
    (each worker converts one file at a time); null = one per CPU. Not part of what a
    table is keyed on."""
    seed: int = 0
    """Seeds the validation (and sampled-mode) subnet draws."""
    lut: DeviceLutParams = DeviceLutParams()
    """A device-time budget and a prior device for a quick table (`DeviceLutParams`)."""

    @property
    def traits(self) -> KindTraits:
        """What this device's kind is (`KINDS`): read by the latency devices and the flow."""
        return KINDS[self.kind]

    @model_validator(mode="after")
    def _command(self) -> DeviceParams:
        if self.kind == "command" and not self.command:
            raise ValueError(f"device '{self.name}' has kind 'command' but no 'command' template")
        if self.kind != "command" and self.command:
            raise ValueError(f"device '{self.name}': 'command' is only used with kind 'command'")
        if self.kind != "cuda" and self.dtype != "float32":
            raise ValueError(f"device '{self.name}': dtype {self.dtype!r} needs kind 'cuda'; "
                             f"kind {self.kind!r} accepts only 'float32'")
        if self.clock == "thread" and (self.threads != 1 or self.kind not in THREAD_CLOCK_KINDS):
            raise ValueError(f"device '{self.name}': clock 'thread' times the calling thread only, so it needs "
                             f"threads: 1 and kind {' or '.join(THREAD_CLOCK_KINDS)}; accepted here: auto, wall")
        if self.gpu and self.kind not in ("litert", "command"):
            raise ValueError(f"device '{self.name}': gpu applies to kinds 'litert' and 'command' (phones); "
                             f"kind {self.kind!r} accepts only gpu: false")
        if self.precision != "fp32" and self.kind not in ("executorch", "litert"):
            raise ValueError(f"device '{self.name}': precision {self.precision!r} is timed by kinds 'executorch' "
                             f"and 'litert' only; kind {self.kind!r} accepts only 'fp32'")
        if self.format != "onnx" and self.kind != "command":
            raise ValueError(f"device '{self.name}': format {self.format!r} applies to kind 'command' only")
        if self.lut.prior == self.name:
            raise ValueError(f"device '{self.name}': lut.prior names the device itself; accepted: another "
                             "declared device whose table exists")
        if self.runtime != "eager" and self.kind not in ("torch-cpu", "cuda"):
            raise ValueError(f"device '{self.name}': runtime {self.runtime!r} applies to kinds 'torch-cpu' "
                             f"and 'cuda' only; kind {self.kind!r} accepts only 'eager'")
        return self
