"""Training checkpoints: atomic writes, safe loads, clear errors.

Two kinds, one format (a dict of tensors and plain containers, loadable with
`torch.load(weights_only=True)`; no pickled modules or classes):

- `models/last.pt` (rolling, every `train.checkpoint_every` steps, and on SIGTERM/SIGINT):
  the one it replaces is kept as `models/last.prev.pt`, so a truncated or corrupt
  `last.pt` (a full disk, a copy cut short) is reported and the previous one is resumed
  instead of losing the whole run (`load_rolling`). Everything needed to
  continue bit-for-bit: supernet weights, optimizer, scheduler, EMA weights, sampler
  state (RNG streams, level, memory banks), the global RNG states (Python, NumPy,
  torch CPU/CUDA), the data position (epoch + batch inside it; each epoch's order is a
  pure function of (seed, epoch), see `evit.data.loader.SeededSampler`), the metric
  history, and the hash of the params that shaped the run.
- `models/supernet.pt` (final, what search/export use): `model` holds the weights to use
  downstream (`meta["weights"]` says whether they are the EMA or the raw weights: the
  better of the two on the per-level evaluation), plus the banks, the space, the data
  manifest's content_hash and the final evaluation.

A file from another search space, written with other params (on resume), or truncated /
corrupt raises `CheckpointError` naming the file and what to do.
"""

from __future__ import annotations

import functools
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evit.errors import CheckpointError


class CorruptCheckpointError(CheckpointError):
    """The file is missing, truncated or not a torch checkpoint at all (unlike a checkpoint of
    other params or another space, which is readable but must not be resumed)."""
from evit.io import (
    MAX_CHECKPOINT_BYTES,
    atomic_path,
    check_input_file,
    sha256_file,
    sha256_json,
)
from evit.resolve import restore_space
from evit.space import NON_STRUCTURAL, SearchSpace

log = logging.getLogger(__name__)

FORMAT = "evit-supernet-checkpoint/1"

HASH_EXCLUDED = frozenset({"out_dir", "checkpoint_every", "eval_every_epochs", "workers", "device", "threads",
                           "log_every", "init"})
"""Train knobs that do not change what is trained (workers: augmentation is seeded per sample;
threads may change float rounding, not the recipe; init: its path, its content is hashed)."""


def recipe(train_section: dict[str, Any]) -> dict[str, Any]:
    """The `train` section less its bookkeeping knobs (`HASH_EXCLUDED`): what shapes the weights."""
    return {k: v for k, v in train_section.items() if k not in HASH_EXCLUDED}


def params_hash(params: Any, data_hash: str) -> str:
    """Hash of everything that shapes the trained weights: train (less bookkeeping), space, data,
    and the content of the supernet training starts from (`train.init`), not its path."""
    payload: dict[str, Any] = {"train": recipe(params.section("train")), "space": params.section("space"),
                               "data": data_hash}
    if params.train.init:
        payload["init_sha256"] = init_sha256(params.train.init)
    return sha256_json(payload)


@functools.lru_cache(maxsize=8)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


def init_sha256(path: str | Path) -> str:
    """Content hash of an init checkpoint (cached per path, mtime and size: params hashes ask often)."""
    p = check_input_file(path, "train.init", max_bytes=MAX_CHECKPOINT_BYTES, error=CheckpointError)
    st = p.stat()
    return _digest(str(p.resolve()), st.st_mtime_ns, st.st_size)


# --- RNG states ----------------------------------------------------------------------------------

def capture_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's device only (under torchrun each rank owns one GPU)
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


# --- space ------------------------------------------------------------------------------------------

def check_space(found: dict[str, Any], space: SearchSpace, path: Path) -> None:
    want = space.structure_dict()
    got = {k: v for k, v in found.items() if k not in NON_STRUCTURAL}
    if got != want:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise CheckpointError(
            f"{path} was trained on another search space (space '{found.get('name')}' with "
            f"{found.get('num_classes')} classes; differs in {diff}) than the configured one "
            f"('{space.name}', {space.num_classes} classes); use a checkpoint of this space, or "
            "train anew (`evit train --fresh`)")


