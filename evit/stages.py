"""The pipeline's stage functions: the only place stage logic is reached from.

The CLI (`evit <stage>`), dvc.yaml (which calls the CLI) and the Prefect tasks in
`flows/` all call these. Each takes the validated `Params` (and a device name where the
stage is per device), reads its inputs from `evit.paths`, writes its outputs atomically
there, and returns a small JSON-able summary. Implementations live in their own modules;
imports are lazy so `evit --help` stays fast.

Besides the stages, what the shells need to know about them comes through here too
(`load`, `train_resumable`, `convert_ahead`, `restore_registrations`, `import_ahead`), so
`flows/` reaches no stage package directly.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from typing import Any

from evit.config import Params


def load(path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """params.yaml (or `path`) with the override items on top, validated, including the checks
    that need the search space (`evit.resolve.check_params`): what every shell loads first."""
    from evit.config import load_params, params_path
    from evit.resolve import check_params

    params = load_params(path, overrides)
    check_params(params, str(params_path(path)))
    return params


def prepare(params: Params) -> dict[str, Any]:
    """Data source -> stratified train/search/val uint8 shards + manifest."""
    from evit.data.prepare import prepare_data

    return prepare_data(params)


def train(params: Params, *, resume: bool = True) -> dict[str, Any]:
    """Prepared data -> trained supernet checkpoint (+ memory banks, metrics)."""
    from evit.train.stage import train_supernet

    return train_supernet(params, resume=resume)


def ablate(params: Params) -> dict[str, Any]:
    """Same budget, several samplers and seeds -> results/ablation.json + plot."""
    from evit.train.ablate import run_ablation

    return run_ablation(params)


def baselines(params: Params) -> dict[str, Any]:
    """Standalone timm models, same recipe and epochs -> top-1 and per-device latency."""
    from evit.baselines.stage import run_baselines

    return run_baselines(params)


def lut(params: Params, device: str) -> dict[str, Any]:
    """Search space x device -> latency lookup table + validation report."""
    from evit.latency.stage import build_lut

    return build_lut(params, device)


def search(params: Params, device: str) -> dict[str, Any]:
    """Supernet + LUT -> best subnet per latency budget, Pareto front."""
    from evit.search.stage import search_device

    return search_device(params, device)


def export(params: Params, device: str, archs: list[str] | None = None) -> dict[str, Any]:
    """Chosen subnets (or the named `archs`) -> ONNX / safetensors / model card, registered in MLflow."""
    from evit.export.stage import export_device

    return export_device(params, device, archs=archs)


def train_resumable(params: Params) -> bool:
    """Whether `train` may resume from the rolling checkpoint (it was written by these params and data)."""
    from evit.train.stage import resumable

    return resumable(params)


def convert_ahead(params: Params, device: str, *, jobs: int | None = None) -> dict[str, Any]:
    """Make the files a `litert` / `executorch` LUT build will time, without timing anything."""
    from evit.latency.stage import convert_ahead as convert

    return convert(params, device, jobs=jobs)


def restore_registrations(params: Params, device: str) -> list[dict[str, Any]]:
    """Register again, from the exported files, what the configured registry lacks of `device`."""
    from evit.registry import restore_registrations as restore

    return restore(params, device)


AHEAD_IMPORTS = ("timm", "timm.data", "evit.train.stage", "evit.baselines.stage", "evit.nn.static",
                 "evit.latency.stage", "evit.latency.devices", "evit.formats.pte", "evit.formats.tflite", "torch.export")
"""What the stages running beside a convert-ahead task import (`import_ahead`)."""
RUNTIME_IMPORTS = {"executorch": "executorch.runtime", "litert": "ai_edge_litert.interpreter"}


def import_ahead(kinds: Iterable[str] = ()) -> None:
    """Import, in the calling (the flow's own) thread, what convert-ahead and the stages beside it load.

    Why: convert-ahead runs in a thread beside the training and baselines threads, and two
    threads importing the same package for the first time can each see the other's
    half-initialised module ("cannot import name 'IMAGENET_DEFAULT_MEAN' from partially
    initialized module 'timm.data'", seen here). Imported once up front, nothing is left to
    race on; the seconds it takes are paid by the stages anyway. `kinds`: the converting
    device kinds whose runtimes to import too.
    """
    for name in (*AHEAD_IMPORTS, *(RUNTIME_IMPORTS[k] for k in kinds if k in RUNTIME_IMPORTS)):
        importlib.import_module(name)
