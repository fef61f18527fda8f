"""Shared by the training tests: a small prepared digits set and a config that trains in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SMALL_PER_CLASS = 40
"""Images per class kept from digits: about 280 train, 60 search, 60 val (fast evaluations)."""


def prepare_small_digits(out: Path, fmt: str = "npy") -> Path:
    from evit.config import parse_params
    from evit.data.prepare import prepare_data

    prepare_data(parse_params({"data": {"out_dir": str(out), "max_per_class": SMALL_PER_CLASS, "format": fmt}}))
    return out


def tiny_overrides(prepared: Path, **train: Any) -> dict[str, Any]:
    """Two FLOPs levels, batch 16, 3 steps per epoch, 2 epochs, checkpoints every 2 steps."""
    t = {"epochs": 2, "batch_size": 16, "steps_per_epoch": 3, "checkpoint_every": 2, "bn_calib_batches": 1,
         "bank_capacity": 4, "bank_capacity_big": 4,
         "elastic_compressed": {"bank_capacity": 4, "rescore_per_epoch": 1, "rescore_entries": 2}, "log_every": 2, "warmup_epochs": 1,
         "device": "cpu"}
    t.update(train)
    return {"data": {"out_dir": str(prepared)}, "space": {"levels": [3, 6], "tolerance": 0.5}, "train": t}
