"""bench/gpu.py runs end to end at tiny sizes on CPU (so the GPU benchmark cannot rot)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_gpu_bench_tiny_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import gpu

    out = gpu.main(["--tiny", "--device", "cpu", "--samplers", "elastic", "--json", str(tmp_path / "gpu.json")])
    names = [r["config"] for r in out["results"]]
    assert names == ["elastic/eager/explicit", "elastic/eager/sdpa", "elastic/compile/sdpa"]
    assert all(r["images_per_s"] and r["images_per_s"] > 0 for r in out["results"]), out["results"]
    assert out["loader"]["formats"]["shards"]["train_images_per_s"] > 0
    assert out["search"]["subnets"] == 2 and out["search"]["subnets_per_min"] > 0
    assert all(a["sdpa_ms"] > 0 for a in out["attention"].values())
    text = capsys.readouterr().out
    assert "workers to feed the fastest configuration" in text and "subnets/min" in text
    assert (tmp_path / "gpu.json").is_file()
