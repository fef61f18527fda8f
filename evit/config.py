"""params.yaml, validated once and up front.

Every knob of the pipeline lives in params.yaml, grouped by stage. `load_params` turns it
into a frozen pydantic model or raises `ConfigError` naming the key, the bad value and
what is accepted, before any expensive work starts. Unknown keys are errors (a typo in a
knob must not silently fall back to a default).

Each section is also what a Prefect task and a DVC stage hash for caching, so a change to
one device's settings only invalidates that device's branch.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from evit.errors import UserError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = "params.yaml"


class ConfigError(UserError, ValueError):
    """params.yaml is missing, malformed or has a value outside what is accepted."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


# --- data ------------------------------------------------------------------------------------

class DataParams(_Section):
    source: str = "digits"
    """'digits' (scikit-learn's bundled handwritten digits), a local ImageFolder directory
    (train/<class>/*, optional val/<class>/*), or s3://bucket/prefix with the same layout."""
    out_dir: str = "data/prepared"
    format: Literal["npy", "shards"] = "npy"
    """How prepared images are stored. 'npy': decoded once into square uint8 arrays at
    `storage_resolution` (fast to read, large on disk; the small-data default). 'shards':
    WebDataset tar shards of the encoded bytes (JPEG kept as is), decoded in DataLoader
    workers, so training crops from the original photo (paper-scale data)."""
    storage_resolution: Annotated[int, Field(ge=8, le=1024)] = 48
    """npy: side of the square uint8 images stored once; loaders resize/crop from here.
    shards: only the side the digits source is rendered at (photos keep their own size)."""
    max_side: Annotated[int, Field(ge=32, le=16384)] | None = None
    """shards only: images whose longer side exceeds this are downscaled (and re-encoded)
    once at prepare time; None keeps every image at its original size."""
    search_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    """Share of each class's train images held out as `search` (ranks subnets only)."""
    val_fraction: Fraction = 0.15
    """Share of each class held out as `val` when the source has no val split of its own
    (0 is accepted only for sources that have one)."""
    min_per_class: Annotated[int, Field(ge=1)] = 5
    """A class with fewer train images than this (after excluding unreadable files and
    holding out search/val) is an error, not a silent skip."""
    shard_size: PosInt = 4096
    """Images per shard file (.npy or .tar)."""
    seed: int = 0
    max_per_class: PosInt | None = None
    """Cap images per class and source split (quick experiments on a large source); None keeps all."""
    read_threads: Annotated[int, Field(ge=1, le=64)] = 4
    """Threads reading and decoding source images (S3 reads are I/O bound); no effect on the output."""

    @field_validator("source")
    @classmethod
    def _source_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be 'digits', a directory path or s3://bucket/prefix")
        if v.startswith("s3://"):
            bucket = v[len("s3://"):].split("/", 1)[0]
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
                raise ValueError(
                    f"bucket name {bucket!r} is not a valid S3 bucket name; accepted: s3://bucket/prefix "
                    "with 3-63 lowercase letters, digits, '.' or '-'"
                )
        return v

    @model_validator(mode="after")
    def _fractions(self) -> DataParams:
        if self.search_fraction + self.val_fraction >= 0.9:
            raise ValueError(
                f"search_fraction + val_fraction = {self.search_fraction + self.val_fraction:.2f} leaves "
                "too little for training; keep the sum below 0.9"
            )
        if self.max_side is not None and self.format != "shards":
            raise ValueError(f"max_side = {self.max_side} only applies to format: shards (format is "
                             f"{self.format!r}); set format: shards or max_side: null")
        return self


# --- search space ----------------------------------------------------------------------------

