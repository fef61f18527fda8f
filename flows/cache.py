"""Caching that DVC agrees with: a stage task is a cache hit exactly when DVC says it is up to date.

A task's cache key (`StageCache`) is DVC's view of its stage: the dvc.lock entry matches
the stage's params values and the content hashes of its inputs, and its outputs on disk
still match the hashes recorded (outputs deleted but still in the DVC cache are restored,
not recomputed), plus the evit version. Results are persisted as JSON under
`.evit-cache/prefect`, so a hit survives a new process. A stage that runs is recorded in
dvc.lock exactly as `dvc repro` would (`flows.tasks`), so `dvc status` is clean after a
flow run, and a stage `dvc repro` ran is a cache hit for the flow.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

import evit
from evit import paths
from evit.io import read_json
from flows import dvcfile, dvcrepo

CACHE_DIR = Path(".evit-cache") / "prefect"
"""Persisted task results (JSON), relative to the project root."""


class StageCache(CachePolicy):
    """Cache key of a stage task = DVC's view of the stage (see the module docstring).

    Returns no key (so the task runs, and nothing stale is read) while DVC reports the stage
    out of date. When DVC reports it up to date but no Prefect result exists for that state
    yet (`dvc repro` ran it, or a result directory was wiped), a result is written from
    what the stage left on disk, so the task is a genuine Prefect cache hit.
    """

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        if inputs.get("force"):
            return None
        root = Path(inputs["root"])
        name = dvcfile.stage_name(task_ctx.task.name, inputs.get("device"))
        state = dvcrepo.stage_state(root, name)
        if not state.up_to_date:
            get_run_logger().info("%s: runs (%s)", name, state.reason)
            return None
        get_run_logger().info("%s: cached (params, inputs and outputs match dvc.lock), not run", name)
        key = versioned(state.key)
        store = task_ctx.result_store
        if not store.exists(key):
            store.write(obj=recorded_summary(root, name, state), key=key)
        return key


def versioned(key: str) -> str:
    """A cache key of this evit version (a new version recomputes rather than trust old results)."""
    return f"{key}-v{evit.__version__}"


def metrics_file(name: str) -> Path | None:
    """The metrics file a stage writes (None for prepare)."""
    kind, _, device = name.partition("@")
    return {"prepare": None, "train": paths.train_metrics_path(),
            "lut": paths.lut_metrics_path(device) if device else None,
            "search": paths.search_metrics_path(device) if device else None,
            "export": paths.export_metrics_path(device) if device else None,
            "baselines": paths.baselines_metrics_path()}.get(kind)


def recorded_summary(root: Path, name: str, state: dvcrepo.StageState) -> dict[str, Any]:
    """What a stage produced, read back from disk, for a result DVC (not this flow) recorded."""
    metrics_path = metrics_file(name)
    metrics = None
    if metrics_path is not None and (root / metrics_path).is_file():
        with contextlib.suppress(ValueError, OSError):
            metrics = read_json(root / metrics_path)
    return {"stage": name, "recorded_by": "dvc.lock", "outs": state.outs, "metrics": metrics}
