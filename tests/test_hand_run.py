"""Stages run by hand are recorded like pipeline runs, and the pipeline never silently
overwrites outputs that differ from dvc.lock (it stops and names them).

Real stages (prepare + a sampled LUT: seconds), real DVC, Prefect in ephemeral mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from evit.errors import UserError
from flows import dvcrepo
from tests.flow_helpers import (clean_env, dvc, flow_env, prefect_home, run, shared_mlflow_db,  # noqa: F401
                                tiny, tiny_device, VENV_BIN)

CHEAP = ["prepare", "lut"]


@pytest.mark.slow
def test_hand_run_is_recorded_and_modified_outputs_are_not_overwritten(tiny_params: Any, flow_env: Path,
                                                                         shared_mlflow_db: str) -> None:
    from flows.pipeline import run_pipeline

    path = tiny_params(tiny(devices=[tiny_device("a")]))
    root = path.parent
    run_pipeline(str(path), stages=CHEAP)
    table = root / "luts" / "a.json"
    by_flow = table.read_bytes()

    # `evit lut` by hand: a new table (fresh timings), recorded in dvc.lock like a pipeline run.
    env = clean_env({"MLFLOW_TRACKING_URI": shared_mlflow_db})
    hand = run([str(VENV_BIN / "evit"), "lut", "-d", "a"], root, env)
    assert "lut@a: recorded in dvc.lock" in hand.stderr, hand.stderr[-2000:]
    by_hand = table.read_bytes()
    assert by_hand != by_flow
    assert "up to date" in dvc(root, "status", "lut@a", env=env).stdout
    again = run_pipeline(str(path), stages=CHEAP)
    assert again["ran"] == [] and table.read_bytes() == by_hand  # kept, not restored over

    # `evit prepare` by hand is recorded too.
    prep = run([str(VENV_BIN / "evit"), "prepare"], root, env)
    assert "prepare: recorded in dvc.lock" in prep.stderr, prep.stderr[-2000:]

    # An output edited outside both drivers: the pipeline stops, names it, and leaves it alone.
    doc = json.loads(by_hand)
    doc["note"] = "edited by hand"
    table.write_text(json.dumps(doc))
    edited = table.read_bytes()
    assert dvcrepo.modified_outputs(root, ["lut@a", "prepare"]) == {"lut@a": ["luts/a.json"]}
    with pytest.raises(UserError, match=r"lut@a: luts/a.json.*dvc commit lut@a"):
        run_pipeline(str(path), stages=CHEAP)
    assert table.read_bytes() == edited
    # ... and `dvc commit` (as the message says) keeps it: the next run is all cached.
    dvc(root, "commit", "-f", "lut@a", env=env)
    kept = run_pipeline(str(path), stages=CHEAP)
    assert kept["ran"] == [] and table.read_bytes() == edited
