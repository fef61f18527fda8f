"""Fine-tuning from a trained supernet (`train.init`, `evit train --init`): issue 23.

Unit tests load weights into real supernets; the slow tests run the real stages: the shared
reference fixture imported, fine-tuned on 3 new classes, then LUT, search, export and
registration; and an evit checkpoint through the Prefect flow, whose cache (DVC's view)
reruns training exactly when the init file's content changes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from evit.config import parse_params
from evit.errors import CheckpointError
from evit.nn.supernet import Supernet
from evit.space import get_space
from evit.train import checkpoint as ckpt_mod
from evit.train.warm_start import (
    apply_init,
    check_init_file,
    check_init_target,
    read_init,
    stem_parameters,
)
from flows import dvcfile
from tests.flow_helpers import flow_env, prefect_home, shared_mlflow_db  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "reference-supernet"


def _final(path: Path, net: Supernet, kind: str = "final") -> Path:
    """A supernet checkpoint in the layout `evit train` writes (the fields warm start reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt_mod.save_checkpoint(path, {"kind": kind, "space": net.space.to_dict(), "model": net.state_dict()})
    return path


def test_init_loads_every_weight_and_reinitialises_a_new_classifier(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = Supernet(get_space("cpu", num_classes=10))
    init = _final(tmp_path / "pre.pt", source)
    torch.manual_seed(1)
    target = Supernet(get_space("cpu", num_classes=3))
    own_head = {k: v.clone() for k, v in target.state_dict().items() if k in target.classifier_keys()}
    info = apply_init(target, read_init(init, target.space), init)
    assert info["init_classifier"] == "re-initialised"
    got, want = target.state_dict(), source.state_dict()
    for k, v in got.items():
        if k in own_head:
            assert torch.equal(v, own_head[k]) and v.shape[0] == 3
        else:
            assert torch.equal(v, want[k]), k
    same = Supernet(get_space("cpu", num_classes=10))
    assert apply_init(same, read_init(init, same.space), init)["init_classifier"] == "kept"
    assert all(torch.equal(v, want[k]) for k, v in same.state_dict().items())
    # the stem is what freeze_stem_epochs holds: the first conv and the stem blocks, nothing else
    names = {n for n, p in target.named_parameters() if any(p is q for q in stem_parameters(target))}
    assert names and all(n.startswith(("first_conv.", "stem.")) for n in names)


def test_bad_init_files_are_one_line_errors(tmp_path: Path) -> None:
    space = get_space("cpu", num_classes=3)
    with pytest.raises(CheckpointError, match="train.init .*missing.pt"):
        check_init_file(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        check_init_file(tmp_path / "garbage.pt")
    rolling = _final(tmp_path / "last.pt", Supernet(space), kind="last")
    with pytest.raises(CheckpointError, match="rolling training checkpoint"):
        check_init_file(rolling)
    other = _final(tmp_path / "imagenet.pt", Supernet(get_space("cpu", num_classes=3).with_levels((5, 10))))
    read_init(other, space)  # levels do not shape weights: accepted
    wide = parse_params({"space": {"preset": "imagenet"}})
    from evit.resolve import space_from_params

    with pytest.raises(CheckpointError, match="another search space"):
        read_init(other, space_from_params(wide.space, 3))
    # a state that does not fit: every kind of mismatch is named, on one line
    net = Supernet(space)
    state = dict(net.state_dict())
    state.pop("first_conv.body.conv.weight")
    state["extra.weight"] = torch.zeros(1)
    state["head.fc.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError) as err:
        apply_init(Supernet(space), state, "x.pt")
    msg = str(err.value)
    assert "\n" not in msg and "missing first_conv.body.conv.weight" in msg and "unexpected extra.weight" in msg
    assert "mis-shaped head.fc.weight (2, 2)" in msg
    with pytest.raises(CheckpointError, match="copy it elsewhere"):
        check_init_target(tmp_path / "models" / "supernet.pt", tmp_path / "models")


def test_the_init_content_not_its_path_is_in_the_params_hash(tmp_path: Path) -> None:
    a = _final(tmp_path / "a.pt", Supernet(get_space("cpu", num_classes=3)))
    b = tmp_path / "elsewhere" / "b.pt"
    b.parent.mkdir()
    shutil.copy(a, b)
    h = {p: ckpt_mod.params_hash(parse_params({"train": {"init": str(p)}}), "data") for p in (a, b)}
    assert h[a] == h[b] != ckpt_mod.params_hash(parse_params({}), "data")
    torch.manual_seed(5)
    _final(b, Supernet(get_space("cpu", num_classes=3)))
    assert ckpt_mod.params_hash(parse_params({"train": {"init": str(b)}}), "data") != h[a]


def test_dvc_yaml_has_the_init_file_as_a_train_dependency(tmp_path: Path) -> None:
    doc = yaml.safe_load(dvcfile.render(parse_params({"train": {"init": "pretrained/supernet.pt"}}),
                                        "params.yaml", tmp_path))
    assert "pretrained/supernet.pt" in doc["stages"]["train"]["deps"]
    assert len(yaml.safe_load(dvcfile.render(parse_params({}), "params.yaml", tmp_path))["stages"]["train"]["deps"]) == 1


# --- the real stages ------------------------------------------------------------------------------

THREE_CLASSES = {"train": {"iris": 24, "rose": 24, "tulip": 24}, "val": {"iris": 6, "rose": 6, "tulip": 6}}


@pytest.mark.slow
@pytest.mark.skipif(not (FIXTURE / "reference_supernet.safetensors").is_file(), reason="reference fixture not found")
def test_finetune_the_imported_reference_supernet_then_lut_search_export(
        tiny_params: Any, image_folder: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Import -> fine-tune on 3 classes (the fixture has 10) -> LUT -> search -> export -> registered."""
    from evit import stages
    from evit.config import load_params
    from evit.registry import fetch
    from evit.train.import_reference import import_reference
    from evit.train.logbook import read_step_log

    images = image_folder(tmp_path / "images", **THREE_CLASSES)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = tiny_params({
        "data": {"source": str(images), "out_dir": "data/prepared"},
        "space": {"preset": "reference", "reference_config": str(FIXTURE / "space.json"), "levels": [1, 2, 4, 8],
                  "tolerance": 0.5},
        "train": {"init": "pretrained/reference.pt", "epochs": 1, "batch_size": 16, "steps_per_epoch": 1,
                  "bn_calib_batches": 1, "device": "cpu", "warmup_epochs": 0, "freeze_stem_epochs": 1},
        "devices": [{"name": "cpu-1t", "kind": "torch-cpu", "warmup": 1, "repeats": 3, "rounds": 1,
                     "validate_subnets": 10, "lut_mode": "sampled", "sample_subnets": 12, "budgets_ms": [50.0]}],
        "search": {"population": 6, "generations": 1, "top_k": 3, "mutations": 2, "crossovers": 2,
                   "bn_calib_batches": 1, "eval_batch_size": 64},
        "export": {"register_model": True, "formats": ["onnx"]},
    })
    import_reference(FIXTURE / "reference_supernet.safetensors", FIXTURE / "space.json",
                     Path("pretrained/reference.pt"))
    params = load_params(path)
    stages.prepare(params)
    from evit.resolve import space_for

    init_state = read_init("pretrained/reference.pt", space_for(params))
    out = stages.train(params)
    rows = read_step_log(Path("models") / "train-steps.jsonl")
    assert rows and all(torch.isfinite(torch.tensor(v)) for r in rows for k, v in r.items() if k.startswith("loss/"))
    trained, meta = ckpt_mod.load_supernet(Path("models/supernet.pt"))
    state = trained.state_dict()
    assert state["classifer.weight"].shape[0] == 3 and meta["space"]["num_classes"] == 3
    changed = [k for k, v in state.items() if k in init_state and v.is_floating_point()
               and not torch.equal(v, init_state[k])]
    assert changed, "one training step changed no weight"
    stem = {k for k in state if k.startswith(("first_conv.", "first_conv_bn.", "conv_stem."))
            and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert stem and not stem & set(changed)  # freeze_stem_epochs: 1 held the stem
    assert out["steps"] == 1
    stages.lut(params, "cpu-1t")
    stages.search(params, "cpu-1t")
    exported = stages.export(params, "cpu-1t")
    assert exported["exported"] and len(exported["registered"]) == len(exported["exported"])
    got = fetch.fetch_model(params, "evit-cpu-1t@champion", "onnx", tmp_path / "fetched")
    assert got["card"]["space"]["variant"] == "reference" and got["card"]["space"]["num_classes"] == 3


@pytest.mark.slow
def test_finetune_an_evit_checkpoint_through_the_flow_and_its_cache(
        tiny_params: Any, image_folder: Any, flow_env: Path, tmp_path: Path) -> None:
    """An evit supernet (digits, 10 classes) -> `train.init` of a 3-class project's flow: it runs end
    to end, re-runs nothing when nothing changed, and retrains exactly when the init content changes
    (the Prefect cache is DVC's view of the stage, so `dvc status` and the flow agree)."""
    from evit import stages
    from evit.config import load_params
    from flows import dvcrepo
    from flows.pipeline import run_pipeline
    from tests.flow_helpers import tiny

    pre = tiny_params(tiny(train={**tiny()["train"], "out_dir": "pretrain"}), name="pretrain.yaml")
    stages.prepare(load_params(pre))
    stages.train(load_params(pre))
    Path("pretrained").mkdir()
    shutil.copy("pretrain/supernet.pt", "pretrained/digits.pt")

    images = image_folder(tmp_path / "images", **THREE_CLASSES)
    cfg = tiny(data={"source": str(images), "out_dir": "data/flowers"},
               train={**tiny()["train"], "init": "pretrained/digits.pt", "freeze_stem_epochs": 1},
               export={"formats": ["onnx"], "model_name": "evit-ft-{device}"}, baselines={"models": []})
    path = tiny_params(cfg)
    all_stages = ["prepare", "train", "lut", "search", "export"]
    first = run_pipeline(str(path), stages=all_stages)
    assert first["ran"] == sorted(["prepare", "train", "lut@cpu-1t", "search@cpu-1t", "export@cpu-1t"]), first
    assert ckpt_mod.load_supernet(Path("models/supernet.pt"))[1]["space"]["num_classes"] == 3
    assert run_pipeline(str(path), stages=all_stages)["ran"] == []

    torch.manual_seed(7)  # another supernet of the same space at the same path
    _final(Path("pretrained/digits.pt"), Supernet(ckpt_mod.load_supernet(Path("pretrained/digits.pt"))[0].space))
    state = dvcrepo.stage_state(Path.cwd(), "train", restore=False)
    assert not state.up_to_date and "dependencies" in state.reason
    assert run_pipeline(str(path), stages=["prepare", "train"])["ran"] == ["train"]
