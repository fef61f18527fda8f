"""The lut stage end to end on a tiny space: files, validation report, resume, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_latency_helpers import FAST, TINY, all_archs

from evit.blocks import arch_blocks
from evit.config import load_params
from evit.errors import DeviceError, LUTError
from evit.latency.coverage import covering_archs, unique_blocks
from evit.latency.lut import load_lut, partial_path
from evit.latency.predictor import LatencyPredictor
from evit.latency.stage import build_lut
from evit.space import get_space

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"n", "rmse_ms", "mape_pct", "within_10pct", "flops_within_10pct", "flops_spearman", "spearman"}


def _params(tiny_params: Any, **device: Any) -> Any:
    dev = {"name": "t1", "kind": "torch-cpu", **FAST, **device}
    return load_params(tiny_params({"devices": [dev]}))


@pytest.mark.parametrize("kind", ["torch-cpu", "onnxruntime-cpu"])
def test_build_writes_table_report_and_plots(tiny_params: Any, kind: str) -> None:
    params = _params(tiny_params, kind=kind)
    out = build_lut(params, "t1", space=TINY, track=False, progress=False)
    assert out["entries"] == 28 and out["carriers"] == 8 and out["mode"] == "full"

    lut = load_lut("luts/t1.json")
    assert lut["complete"] is True and lut["method"] == "in-context"
    assert set(lut["entries"]) == {b.key for b in unique_blocks(TINY)}
    assert lut["space"] == TINY.structure_dict() and lut["num_classes"] == 5
    assert lut["device"]["kind"] == kind and lut["device"]["hostname"] and lut["versions"]["torch"]
    assert lut["created"].startswith("20")
    e = lut["entries"]["first_conv|r16|c8|s2"]
    assert 0 < e["p10_ms"] <= e["median_ms"] <= e["p90_ms"] and e["carriers"] >= 1
    assert (lut["overhead_ms"] > 0) == (kind == "onnxruntime-cpu")
    assert not partial_path(Path("luts/t1.json")).exists()

    metrics = json.loads(Path("metrics/lut-t1.json").read_text())
    assert METRIC_KEYS <= set(metrics) and metrics["n"] == 10
    assert 0 <= metrics["within_10pct"] <= 1 and 0 <= metrics["flops_within_10pct"] <= 1
    # how it was measured: estimator, clock and the load average, in the table and the metrics
    how = lut["measurement"]
    assert how["estimator"] == metrics["estimator"] == lut["statistic"]
    assert how["clock"] == metrics["clock"] and how["load"]["cpu_count"] == metrics["cpu_count"] >= 1
    assert metrics["load_avg_1m_max"] == how["load"]["load_1m_max"] >= how["load"]["load_1m_mean"] >= 0
    assert metrics["remeasured_subnets"] >= metrics["lowered_subnets"] >= 0 and metrics["lowered_entries"] >= 0
    with open("plots/lut-t1.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 10 and {"measured_ms", "predicted_ms", "flops_m"} <= set(rows[0])
    assert Path("plots/lut-t1.png").read_bytes()[:4] == b"\x89PNG"

    pred = LatencyPredictor.load("luts/t1.json", TINY)
    archs = all_archs(TINY)
    values = pred.predict_many(archs)
    assert (values > 0).all()
    assert values[5] == pytest.approx(pred.predict(archs[5]))
    # the report's predictions are the predictor's (held-out ones when the correction is used)
    if not lut["correction"]["used"]:
        for row in rows[:3]:
            from evit.arch import Arch

            assert float(row["predicted_ms"]) == pytest.approx(pred.predict(Arch.from_key(row["arch"])), rel=1e-5)


def test_table_for_another_space_or_classes_is_refused(tiny_params: Any) -> None:
    build_lut(_params(tiny_params), "t1", space=TINY, track=False, progress=False)
    with pytest.raises(LUTError, match="built for search space 'tiny-lat', not for this 'cpu' space"):
        LatencyPredictor.load("luts/t1.json", get_space("cpu"))
    with pytest.raises(LUTError, match="built for 5 classes, but the search space here has 7"):
        LatencyPredictor.load("luts/t1.json", TINY.with_classes(7))
    Path("luts/bad.json").write_text("{not json")
    with pytest.raises(LUTError, match="not valid JSON"):
        LatencyPredictor.load("luts/bad.json", TINY)
    with pytest.raises(LUTError, match="not found; build it with `evit lut"):
        LatencyPredictor.load("luts/none.json", TINY)


def test_too_many_entries_says_so_and_offers_sampled_mode(tiny_params: Any) -> None:
    params = _params(tiny_params, max_entries=10)
    with pytest.raises(LUTError, match=r"needs 28 entries .* inside 8 carrier subnets, more than its "
                                       r"max_entries=10\. Set `lut_mode: sampled`"):
        build_lut(params, "t1", space=TINY, track=False, progress=False)
    assert not Path("luts").exists()


def test_sampled_table_predicts_every_subnet(tiny_params: Any) -> None:
    params = _params(tiny_params, lut_mode="sampled", sample_subnets=2, max_entries=14)
    out = build_lut(params, "t1", space=TINY, track=False, progress=False)
    lut = load_lut("luts/t1.json")
    assert lut["mode"] == "sampled" and lut["fallback"] and lut["enumerated_blocks"] == 28
    assert out["entries"] < 28
    pred = LatencyPredictor.load("luts/t1.json", TINY)
    assert (pred.predict_many(all_archs(TINY)) > 0).all()


def test_absent_device_fails_before_measuring(tiny_params: Any) -> None:
    import torch

    if torch.cuda.is_available():  # pragma: no cover - only on a GPU machine
        pytest.skip("a GPU is present")
    params = _params(tiny_params, kind="cuda")
    with pytest.raises(DeviceError, match="needs an NVIDIA GPU"):
        build_lut(params, "t1", space=TINY, track=False, progress=False)
    assert not Path("luts").exists()


def test_failing_command_device_keeps_what_it_measured(tiny_params: Any) -> None:
    """A command that starts failing mid-build: clear error, partial kept, never used as complete."""
    tiny_params({})  # chdir into the test's project directory first
    counter = Path("calls.txt")
    script = Path("runner.py").resolve()
    script.write_text(
        "import pathlib, sys\n"
        f"c = pathlib.Path({str(counter.resolve())!r})\n"
        "n = len(c.read_text().splitlines()) if c.exists() else 0\n"
        "c.write_text(c.read_text() + 'x\\n' if c.exists() else 'x\\n')\n"
        "if n >= 6 and not pathlib.Path(sys.argv[2]).exists():\n"
        "    sys.stderr.write('board unreachable\\n'); sys.exit(7)\n"
        "print('latency', 0.5 + pathlib.Path(sys.argv[1]).stat().st_size / 1e6)\n")
    allow = Path("allow").resolve()
    cmd = f"{sys.executable} {script} {{model}} {allow}"
    params = _params(tiny_params, kind="command", command=cmd, validate_subnets=10)
    with pytest.raises(DeviceError, match="(?s)exited with status 7.*board unreachable"):
        build_lut(params, "t1", space=TINY, track=False, progress=False)
    partial = json.loads(partial_path(Path("luts/t1.json")).read_text())
    assert partial["complete"] is False and len(partial["done"]) == 6  # overhead + 5 blocks
    with pytest.raises(LUTError, match="is partial"):
        LatencyPredictor.load(partial_path(Path("luts/t1.json")), TINY)
    with pytest.raises(LUTError, match="partial one next to it"):
        LatencyPredictor.load("luts/t1.json", TINY)

    allow.write_text("ok")
    calls_before = len(counter.read_text().splitlines())
    out = build_lut(params, "t1", space=TINY, track=False, progress=False)
    calls = len(counter.read_text().splitlines()) - calls_before
    # resumed: the 6 finished units are not run again (28 blocks + overhead + 10 subnets = 39 units)
    assert calls == 39 - 6
    assert out["entries"] == 28 and load_lut("luts/t1.json")["method"] == "isolated"


@pytest.mark.timeout(180)
def test_killed_build_resumes_without_remeasuring(tiny_params: Any) -> None:
    """A build killed mid-way (SIGKILL) resumes from its partial file; no unit is measured twice."""
    dev = {"name": "k1", "kind": "torch-cpu", "warmup": 1, "repeats": 80, "rounds": 8, "validate_subnets": 10}
    path = tiny_params({"devices": [dev]})
    partial = partial_path(Path("luts/k1.json"))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from test_latency_helpers import TINY; "
            "from evit.config import load_params; from evit.latency.stage import build_lut; "
            "build_lut(load_params(sys.argv[2]), 'k1', space=TINY, track=False, progress=False)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(REPO / "tests"), str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if partial.exists() and json.loads(partial.read_text())["done"]:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"build ended before it could be killed: {proc.stderr.read().decode()[-800:]}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = set(json.loads(partial.read_text())["done"])
    assert done and not Path("luts/k1.json").exists()

    build_lut(load_params(path), "k1", space=TINY, track=False, progress=False)
    lut = load_lut("luts/k1.json")
    expected: Counter[str] = Counter()
    for arch in covering_archs(TINY):
        for b in arch_blocks(arch, TINY):
            expected[b.key] += 80
    # every block has exactly its carriers' samples: nothing lost at the kill, nothing measured twice
    assert {k: v["n"] for k, v in lut["entries"].items()} == dict(expected)


def test_cli_unknown_device_is_a_clear_error(tiny_params: Any) -> None:
    from typer.testing import CliRunner

    from evit.cli import app

    path = tiny_params({})
    result = CliRunner().invoke(app, ["lut", "--device", "pixel9", "--params", str(path)])
    assert result.exit_code == 2
    assert "unknown device 'pixel9'" in result.output and "cpu-1t" in result.output


def test_stage_run_logged_to_mlflow(tiny_params: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = _params(tiny_params)
    build_lut(params, "t1", space=TINY, track=True, progress=False)
    runs = mlflow.search_runs(experiment_names=[params.tracking.experiment], output_format="list")
    (run,) = [r for r in runs if r.info.run_name == "lut@t1"]
    assert METRIC_KEYS <= set(run.data.metrics)
    assert run.data.params["device.kind"] == "torch-cpu" and run.data.tags["evit.device"] == "t1"
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "lut")}
    assert {"lut/t1.json", "lut/lut-t1.json", "lut/lut-t1.png", "lut/lut-t1.csv"} <= names


def test_outliers_are_remeasured_and_only_a_lower_estimate_is_kept() -> None:
    from evit.latency.timing import LoadWatch, keep_lower, outliers

    assert outliers([1.0, 1.05, 1.3, 0.8], [1.0, 1.0, 1.0, 1.0]) == [2, 3]
    assert keep_lower(2.0, 1.5) == 1.5 and keep_lower(1.5, 2.0) == 1.5  # load only adds time
    watch = LoadWatch()
    watch.sample()
    load = watch.summary()
    assert load["cpu_count"] >= 1 and load["load_1m_max"] >= load["load_1m_mean"] >= 0
