"""Start supernet training from a trained supernet (`train.init`): fine-tuning on new data.

The realistic user adapts a supernet someone trained at great cost (the paper's through
`evit import-reference`, or one evit trained on a large dataset) to their own classes.
What carries over and what does not:
- every weight of the supernet loads exactly; a missing, unexpected or mis-shaped key is
  an error naming it (a half-loaded supernet would train without telling anyone);
- the classifier is re-initialised when the number of classes differs and kept when it
  matches (same classes: continued training);
- memory banks, optimiser state, schedule and step counter start fresh: this is a new run
  on new data, not a resume (`models/last.pt` is that);
- the init file's content hash is part of the run's params hash (`init_sha256`), so a
  different init retrains and the same one is a cache hit (DVC has it as a dependency).

`train.freeze_stem_epochs` keeps the stem (first conv and the stem blocks) fixed for the
first epochs, as timm fine-tuning recipes freeze early layers while the new head settles.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from evit.errors import CheckpointError
from evit.io import MAX_CHECKPOINT_BYTES, check_input_file
from evit.nn.supernet_base import SupernetBase
from evit.space import SearchSpace
from evit.train.checkpoint import check_space, load_checkpoint

log = logging.getLogger(__name__)

SHOWN_KEYS = 4
"""Keys named per kind of mismatch in the one-line error (then "and N more")."""


def check_init_file(path: str | Path) -> dict[str, Any]:
    """The init checkpoint, if it is a finished or imported supernet checkpoint (one-line errors)."""
    p = check_input_file(path, "train.init", max_bytes=MAX_CHECKPOINT_BYTES, error=CheckpointError)
    ckpt = load_checkpoint(p)
    if ckpt.get("kind") == "last":
        raise CheckpointError(f"train.init: {p} is a rolling training checkpoint; give the finished "
                              "supernet (models/supernet.pt) or one written by `evit import-reference`")
    if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("space"), dict):
        raise CheckpointError(f"train.init: {p} holds no supernet weights and space ('model', 'space')")
    return ckpt


def read_init(path: str | Path, space: SearchSpace) -> dict[str, Tensor]:
    """The init checkpoint's weights, after checking it is a supernet of `space` (classes aside)."""
    ckpt = check_init_file(path)
    found = ckpt["space"]
    check_space(found, space.with_classes(int(found.get("num_classes", space.num_classes))), Path(path))
    return ckpt["model"]


def check_init_target(init: str | Path, train_dir: Path) -> None:
    """The init file must not live in the train stage's own output folder (training rewrites it,
    and DVC cannot track one path as both the stage's dependency and its output)."""
    if Path(init).resolve().is_relative_to(train_dir.resolve()):
        raise CheckpointError(f"train.init: {init} is inside {train_dir}/, which training rewrites; copy it "
                              "elsewhere first (e.g. `cp models/supernet.pt pretrained/`) and point train.init there")


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def apply_init(module: SupernetBase, state: dict[str, Tensor], path: str | Path) -> dict[str, Any]:
    """Load `state` into `module`: all weights exactly, the classifier only when its classes match.

    Returns what happened (for the log and the run's params).
    """
    own = module.state_dict()
    head = set(module.classifier_keys())
    missing = sorted(k for k in own if k not in state and k not in head)
    unexpected = sorted(k for k in state if k not in own)
    misshaped = sorted(k for k in own if k in state and k not in head and tuple(state[k].shape) != tuple(own[k].shape))
    problems = []
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    if misshaped:
        problems.append("mis-shaped " + _listing([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                                  for k in misshaped]))
    if problems:
        raise CheckpointError(f"train.init: {path} does not fit this supernet: {'; '.join(problems)}")
    same_head = all(k in state and tuple(state[k].shape) == tuple(own[k].shape) for k in head)
    merged = {k: (state[k] if (k not in head or same_head) else own[k]) for k in own}
    with torch.no_grad():
        module.load_state_dict(merged, strict=True)
    info = {"init_classifier": "kept" if same_head else "re-initialised", "init_tensors": len(own)}
    log.info("train.init: %s loaded (%d tensors; classifier %s)", path, len(own), info["init_classifier"])
    return info


def stem_parameters(module: SupernetBase) -> list[nn.Parameter]:
    """The parameters `train.freeze_stem_epochs` holds fixed (first conv + stem blocks)."""
    prefixes = module.stem_prefixes()
    return [p for name, p in module.named_parameters() if name.startswith(prefixes)]
