"""A training run killed with SIGKILL and resumed ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, deep_merge
from train_helpers import prepare_small_digits, tiny_overrides

pytestmark = pytest.mark.slow


def _project(root: Path, overrides: dict) -> Path:
    root.mkdir(parents=True)
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(deep_merge(base, overrides), sort_keys=False))
    return root


def _env(root: Path) -> dict[str, str]:
    env = os.environ.copy()
    # one MLflow database for both projects (created once; the runs are sequential)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", EVIT_LOG_LEVEL="WARNING",
               MLFLOW_TRACKING_URI=f"sqlite:///{root.parent / 'mlflow.db'}")
    env.pop("EVIT_PARAMS", None)
    return env


def _train(root: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "evit.cli", "train", "-p", "params.yaml"], cwd=root,
                            env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen[bytes]) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode())


def _states(root: Path) -> tuple[dict, dict]:
    last = torch.load(root / "models/last.pt", weights_only=True)
    final = torch.load(root / "models/supernet.pt", weights_only=True)
    return last, final


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max |diff| {float((a[k] - b[k]).abs().max())})"


@pytest.mark.parametrize("fmt", ["npy", "shards"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path: Path, fmt: str) -> None:
    data = prepare_small_digits(tmp_path / "prepared", fmt)
    # 2 epochs x 4 steps, a checkpoint every 3 steps (so the kill lands mid-epoch), elastic banks
    # filling, re-scoring and mixup all active: everything that draws random numbers. The shards
    # run decodes in 2 DataLoader workers (resume is exact at the sample level for both formats).
    overrides = tiny_overrides(data, epochs=2, steps_per_epoch=4, checkpoint_every=3, mixup_alpha=0.2,
                               exploit_p_start=0.5, bank_capacity=2, bank_capacity_big=2,
                               elastic_compressed={"bank_capacity": 2, "rescore_per_epoch": 1, "rescore_entries": 2},
                               eval_every_epochs=2, workers=2 if fmt == "shards" else 0,
                               # both bank variants: the reference's scores its explored draws and re-scores
                               # whole banks with extra no-grad forwards (under mixup), which must not drift
                               sampler="elastic" if fmt == "shards" else "elastic-compressed")
    ref_root = _project(tmp_path / "uninterrupted", overrides)
    kill_root = _project(tmp_path / "killed", overrides)

    ref = _finish(_train(ref_root))
    assert ref["steps"] == 8

    proc = _train(kill_root)
    last = kill_root / "models/last.pt"
    deadline = time.monotonic() + 300
    while not last.exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(last, weights_only=True)["step"]
    assert 0 < killed_at < 8 and not (kill_root / "models/supernet.pt").exists()

    resumed = _finish(_train(kill_root))
    assert resumed["steps"] == 8 and resumed["resumed_from_step"] == killed_at

    (ref_last, ref_final), (res_last, res_final) = _states(ref_root), _states(kill_root)
    _assert_same(ref_last["model"], res_last["model"], "raw weights")
    _assert_same(ref_last["ema"], res_last["ema"], "EMA weights")
    _assert_same(ref_final["model"], res_final["model"], "final weights")
    assert ref_final["weights"] == res_final["weights"]
    assert ref_last["sampler"] == res_last["sampler"]  # banks, levels and RNG streams
    assert ref_last["draw_digest"] == res_last["draw_digest"]
    for sa, sb in zip(ref_last["optimizer"]["state"].values(), res_last["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k]))
    # the step logs describe the same run (the killed steps after the checkpoint are dropped)
    def losses(root: Path) -> list[dict]:
        rows = [json.loads(x) for x in (root / "models/train-steps.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k.startswith(("loss/", "hard_ce/", "flops/")) or k == "step"}
                for r in rows]

    assert losses(ref_root) == losses(kill_root)
    assert ref["top1"] == resumed["top1"]
