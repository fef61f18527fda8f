"""Progress of long stages: a live bar on a terminal, plain log lines (done/total, rate, ETA)
elsewhere; the rolling checkpoint keeps the previous one for a corrupt latest."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch

from evit.progress import Progress, fmt_seconds, mode
from evit.train import checkpoint as ckpt_mod


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_log_lines_when_not_a_terminal(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVIT_PROGRESS", raising=False)
    stream = io.StringIO()
    assert mode(stream) == "log"
    with caplog.at_level(logging.INFO, logger="t"):
        with Progress(40, "lut@x", unit="unit", logger=logging.getLogger("t"), min_interval_s=0, stream=stream) as p:
            for _ in range(40):
                p.update(1, level=2)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10, lines  # one per tenth of the work
    assert lines[0].startswith("lut@x: 4/40 unit (10%), ") and "unit/s, ETA " in lines[0] and "level=2" in lines[0]
    assert lines[-1].startswith("lut@x: 40/40 unit (100%)") and "done in" in lines[-1]
    assert stream.getvalue() == "", "control characters in a log"


def test_bar_on_a_terminal(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVIT_PROGRESS", raising=False)
    tty = _Tty()
    with caplog.at_level(logging.INFO):
        with Progress(5, "train (elastic)", unit="step", initial=1, stream=tty) as p:
            for _ in range(4):
                p.update(1, epoch="2/2")
    out = tty.getvalue()
    assert "train (elastic)" in out and "5/5" in out and "step/s" in out and "epoch=2/2" in out and "\r" in out
    assert not caplog.records
    monkeypatch.setenv("EVIT_PROGRESS", "log")
    assert mode(tty) == "log"


def test_eta_text() -> None:
    assert [fmt_seconds(s) for s in (4.4, 185, 7440)] == ["4s", "3m05s", "2h04m"]


def test_rolling_checkpoint_falls_back_to_the_previous(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    last = tmp_path / "last.pt"
    for step in (2, 4):
        ckpt_mod.save_rolling(last, {"step": step, "w": torch.full((3,), float(step))})
    assert ckpt_mod.previous_path(last).name == "last.prev.pt"
    assert ckpt_mod.load_rolling(last)[0]["step"] == 4
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])  # truncated, e.g. a full disk or a cut copy
    with caplog.at_level(logging.WARNING):
        ck, source = ckpt_mod.load_rolling(last)
    assert (ck["step"], source.name) == (2, "last.prev.pt")
    assert "last.pt is unusable" in caplog.text and "previous checkpoint" in caplog.text
    # a save after a corrupt latest must not rotate the corrupt file over the good previous one
    ckpt_mod.save_rolling(last, {"step": 6}, keep_previous=False)
    assert torch.load(ckpt_mod.previous_path(last), weights_only=True)["step"] == 2
    ckpt_mod.previous_path(last).write_bytes(b"junk")
    last.write_bytes(b"junk")
    with pytest.raises(ckpt_mod.CheckpointError, match="last.pt is not a readable checkpoint"):
        ckpt_mod.load_rolling(last)