class SpaceParams(_Section):
    preset: Literal["cpu", "imagenet", "reference"] = "cpu"
    """reference: the space of the paper's released supernet, read from `reference_config`
    (see `evit import-reference`)."""
    reference_config: str | None = None
    """The reference's space YAML (e.g. final_3min_space.yaml); used only with preset reference."""
    levels: list[Annotated[float, Field(gt=0)]] | None = None
    """FLOPs levels in MMACs; None takes the preset's."""
    tolerance: Annotated[float, Field(gt=0)] | None = None
    flops_convention: Literal["true", "reference"] = "true"
    """How FLOPs are counted for levels, budgets and reports. true: every multiply-accumulate
    of the real forward pass (hook-exact). reference: the paper's reference counter (no SE
    and no shortcut conv in the transformer stages' downsampling block, 1 MAC per element
    for the depthwise conv on V, the downsampling expand conv taken at 2x its output side),
    so that "level 200" and the released models' figures mean what they mean in the paper."""

    @field_validator("levels")
    @classmethod
    def _sorted(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) < 1 or sorted(v) != v or len(set(v)) != len(v)):
            raise ValueError("must be a non-empty, strictly increasing list of MFLOPs")
        return v

    @model_validator(mode="after")
    def _reference_config(self) -> SpaceParams:
        if self.preset == "reference" and not self.reference_config:
            raise ValueError("preset 'reference' needs space.reference_config: the reference's space YAML "
                             "(e.g. final_3min_space.yaml)")
        if self.preset != "reference" and self.reference_config:
            raise ValueError("space.reference_config is only used with preset: reference")
        return self


# --- training --------------------------------------------------------------------------------

class TeacherParams(_Section):
    model: str
    """Any timm model name (e.g. swsl_resnext101_32x4d, the paper's)."""
    weights: str | None = None
    """A local state_dict file; None downloads timm's pretrained weights from the hub (online)."""
    temperature: Annotated[float, Field(gt=0)] = 1.0


class TrainParams(_Section):
    @model_validator(mode="before")
    @classmethod
    def _single_teacher(cls, data: Any) -> Any:
        """`teacher: {...}` (one teacher, the older spelling) is `teachers: [{...}]`."""
        if isinstance(data, dict) and "teacher" in data:
            data = dict(data)
            one = data.pop("teacher")
            if data.get("teachers") and one is not None:
                raise ValueError("give train.teachers (a list) or train.teacher, not both")
            if one is not None or "teachers" not in data:
                data["teachers"] = [] if one is None else [one]
        return data

    sampler: Literal["elastic", "complexity", "uniform", "flat"] = "elastic"
    out_dir: str = "models"
    epochs: PosInt = 8
    batch_size: PosInt = 32
    lr: Annotated[float, Field(gt=0)] = 2e-3
    """Peak learning rate for `batch_size` (the paper: 5e-4 x batch/512)."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    warmup_epochs: NonNegInt = 1
    min_lr: Annotated[float, Field(ge=0)] = 1e-5
    label_smoothing: Fraction = 0.1
    agc_clip: Annotated[float, Field(gt=0)] = 0.1
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.999
    mixup_alpha: Annotated[float, Field(ge=0)] = 0.0
    auto_augment: str | None = None
    """timm auto-augment policy, e.g. 'rand-m5-n1' (light RandAugment); None disables."""
    reprob: Fraction = 0.0
    hflip: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Digits are not flip-invariant; the ImageNet profile sets 0.5."""
    alpha_min: float = -1.0
    alpha_max: float = 1.0
    alpha_clip: Annotated[float, Field(gt=0)] = 5.0
    teachers: list[TeacherParams] = []
    """Teachers of the level subnets, their softmax(logits / temperature) averaged (the paper:
    swsl_resnext101_32x4d + _32x8d at 0.2). Empty: hard labels. Checked before training: a
    teacher that cannot be loaded, or predicts another number of classes, is an error."""
    # performance-aware sampling
    bank_capacity: PosInt = 30
    exploit_p_start: Annotated[float, Field(ge=0, le=1)] = 0.2
    exploit_p_step: Annotated[float, Field(ge=0, le=1)] = 0.15
    exploit_p_every: Annotated[float, Field(gt=0, le=1)] = 1 / 6
    """Fraction of training after which exploit_p grows by exploit_p_step."""
    explore_candidates: PosInt = 5
    rescore_per_epoch: NonNegInt = 2
    """Times per epoch the stalest bank entries of the current level are re-measured (0: only
    when re-trained); see evit/train/samplers.py."""
    rescore_entries: NonNegInt = 3
    """Entries re-measured each time (forward passes only, on the step's batch)."""
    drop_path: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Stochastic depth of the deepest block (0 as NASViT/ElasticViT train their supernets)."""
    log_every: PosInt = 10
    """Steps per batch of MLflow metric uploads (every step is still recorded)."""
    # loop
    steps_per_epoch: PosInt | None = None
    """None: one pass over the train split per epoch."""
    checkpoint_every: PosInt = 50
    eval_every_epochs: PosInt = 1
    eval_subnets: Literal["min", "min+draw"] = "min+draw"
    """Validation subnets of the final report: each level's min subnet, plus one fixed seeded
    draw per level (min+draw). Every epoch evaluates the min subnets only."""
    bn_calib_batches: PosInt = 4
    workers: NonNegInt = 0
    threads: PosInt | None = None
    """torch intra-op threads (CPU); None: torch's default (one per core). 1 avoids the
    OpenMP stalls of a 2-thread run on cores that other processes also use."""
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: bool = True
    amp_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Autocast dtype on GPU (CPU always trains in float32)."""


