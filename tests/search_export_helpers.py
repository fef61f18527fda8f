"""Tiny real components for the search, export and registry tests (no training needed).

A two-stage search space small enough that a supernet builds in milliseconds and a
subnet exports to ONNX in about a second; weights are random but seeded, so two seeds
give two different models (different content hashes) and one seed always the same.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import torch

from evit.arch import Arch
from evit.config import Params, parse_params
from evit.export.stage import build_card, export_subnet
from evit.host import describe_host
from evit.search.budgets import Budget
from evit.space import SearchSpace, StageSpace

TINY = SearchSpace(
    name="tiny",
    resolutions=(16, 24),
    stem_widths=(8,),
    stem_depths=(1,),
    stem_kernels=(3,),
    stages=(
        StageSpace("mbconv", (8, 16), (1, 2), 2, expansions=(2, 3), kernels=(3,), se=False),
        StageSpace("transformer", (16, 32), (1, 2), 2, mlp_ratios=(2,), v_scales=(2,)),
    ),
    head_expansion=2,
    head_width=32,
    num_classes=4,
    # FLOPs of this space: 0.064 to 0.51 MMACs.
    levels=(0.07, 0.12, 0.2, 0.3),
    tolerance=0.02,
)


def tiny_supernet(seed: int) -> Any:
    from evit.nn.supernet import Supernet

    torch.manual_seed(seed)
    return Supernet(TINY).eval()


def unique_name() -> str:
    return f"t{uuid.uuid4().hex[:8]}-{{device}}"


def registry_params(tracking_uri: str, *, model_name: str | None = None, registry_uri: str | None = None,
                    retries: int = 1, device: str = "dev") -> Params:
    return parse_params({
        "devices": [{"name": device, "kind": "torch-cpu", "budgets_ms": [1.5]}],
        "export": {"model_name": model_name or unique_name()},
        "tracking": {"uri": tracking_uri, "registry_uri": registry_uri, "retries": retries,
                     "experiment": "evit-tests"},
    })


def make_export(root: Path, *, seed: int = 0, val_top1: float = 0.5, budget: Budget | None = None,
                arch: Arch | None = None, device: str = "dev", formats: tuple[str, ...] = ("onnx",),
                converter: Any = None, int8: Any = None, static: Any = None) -> tuple[Path, Any]:
    """Export one tiny static subnet with a complete card; returns (folder, static module).

    `int8`: an `evit.export.int8.Int8Inputs` (adds model.int8.pte); `static`: export this
    module (of `arch`) instead of the one extracted from the seeded supernet."""
    from evit.nn.static import extract

    budget = budget or Budget("latency", 1.5)
    net = tiny_supernet(seed)
    arch = arch or TINY.largest()
    static = extract(net, arch) if static is None else static
    entry = {"val_top1": val_top1, "search_top1": val_top1 - 0.01, "flops_m": 0.5, "params_m": 0.04,
             "predicted_latency_ms": 1.0, "measured_latency_ms": 1.1, "measurement": {"median_ms": 1.1}}
    card = build_card(
        name=f"evit-{device}", arch=arch, space_dict=TINY.to_dict(), budget=budget.to_dict(), entry=entry,
        device={"name": device, "params": {"name": device, "kind": "torch-cpu"}, "host": describe_host()},
        provenance={"data_version": "data-v1", "supernet_sha256": f"sha-{seed}", "lut_sha256": "lut",
                    "git_commit": "unknown", "evit_version": "test"},
        classes=[f"class-{i}" for i in range(TINY.num_classes)], opset=17,
    )
    folder = root / f"{budget.label}-s{seed}-v{val_top1}"
    export_subnet(static, arch, folder, card=card, opset=17, formats=formats, converter=converter, int8=int8)
    return folder, static


def tiny_space(num_classes: int) -> SearchSpace:
    return TINY.with_classes(num_classes)


def tiny_predictor(space: SearchSpace, device: Any) -> Any:
    """A latency predictor of `space` from blocks really timed on `device` (a DeviceParams).

    What `evit lut` does for a preset space, in miniature: each distinct block is built and
    timed on its own; a subnet's prediction is the sum over its blocks.
    """
    import functools

    from evit.latency.coverage import unique_blocks
    from evit.latency.devices import Item, get_device
    from evit.latency.predictor import LatencyPredictor
    from evit.nn.static import build_block

    blocks = unique_blocks(space)
    items = [Item(functools.partial(build_block, b, 0.0), (1, b.c_in, b.h, b.h), key=b.key) for b in blocks]
    measured = get_device(device).measure_many(items)
    return LatencyPredictor(space, {b.key: m.median_ms for b, m in zip(blocks, measured)}, device=device.name)
