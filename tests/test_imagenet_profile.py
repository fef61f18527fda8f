"""params.imagenet.yaml end to end on this machine: the paper space and every paper sampler
setting, tiny data, budget knobs only (params.smoke.yaml through `--set`).

A tiny ImageFolder of 224-px images is made here; the teacher is a small timm model saved
to a local state_dict file (nothing is downloaded). Every stage runs through the real CLI:
prepare, train (elastic sampler + teacher), lut (sampled) on the CPU device of the profile,
search (plus the released T1 and S1 of `search.fixed_archs`), export, registry (MLflow,
sqlite), fetch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evit.cli import app
from evit.released import RELEASED
from tests.conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cpu-4t"


def _run(args: list[str]) -> dict:
    t0 = time.perf_counter()
    out = CliRunner().invoke(app, args, catch_exceptions=False)
    assert out.exit_code == 0, out.output[-3000:]
    print(f"{' '.join(args[:3])}: {time.perf_counter() - t0:.1f} s")
    return json.loads(out.stdout)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 593 s on 2 cores at load average ~12
def test_imagenet_profile_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import timm
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EVIT_OVERRIDES", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = write_image_folder(tmp_path / "tiny", train={"n01": 9, "n02": 9, "n03": 9},
                              val={"n01": 2, "n02": 2, "n03": 2}, size=(224, 224))
    teacher = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    params = str(REPO / "params.imagenet.yaml")
    base = ["-p", params, "--set", str(REPO / "params.smoke.yaml"), "--set", f"data.source={data}"]
    teachers = f"train.teachers=[{{model: test_resnet, weights: {tmp_path / 'teacher.pth'}, temperature: 0.2}}]"
    profile = yaml.safe_load(Path(params).read_text())
    assert profile["space"]["flops_convention"] == "reference" and profile["train"]["sampler"] == "elastic-compressed"

    prepared = _run(["prepare", *base])
    assert prepared["num_classes"] == 3
    trained = _run(["train", *base, "--set", teachers])
    assert trained["steps"] == 2
    report = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert [k for k in report if k.endswith("_min")] == [f"top1_level{i}_min" for i in range(8)]  # paper levels
    lut = _run(["lut", "-d", DEVICE, *base])
    assert json.loads((tmp_path / "luts" / f"{DEVICE}.json").read_text())["mode"] == "sampled", lut
    _run(["search", "-d", DEVICE, *base])
    result = json.loads((tmp_path / "results" / f"search-{DEVICE}" / "result.json").read_text())
    assert result["space"]["flops_convention"] == "reference"
    by_label = {b["label"]: b for b in result["budgets"]}
    assert by_label["t1"]["key"] == RELEASED["T1"].arch.key and by_label["s1"]["fixed"]
    # the paper's 62.915 M at 1000 classes; this data has 3 (the classifier: 1984 x 997 MACs fewer)
    assert by_label["t1"]["flops_m"] == pytest.approx(62.915 - 1984 * 997 / 1e6, abs=0.001)
    flops_budgets = [b for b in result["budgets"] if b["budget"]["kind"] == "flops" and b["feasible"]]
    assert flops_budgets and all(b["flops_m"] <= b["budget"]["value"] for b in flops_budgets)

    exported = _run(["export", "-d", DEVICE, *base])
    labels = {r["label"] for r in exported["registered"]}
    assert {"t1", "s1"} <= labels and len(labels) >= 3
    card = json.loads((tmp_path / "exports" / DEVICE / "s1" / "card.json").read_text())
    assert card["budget"]["text"] == "arch S1" and card["arch_key"] == RELEASED["S1"].arch.key

    # a released model exported on demand, beside the others, with the same card and aliases
    extra = _run(["export", "-d", DEVICE, *base, "--arch", "T2"])
    assert [r["label"] for r in extra["registered"]] == ["t2"]
    index = json.loads((tmp_path / "exports" / DEVICE / "index.json").read_text())
    assert {"t1", "s1", "t2"} <= {e["label"] for e in index["subnets"]}

    model = exported["model_name"]
    fetched = _run(["fetch", f"{model}@t2", "--format", "onnx", "--out", str(tmp_path / "fetched"), "--card", *base])
    assert fetched["card"]["arch_key"] == RELEASED["T2"].arch.key and "t2" in fetched["aliases"]
    assert (tmp_path / "fetched" / "model.onnx").stat().st_size > 0