class AblateParams(_Section):
    samplers: list[Literal["elastic", "complexity", "uniform", "flat"]] = ["uniform", "flat", "complexity", "elastic"]
    seeds: list[int] = [0, 1]
    epochs: PosInt = 3
    subnets_per_level: PosInt = 3
    """Fixed seeded draws per FLOPs level evaluated for every sampler (plus the level's min subnet)."""
    conflict_steps: Annotated[int, Field(ge=2)] = 6
    """Steps over which gradient cosines (same step, adjacent steps) are measured per sampler."""
    out_dir: str = "results"


class BaselinesParams(_Section):
    """Standalone timm models trained with the `train` recipe (`evit baselines`, evit/baselines/)."""

    models: list[str] = ["mobilenetv3_small_050", "mobilenetv3_large_075"]
    """timm model names, trained from scratch; [] turns the comparison off."""
    epochs: PosInt | None = None
    """null = `train.epochs` (the same epoch budget as the supernet)."""
    resolution: PosInt | None = None
    """Input side; null = the search space's largest resolution (what the supernet trains at)."""
    out_dir: str = "baselines"
    """Model files (outside `models/`, which is the train stage's DVC output)."""
    results: str = "results/baselines.json"


# --- devices ---------------------------------------------------------------------------------

THREAD_CLOCK_KINDS = ("torch-cpu", "onnxruntime-cpu", "litert", "executorch")
"""Kinds whose single-threaded runs execute on the calling thread (clock 'thread' applies)."""


class DeviceParams(_Section):
    """One latency target: how to run a subnet there and how to benchmark it.

    The measurement knobs (threads, warmup, repeats, rounds, batch size) are part of what a
    LUT is keyed on: change one and the device's LUT is rebuilt, never silently reused.
    """

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")]
    kind: Literal["torch-cpu", "onnxruntime-cpu", "cuda", "litert", "executorch", "command"]
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
        if self.format != "onnx" and self.kind != "command":
            raise ValueError(f"device '{self.name}': format {self.format!r} applies to kind 'command' only")
        if self.runtime != "eager" and self.kind not in ("torch-cpu", "cuda"):
            raise ValueError(f"device '{self.name}': runtime {self.runtime!r} applies to kinds 'torch-cpu' "
                             f"and 'cuda' only; kind {self.kind!r} accepts only 'eager'")
        return self


# --- search ----------------------------------------------------------------------------------

class SearchParams(_Section):
    """Evolutionary search per device budget (evit.search); fitness is cached per arch."""

    out_dir: str = "results"
    population: PosInt = 32
    generations: PosInt = 4
    top_k: PosInt = 16
    mutations: NonNegInt = 8
    crossovers: NonNegInt = 8
    mutate_prob: Annotated[float, Field(ge=0, le=1)] = 0.2
    depth_mutate_prob: Annotated[float, Field(ge=0, le=1)] = 0.4
    flops_budgets_m: list[Annotated[float, Field(gt=0)]] = []
    """FLOPs budgets (MMACs) searched for every device, besides its latency budgets."""
    bn_calib_batches: PosInt = 2
    eval_batch_size: PosInt = 256
    seed: int = 0
    fixed_archs: list[str] = []
    """Architectures exported and registered beside the searched ones, for every device, without
    searching: released model names (T1, T2, S1, S2, M, L1, L1.5, L2, L3; `evit arch list`) or
    arch JSON files. Each is evaluated on val and gets a card and an alias named after it."""

    @model_validator(mode="after")
    def _sizes(self) -> SearchParams:
        if self.top_k > self.population:
            raise ValueError(f"top_k ({self.top_k}) must not exceed population ({self.population})")
        return self


