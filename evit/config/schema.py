"""params.yaml's sections: every knob of the pipeline, its type, range and meaning.

Each section is also what a Prefect task and a DVC stage hash for caching, so a change to
one device's settings only invalidates that device's branch. Checks that need the search
space itself (a `search.fixed_archs` entry lies in the configured space) are not made
here but in `evit.resolve.check_params`, which builds the space: this module stays below
the space and the models.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from evit.config.base import ConfigError, Fraction, NonNegInt, PosInt, Section
from evit.config.devices import DeviceParams

# --- data ------------------------------------------------------------------------------------

class DataParams(Section):
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

class SpaceParams(Section):
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

SamplerName = Literal["elastic", "elastic-compressed", "complexity", "uniform", "flat"]
"""`evit.train.samplers.SAMPLERS` (checked equal by a test: config sits below train)."""


class TeacherParams(Section):
    model: str
    """Any timm model name (e.g. swsl_resnext101_32x4d, the paper's)."""
    weights: str | None = None
    """A local state_dict file; None downloads timm's pretrained weights from the hub (online)."""
    temperature: Annotated[float, Field(gt=0)] = 1.0


class CompressedBanksParams(Section):
    """`elastic-compressed`: the exploit ramp compressed into the run, small banks, advantage scores."""

    bank_capacity: PosInt = 30
    exploit_p_every: Annotated[float, Field(gt=0, le=1)] = 1 / 6
    """Fraction of training after which exploit_p grows by exploit_p_step."""
    rescore_per_epoch: NonNegInt = 2
    """Times per epoch the stalest bank entries of the current level are re-measured."""
    rescore_entries: NonNegInt = 3
    """Entries re-measured each time (forward passes only, on the step's un-mixed batch)."""


MOVED_TRAIN_KEYS = {"exploit_p_every": "elastic_compressed.exploit_p_every",
                    "rescore_per_epoch": "elastic_compressed.rescore_per_epoch",
                    "rescore_entries": "elastic_compressed.rescore_entries"}
"""Keys of the earlier elastic sampler; it is `elastic-compressed` now."""


class TrainParams(Section):
    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [k for k in MOVED_TRAIN_KEYS if k in data]
            if moved:
                raise ValueError(
                    "; ".join(f"train.{k} is now train.{MOVED_TRAIN_KEYS[k]}" for k in moved)
                    + " (the compressed exploit ramp is the `elastic-compressed` sampler; `elastic` follows the "
                    "reference: exploit_p_every_epochs, bank re-scoring at each epoch start and quarter)")
        return data

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

    sampler: SamplerName = "elastic-compressed"
    """The default: as accurate as `elastic` on flowers32 at the cost of `complexity` (docs/results.md)."""
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
    init: str | None = None
    """A trained supernet checkpoint to start from (fine-tuning, evit/train/warm_start.py): evit's
    models/supernet.pt copied elsewhere, or `evit import-reference`'s output. Every weight loads;
    the classifier is re-initialised when the class count differs. null = from scratch."""
    freeze_stem_epochs: NonNegInt = 0
    """Epochs during which the stem (first conv + stem blocks) is not updated (fine-tuning)."""
    # performance-aware sampling (evit/train/elastic.py); `elastic` follows the reference code
    shared_min_levels: list[NonNegInt] = [0, 2, 4]
    """Levels whose min subnet the level-walk samplers distil, each serving the levels up to
    the next one (the reference's 3 shared min subnets); [] = every level its own min."""
    bank_capacity: PosInt = 150
    bank_capacity_big: PosInt = 50
    bank_big_from_m: Annotated[float, Field(gt=0)] | None = None
    """Levels from this many MFLOPs on get bank_capacity_big; null = 5x the lowest level (the
    reference's 500 over 100 MFLOPs)."""
    exploit_p_start: Annotated[float, Field(ge=0, le=1)] = 0.2
    exploit_p_step: Annotated[float, Field(ge=0, le=1)] = 0.15
    exploit_p_every_epochs: PosInt = 100
    """`elastic`: exploit_p grows by exploit_p_step every this many absolute epochs (the reference)."""
    explore_candidates: PosInt = 5
    elastic_compressed: CompressedBanksParams = CompressedBanksParams()
    """The bank rules of `elastic-compressed` (evit's earlier short-run variant)."""
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


class AblateParams(Section):
    samplers: list[SamplerName] = ["uniform", "flat", "complexity", "elastic", "elastic-compressed"]
    seeds: list[int] = [0, 1]
    epochs: PosInt = 3
    subnets_per_level: PosInt = 3
    """Fixed seeded draws per FLOPs level evaluated for every sampler (plus the level's min subnet)."""
    conflict_steps: Annotated[int, Field(ge=2)] = 6
    """Steps over which gradient cosines (same step, adjacent steps) are measured per sampler."""
    pick_candidates: NonNegInt = 16
    """"What search would pick": per level, this many fixed seeded draws (the same for every
    sampler) ranked on the search split; the best one's val top-1 is reported. 0 = off."""
    bank_top: NonNegInt = 3
    """Best entries per level of each banked sampler's banks, evaluated on every sampler's supernet."""
    out_dir: str = "results"


class BaselinesParams(Section):
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


# --- search ----------------------------------------------------------------------------------

class SearchParams(Section):
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

class ExportParams(Section):
    out_dir: str = "exports"
    onnx_opset: Annotated[int, Field(ge=13, le=23)] = 17
    register_model: bool = True
    model_name: str = "evit-{device}"
    """Registered model name; {device} is replaced by the device name."""
    formats: list[Literal["onnx", "tflite", "pte"]] = ["onnx", "tflite", "pte"]
    """Model files per exported subnet, each checked against eager PyTorch: onnx (always
    written), tflite (LiteRT fp32, via the converter venv made on first use), pte
    (ExecuTorch, XNNPACK-delegated)."""
    quantize: list[Literal["fp32", "int8"]] = ["fp32"]
    """Precisions of the mobile files: fp32 always; int8 adds `model.int8.pte` beside
    `model.pte` and `model.int8.tflite` beside `model.tflite` (PT2E static quantization,
    evit.formats.quantize), with the val top-1 of each pair measured through its runtime
    (ExecuTorch, LiteRT) on the card. int8 needs pte or tflite in formats."""
    int8_calibration_images: PosInt = 64
    """Images of the search split (seeded subset) that set the int8 activation scales."""
    int8_max_drop_points: Annotated[float, Field(ge=0)] = 1.0
    """An int8 file whose runtime val top-1 is more than this many points (percent) below
    the fp32 file's is flagged on the card and in the log (still exported)."""

    int8_rank_candidates: NonNegInt = 0
    """Per budget, the top k subnets the search evaluated are also scored as int8 .pte files
    through the runtime: the Spearman correlation of the float and the int8 ranking goes on
    the card (`int8_ranking`). 0: off. Each candidate is one int8 lowering (~1 min on the cpu space)."""

    @model_validator(mode="after")
    def _int8_needs_pte(self) -> ExportParams:
        if "fp32" not in self.quantize:
            raise ValueError(f"quantize {self.quantize}: fp32 is always exported (the int8 file is checked "
                             "against it); accepted: [fp32] or [fp32, int8]")
        if "int8" in self.quantize and not {"pte", "tflite"} & set(self.formats):
            raise ValueError(f"quantize has int8 but formats {self.formats} has neither pte nor tflite: int8 "
                             "exports are ExecuTorch programs and LiteRT files; add pte or tflite to "
                             "export.formats or drop int8")
        if self.int8_rank_candidates and ("int8" not in self.quantize or "pte" not in self.formats):
            raise ValueError(f"int8_rank_candidates {self.int8_rank_candidates} needs int8 in quantize "
                             f"(got {self.quantize}) and pte in formats (got {self.formats}: the candidates are "
                             "scored as int8 .pte through ExecuTorch); set quantize: [fp32, int8] with pte, or "
                             "int8_rank_candidates: 0")
        return self


# --- storage / tracking ----------------------------------------------------------------------

class StorageParams(Section):
    remote: str = ".dvc-remote"
    """DVC remote: a local directory (embedded default) or s3://bucket/prefix."""
    endpoint_url: str | None = None
    """S3 endpoint (MinIO, moto_server); None is AWS. AWS_ENDPOINT_URL overrides it."""
    region: str = "us-east-1"
    push: bool = False
    """Push every stage output to the remote at the end of each `evit pipeline` run (team setups)."""
    share_models: bool = False
    """Share the files latency tables of kinds litert / executorch convert (they depend on the
    runtime, the code and the blocks, not on the device) under `<remote>/latency-models`, so
    another device or machine fetches instead of converting (EVIT_MODEL_CACHE_REMOTE: another
    folder or s3:// URL)."""

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


class TrackingParams(Section):
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI; the MLFLOW_TRACKING_URI environment variable wins."""
    experiment: str = "evit"
    registry_uri: str | None = None
    retries: NonNegInt = 3
    artifact_location: str | None = None
    """Where a newly created experiment stores run artifacts, e.g. s3://bucket/mlflow (S3 endpoint
    from MLFLOW_S3_ENDPOINT_URL); None: the tracking server's default (./mlruns without a server)."""


# --- the whole file --------------------------------------------------------------------------

class Params(Section):
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
        for d in v:
            if d.lut.prior is not None and d.lut.prior not in names:
                import difflib

                close = difflib.get_close_matches(d.lut.prior, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"device '{d.name}': lut.prior {d.lut.prior!r} is not a declared device{hint}; "
                                 f"accepted: {sorted(set(names) - {d.name})}")
        return v

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
