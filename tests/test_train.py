"""Supernet training in-process on a tiny config: stage outputs, MLflow, checkpoints, evaluation, one step."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import prepare_small_digits, tiny_overrides

from evit.config import load_params
from evit.errors import CheckpointError
from evit.resolve import space_from_params
from evit.space import get_space


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_small_digits(tmp_path_factory.mktemp("small-digits") / "prepared")


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.mark.slow
def test_train_stage_outputs_mlflow_and_downstream_loaders(tiny_params, small_digits, mlflow_uri, tmp_path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from evit.train.banks import load_banks
    from evit.train.checkpoint import load_checkpoint, load_supernet
    from evit.train.logbook import read_step_log
    from evit.train.stage import train_supernet

    params = load_params(tiny_params(tiny_overrides(small_digits)))
    out = train_supernet(params, resume=True)
    assert out["steps"] == 6 and out["sampler"] == "elastic-compressed" and out["weights"] in ("ema", "raw")
    assert set(out["top1"]) == {"level0/min", "level0/draw", "level1/min", "level1/draw"}
    assert all(0.0 <= v <= 1.0 for v in out["top1"].values())
    for f in ("models/supernet.pt", "models/last.pt", "models/banks.json", "models/train-steps.jsonl",
              "metrics/train.json", "plots/train-loss.png", "plots/train-flops.png"):
        assert (tmp_path / f).is_file(), f
    rows = read_step_log(tmp_path / "models/train-steps.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert {"loss/level0", "loss/min", "flops/level0", "hard_ce/level2", "lr", "level", "exploit_p"} <= set(rows[0])
    space = space_from_params(params.space, 10)
    for r in rows:
        lo, hi = space.level_window(r["level"])
        assert lo <= r["flops/level0"] <= hi

    # downstream: the final checkpoint loads as a supernet, banks load as archs inside their levels
    net, meta = load_supernet("models/supernet.pt")
    assert meta["weights"] == out["weights"] and meta["data_hash"] == out["data_hash"] and meta["step"] == 6
    assert net.space.levels == (3, 6)
    banks = load_banks("models/supernet.pt")
    assert banks and all(banks.values())
    for lv, items in banks.items():
        lo, hi = net.space.level_window(lv)
        from evit import flops

        assert all(lo <= flops.flops_m(a, net.space) <= hi for a, _ in items)
        assert [s for _, s in items] == sorted((s for _, s in items), reverse=True)
    last = load_checkpoint("models/last.pt")
    assert last["step"] == 6 and last["rng"]["torch"].dtype == torch.uint8

    # MLflow: params, per-step metrics, per-epoch top-1, artifacts
    mlflow.set_tracking_uri(mlflow_uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name(params.tracking.experiment)
    run = client.search_runs([exp.experiment_id], filter_string="tags.`evit.stage` = 'train'")[0]
    assert run.data.params["train.sampler"] == "elastic-compressed"
    assert len(client.get_metric_history(run.info.run_id, "loss/level0")) == 6
    assert client.get_metric_history(run.info.run_id, "top1/mean")
    assert "top1_mean" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"banks.json", "checkpoint.json", "train-loss.png", "train-flops.png", "train-steps.jsonl"} <= arts
    assert run.data.tags["evit.checkpoint_sha256"]

    # a second call resumes the finished run: no further steps, same final weights
    again = train_supernet(params, resume=True)
    assert again["steps"] == 6 and again["resumed_from_step"] == 6


@pytest.mark.slow
def test_checkpoint_errors_are_clear(tiny_params, small_digits, mlflow_uri, tmp_path) -> None:
    from evit.train.checkpoint import load_checkpoint, load_supernet, save_checkpoint
    from evit.train.loop import Trainer

    params = load_params(tiny_params(tiny_overrides(small_digits, epochs=1, steps_per_epoch=2,
                                                    checkpoint_every=1)))
    Trainer(params, resume=False, progress=False).fit()
    last = tmp_path / "models/last.pt"
    # another space (other number of classes) -> clear error naming the spaces
    with pytest.raises(CheckpointError, match="another search space"):
        load_supernet(tmp_path / "models/supernet.pt", space=get_space("cpu", num_classes=7))
    # other train params -> resume refuses to mix configurations
    changed = load_params(tiny_params(tiny_overrides(small_digits, epochs=1, steps_per_epoch=2,
                                                     checkpoint_every=1, lr=0.01)))
    with pytest.raises(CheckpointError, match="other train/space params"):
        Trainer(changed, resume=True, progress=False).fit()
    # truncated file -> CheckpointError, not a torch traceback
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(last)
    # (with a readable models/last.prev.pt the trainer resumes that one: tests/test_cancel.py)
    (tmp_path / "models/last.prev.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Trainer(params, resume=True, progress=False).fit()
    # a torch file that is not ours
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not an evit supernet checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    # --fresh ignores (and removes) the broken rolling checkpoint
    Trainer(params, resume=False, progress=False).fit()
    assert load_checkpoint(last)["step"] == 2
    save_checkpoint(tmp_path / "x.pt", {"space": {}, "n": 1})
    assert load_checkpoint(tmp_path / "x.pt")["n"] == 1


def test_evaluate_subnet_recalibrates_a_copy_and_is_deterministic(small_digits) -> None:
    from evit.data.loader import PreparedData
    from evit.evaluate import evaluate_subnet, recalibrate_bn
    from evit.nn.static import extract
    from evit.nn.supernet import Supernet

    data = PreparedData(small_digits)
    space = get_space("cpu", num_classes=data.num_classes)
    torch.manual_seed(0)
    net = Supernet(space)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    arch = space.sample_uniform(random.Random(3))
    rng_before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    a = evaluate_subnet(net, arch, data, "search", 2, 32, seed=0)
    b = evaluate_subnet(net, arch, data, "search", 2, 32, seed=0)
    assert a == b and 0.0 <= a <= 1.0
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the supernet's BN stats are untouched
    assert random.getstate() == rng_before[0] and np.array_equal(np.random.get_state()[1], rng_before[1])
    assert torch.equal(torch.get_rng_state(), rng_before[2])

    # recalibration is a cumulative average of the batch statistics
    static = extract(net, arch)
    x = torch.randn(48, 3, arch.resolution, arch.resolution)
    first_bn = next(m for m in static.modules() if isinstance(m, torch.nn.BatchNorm2d))
    means = []
    hook = first_bn.register_forward_hook(lambda m, i, o: means.append(i[0].mean(dim=(0, 2, 3))))
    used = recalibrate_bn(static, (x, torch.zeros(48, dtype=torch.long)), batches=3, batch_size=16)
    hook.remove()
    assert used == 3 and not static.training
    assert torch.allclose(first_bn.running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert first_bn.momentum == 0.1 or first_bn.momentum is not None


def test_one_step_accumulates_every_backward_into_the_same_gradients() -> None:
    from evit.nn.supernet import Supernet
    from evit.train.losses import AdaptiveAlphaDivergence
    from evit.train.samplers import Draw
    from evit.train.step import StepConfig, StepRunner, resize

    space = get_space("cpu", num_classes=10)
    torch.manual_seed(0)
    net = Supernet(space).double()
    rng = random.Random(0)
    archs = [space.sample_uniform(rng) for _ in range(3)]
    draws = [Draw(f"level{i}", a, False, 0) for i, a in enumerate(archs)] + [Draw("min", space.smallest(), True, 0)]
    x = torch.randn(8, 3, 48, 48, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    runner = StepRunner(net, space, StepConfig(label_smoothing=0.1), torch.device("cpu"))
    results = runner.run(x, y, draws)
    together = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert [r.draw.role for r in results] == ["level0", "level1", "level2", "min"]
    # the same losses, one backward each, summed by hand
    net.zero_grad(set_to_none=True)
    total: dict[str, torch.Tensor] = {}
    probs = []
    kd = AdaptiveAlphaDivergence()
    for d in draws:
        net.zero_grad(set_to_none=True)
        logits = net(resize(x, d.arch.resolution), d.arch).float()  # the runner's losses are float32
        if d.distill:
            loss, _ = kd(logits, torch.stack(probs).mean(0))
        else:
            loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
            probs.append(torch.softmax(logits.detach(), -1))
        loss.backward()
        for n, p in net.named_parameters():
            if p.grad is not None:
                total[n] = total.get(n, 0) + p.grad
    assert set(total) == set(together)
    for n in total:
        assert torch.allclose(total[n], together[n], rtol=1e-9, atol=1e-12), n


@pytest.mark.slow
def test_mixup_and_teacher_train(tiny_params, small_digits, mlflow_uri, tmp_path) -> None:
    import timm

    from evit.train.loop import Trainer

    teacher = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    params = load_params(tiny_params({
        **tiny_overrides(small_digits, epochs=1, steps_per_epoch=2, mixup_alpha=0.2, sampler="uniform",
                         teacher={"model": "test_resnet", "weights": str(tmp_path / "teacher.pth"),
                                  "temperature": 0.5}),
        "space": {"levels": [3], "tolerance": 0.5}}))
    res = Trainer(params, resume=False, progress=False).fit()
    assert res.summary["steps"] == 2 and res.summary["sampler"] == "uniform"
    assert res.banks == {}
    from evit.train.logbook import read_step_log

    rows = read_step_log(tmp_path / "models/train-steps.jsonl")
    assert {"loss/max", "loss/min", "loss/rand0", "loss/rand1"} <= set(rows[0])
    assert all(np.isfinite(r["loss/max"]) and np.isfinite(r["hard_ce/max"]) for r in rows)


def test_plot_legends_say_what_the_roles_are() -> None:
    from evit.train.logbook import role_label

    assert role_label("level0") == "subnet 1 drawn at the step's FLOPs level"  # a sample slot, not a FLOPs level
    assert role_label("rand1") == "uniform random subnet 2"
    assert role_label("min").startswith("smallest subnet") and role_label("max") == "largest subnet"