# --- export ----------------------------------------------------------------------------------

class ExportParams(_Section):
    out_dir: str = "exports"
    onnx_opset: Annotated[int, Field(ge=13, le=23)] = 17
    register_model: bool = True
    model_name: str = "evit-{device}"
    """Registered model name; {device} is replaced by the device name."""
    formats: list[Literal["onnx", "tflite", "pte"]] = ["onnx", "tflite", "pte"]
    """Model files per exported subnet, each checked against eager PyTorch: onnx (always
    written), tflite (LiteRT fp32, via the converter venv made on first use), pte
    (ExecuTorch, XNNPACK-delegated)."""


# --- storage / tracking ----------------------------------------------------------------------

class StorageParams(_Section):
    remote: str = ".dvc-remote"
    """DVC remote: a local directory (embedded default) or s3://bucket/prefix."""
    endpoint_url: str | None = None
    """S3 endpoint (MinIO, moto_server); None is AWS. AWS_ENDPOINT_URL overrides it."""
    region: str = "us-east-1"
    push: bool = False
    """Push every stage output to the remote at the end of each `evit pipeline` run (team setups)."""

    @field_validator("remote")
    @classmethod
    def _remote(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a local directory or s3://bucket/prefix")
        if "://" in v and not v.startswith("s3://"):
            raise ValueError(f"remote {v!r}: accepted are a local directory or s3://bucket/prefix")
        if v.startswith("s3://") and not v[len("s3://"):].split("/", 1)[0]:
            raise ValueError(f"remote {v!r} names no bucket; accepted: s3://bucket/prefix")
        return v


class TrackingParams(_Section):
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI; the MLFLOW_TRACKING_URI environment variable wins."""
    experiment: str = "evit"
    registry_uri: str | None = None
    retries: NonNegInt = 3
    artifact_location: str | None = None
    """Where a newly created experiment stores run artifacts, e.g. s3://bucket/mlflow (S3 endpoint
    from MLFLOW_S3_ENDPOINT_URL); None: the tracking server's default (./mlruns without a server)."""


# --- the whole file --------------------------------------------------------------------------