# --- save / load -----------------------------------------------------------------------------------

def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomically write `payload` (tensors and plain containers only) to `path`."""
    payload = {"format": FORMAT, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, *, space: SearchSpace | None = None,
                    expect_hash: str | None = None) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only) and check its format, space and params hash."""
    path = Path(path)
    if not path.is_file():
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip, pickle and EOF errors all mean "corrupt"
        raise CorruptCheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt: {type(exc).__name__}: "
            f"{str(exc)[:200]}); delete it and re-run `evit train`") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        fmt = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not an evit supernet checkpoint (format {fmt!r}, expected {FORMAT!r})")
    if space is not None:
        check_space(ckpt["space"], space, path)
    if expect_hash is not None and ckpt.get("params_hash") != expect_hash:
        raise CheckpointError(
            f"{path} was written by a run with other train/space params or other data "
            f"(hash {str(ckpt.get('params_hash'))[:12]} != {expect_hash[:12]}); resuming it would mix "
            "two configurations. Restore those params, or start over with `evit train --fresh`")
    return ckpt


def previous_path(path: str | Path) -> Path:
    """Where the rolling checkpoint it replaced is kept: models/last.pt -> models/last.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_rolling(path: str | Path, payload: dict[str, Any], *, keep_previous: bool = True) -> None:
    """Write the rolling checkpoint atomically, keeping the one it replaces as `previous_path`.

    The new file is fully written before the old one moves, so at every instant at least one
    complete checkpoint exists (`load_rolling` takes the previous one if the latest is gone).
    `keep_previous=False` when the current file is known bad: it must not replace a good one.
    """
    path = Path(path)
    payload = {"format": FORMAT, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
        if keep_previous and path.is_file():
            path.replace(previous_path(path))


def rolling_exists(path: str | Path) -> bool:
    return Path(path).is_file() or previous_path(path).is_file()


def load_rolling(path: str | Path, **kwargs: Any) -> tuple[dict[str, Any], Path]:
    """Load the latest rolling checkpoint, or the previous one when the latest is corrupt.

    Returns the checkpoint and the file it came from. A corrupt latest file is reported
    (warning naming it and the fallback); if both are unusable the latest one's error is raised.
    Errors that are not corruption (other params, another space) are raised at once: the
    previous file of the same run would not fit either.
    """
    path = Path(path)
    try:
        return load_checkpoint(path, **kwargs), path
    except CorruptCheckpointError as exc:
        prev = previous_path(path)
        if not prev.is_file():
            raise
        try:
            ckpt = load_checkpoint(prev, **kwargs)
        except CorruptCheckpointError:
            raise exc from None
        if path.is_file():
            log.warning("%s is unusable (%s); resuming from the previous checkpoint %s (step %s) instead",
                        path, exc, prev, ckpt.get("step"))
        return ckpt, prev


def load_supernet(path: str | Path, space: SearchSpace | None = None,
                  map_location: str | torch.device = "cpu") -> tuple[Any, dict[str, Any]]:
    """The final supernet of a checkpoint, and its metadata (everything but the weights).

    meta keys: space (dict), weights ("ema" | "raw"), data_hash, params_hash, step,
    evaluation, banks (JSON form) and sampler.
    """
    from evit.nn.factory import build_supernet

    ckpt = load_checkpoint(path, space=space)
    sp = space if space is not None else restore_space(ckpt["space"])
    net = build_supernet(sp)
    try:
        net.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the supernet of space '{sp.name}': {str(exc)[:300]}") from None
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "ema", "optimizer", "scheduler", "rng")}
    meta.setdefault("weights", "raw")
    return net.to(map_location).eval(), meta
