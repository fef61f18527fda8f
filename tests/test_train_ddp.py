"""DDP under torchrun: 2 CPU processes (gloo) draw the same subnets and end with the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, deep_merge
from train_helpers import prepare_small_digits, tiny_overrides

pytestmark = pytest.mark.slow


def test_torchrun_two_processes_gloo(tmp_path: Path) -> None:
    data = prepare_small_digits(tmp_path / "prepared")
    root = tmp_path / "proj"
    root.mkdir()
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    overrides = tiny_overrides(data, epochs=1, steps_per_epoch=4, checkpoint_every=2, batch_size=8)
    (root / "params.yaml").write_text(yaml.safe_dump(deep_merge(base, overrides), sort_keys=False))
    env = os.environ.copy()
    env.update(OMP_NUM_THREADS="1", EVIT_LOG_LEVEL="INFO", MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    env.pop("EVIT_PARAMS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "evit.cli", "train", "-p", "params.yaml"],
        cwd=root, env=env, capture_output=True, timeout=600)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err[-4000:]
    # the end-of-run check compares the weight checksums and the sampled-arch digests of all ranks
    assert "all 2 ranks agree on weights and sampled subnets" in err
    out = proc.stdout.decode()
    summaries = [json.loads(chunk) for chunk in _json_objects(out)]
    main = next(s for s in summaries if "steps" in s)
    assert main["world_size"] == 2 and main["steps"] == 4
    assert any(s == {"rank": 1} for s in summaries)
    ck = torch.load(root / "models/last.pt", weights_only=True)
    assert ck["world_size"] == 2 and ck["step"] == 4
    # no stray files from rank 1: one step log, one set of checkpoints
    assert sorted(p.name for p in (root / "models").iterdir()) == ["banks.json", "last.prev.pt", "last.pt",
                                                                    "supernet.pt", "train-steps.jsonl"]


def _json_objects(text: str) -> list[str]:
    """Split concatenated pretty-printed JSON objects (one per rank) printed on stdout."""
    objs, depth, start = [], 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0 and start is not None:
                objs.append(text[start:i + 1])
    return objs