class Params(_Section):
    data: DataParams = DataParams()
    space: SpaceParams = SpaceParams()
    train: TrainParams = TrainParams()
    ablate: AblateParams = AblateParams()
    baselines: BaselinesParams = BaselinesParams()
    devices: list[DeviceParams] = [DeviceParams(name="cpu-1t", kind="torch-cpu", threads=1)]
    search: SearchParams = SearchParams()
    export: ExportParams = ExportParams()
    storage: StorageParams = StorageParams()
    tracking: TrackingParams = TrackingParams()

    @field_validator("devices")
    @classmethod
    def _unique_devices(cls, v: list[DeviceParams]) -> list[DeviceParams]:
        names = [d.name for d in v]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"device names must be unique; repeated: {dups}")
        return v

    @model_validator(mode="after")
    def _fixed_archs(self) -> Params:
        """Every `search.fixed_archs` entry resolves and lies in the configured space (checked up front)."""
        if not self.search.fixed_archs:
            return self
        from evit.released import arch_label, resolve_arch
        from evit.space import get_space

        space = get_space(self.space.preset)
        labels: dict[str, str] = {}
        for spec in self.search.fixed_archs:
            try:
                name, arch = resolve_arch(spec)
                space.validate(arch)
            except UserError as exc:
                raise ValueError(f"search.fixed_archs entry {spec!r}: {exc}") from None
            label = arch_label(name)
            if label in labels:
                raise ValueError(f"search.fixed_archs: {labels[label]!r} and {spec!r} share the label {label!r}")
            labels[label] = spec
        return self

    def device(self, name: str) -> DeviceParams:
        for d in self.devices:
            if d.name == name:
                return d
        raise ConfigError(
            f"unknown device {name!r}; params.yaml declares: {[d.name for d in self.devices] or 'none'}"
        )

    def section(self, name: str) -> dict[str, Any]:
        """One section as plain data (what caches and DVC hash)."""
        return self.model_dump(mode="json")[name]


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The pydantic model class found by walking `loc` (field names / list indices) from Params."""
    model: type[BaseModel] = Params
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            break
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        for c in candidates:  # list[Model] | None
            nested += [a for a in getattr(c, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return model


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} invalid setting(s):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        inp = err.get("input")
        if err["type"] == "extra_forbidden":
            accepted = sorted(_model_at(err["loc"][:-1]).model_fields)
            close = difflib.get_close_matches(str(err["loc"][-1]), accepted, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"  - {loc}: unknown key (value {inp!r}){hint}; accepted keys here: {accepted}")
            continue
        msg = err["msg"]
        if err["type"] == "literal_error":
            msg = msg.replace("Input should be", "accepted:")
        if not loc:  # a check across sections: the message names the keys itself
            lines.append(f"  - {msg.removeprefix('Value error, ')}")
            continue
        value = "" if err["type"] == "missing" else f" = {inp!r}"
        lines.append(f"  - {loc}{value}: {msg}")
    return "\n".join(lines)


def parse_params(data: Any, source: str = "params") -> Params:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


OVERRIDES_ENV = "EVIT_OVERRIDES"
"""Override items applied on top of every params file loaded, one per line (a YAML file or
KEY=VALUE). The CLI's `--set` appends to it, so `dvc`, torchrun and Prefect task processes
started from that command load the same settings."""


def _merge(base: Any, over: Any, where: str) -> Any:
    """`over` merged into `base`: mappings key by key, a mapping onto a list of named entries
    (`devices`) entry by name, anything else replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v, f"{where}.{k}" if where else str(k)) if k in base else v
        return out
    if isinstance(base, list) and isinstance(over, dict) and all(isinstance(e, dict) and "name" in e for e in base):
        names = [e["name"] for e in base]
        unknown = sorted(set(over) - set(names))
        if unknown:
            raise ConfigError(f"override of {where}: no entry named {unknown}; entries: {names}")
        return [_merge(e, over[e["name"]], f"{where}.{e['name']}") if e["name"] in over else e for e in base]
    return over


def _item_to_mapping(item: str) -> tuple[Any, str]:
    """One override item -> (nested mapping, description): `a.b=VALUE` (VALUE parsed as YAML) or a YAML file."""
    key, eq, value = item.partition("=")
    if eq and key.strip() and not Path(item).is_file():
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
        parts = [p for p in key.strip().split(".")]
        if not all(parts):
            raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted KEY, e.g. train.epochs=2")
        out: Any = parsed
        for part in reversed(parts):
            out = {part: out}
        return out, f"--set {key.strip()}"
    path = Path(item)
    if not path.is_file():
        raise ConfigError(f"override {item!r} is neither KEY=VALUE (e.g. train.epochs=2) nor an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an override file is a mapping of sections, got {type(data).__name__}")
    return data, str(path)


def override_items(extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The override items in force: those of $EVIT_OVERRIDES, then `extra`."""
    env = [line.strip() for line in os.environ.get(OVERRIDES_ENV, "").splitlines() if line.strip()]
    return env + [x for x in extra if x.strip()]


def apply_overrides(data: dict[str, Any], items: list[str] | tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    """`data` with every override item merged on top, in order; also the items' descriptions."""
    described = []
    for item in items:
        mapping, desc = _item_to_mapping(item)
        data = _merge(data, mapping, "")
        described.append(desc)
    return data, described


def load_params(path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read and validate params.yaml (or `path`); errors name key, value and what is accepted.

    Override items ($EVIT_OVERRIDES, then `overrides`: YAML files or KEY=VALUE) are merged on
    top before validation, so a budget profile (`tests/data/imagenet-smoke.yaml`) or a
    one-off `--set train.epochs=2` is checked like the file itself.
    """
    path = Path(path or os.environ.get("EVIT_PARAMS", DEFAULT_PARAMS))
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} not found (pass --params PATH or run from the project root)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    items = override_items(tuple(overrides))
    source = str(path)
    if items:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
        data, described = apply_overrides(data, items)
        source = " + ".join([source, *described])
    return parse_params(data, source)
