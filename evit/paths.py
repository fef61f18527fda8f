"""Where each stage reads and writes: one place, shared by the CLI, Prefect and dvc.yaml.

All paths are relative to the project root (the working directory), as DVC expects.
"""

from __future__ import annotations

from pathlib import Path

from evit.config import Params


def prepared_dir(p: Params) -> Path:
    return Path(p.data.out_dir)


def manifest_path(p: Params) -> Path:
    return prepared_dir(p) / "manifest.json"


def train_dir(p: Params) -> Path:
    return Path(p.train.out_dir)


def checkpoint_path(p: Params) -> Path:
    """The final supernet checkpoint (what later stages depend on)."""
    return train_dir(p) / "supernet.pt"


def resume_path(p: Params) -> Path:
    """The rolling checkpoint a killed training run resumes from."""
    return train_dir(p) / "last.pt"


def lut_path(p: Params, device: str) -> Path:
    return Path("luts") / f"{device}.json"


def lut_metrics_path(device: str) -> Path:
    return Path("metrics") / f"lut-{device}.json"


def train_metrics_path() -> Path:
    return Path("metrics") / "train.json"


def search_dir(p: Params, device: str) -> Path:
    return Path(p.search.out_dir) / f"search-{device}"


def search_metrics_path(device: str) -> Path:
    return Path("metrics") / f"search-{device}.json"


def export_dir(p: Params, device: str) -> Path:
    return Path(p.export.out_dir) / device


def export_metrics_path(device: str) -> Path:
    return Path("metrics") / f"export-{device}.json"


def plots_dir() -> Path:
    return Path("plots")


def ablation_dir(p: Params) -> Path:
    return Path(p.ablate.out_dir)


def baselines_dir(p: Params) -> Path:
    return Path(p.baselines.out_dir)


def baselines_result_path(p: Params) -> Path:
    return Path(p.baselines.results)


def baselines_metrics_path() -> Path:
    return Path("metrics") / "baselines.json"
