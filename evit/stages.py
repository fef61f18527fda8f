"""The pipeline's stage functions: the only place stage logic is reached from.

The CLI (`evit <stage>`), dvc.yaml (which calls the CLI) and the Prefect tasks in
`flows/` all call these. Each takes the validated `Params` (and a device name where the
stage is per device), reads its inputs from `evit.paths`, writes its outputs atomically
there, and returns a small JSON-able summary. Implementations live in their own modules;
imports are lazy so `evit --help` stays fast.
"""

from __future__ import annotations

import os
from typing import Any

from evit.config import Params


def load(path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """params.yaml (or `path`) with the override items on top, validated, including the checks
    that need the search space (`evit.resolve.check_params`): what every shell loads first."""
    from evit.config import load_params
    from evit.resolve import check_params

    params = load_params(path, overrides)
    check_params(params, str(path or os.environ.get("EVIT_PARAMS", "params.yaml")))
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
