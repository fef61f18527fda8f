"""MLflow tracking: where runs go and how stages open them.

The tracking URI comes from `MLFLOW_TRACKING_URI` when set (so a team server wins over
the file), else from `params.tracking.uri` (default: `sqlite:///mlflow.db` in the project
root). A stage opens a run with `stage_run`; inside a Prefect flow that run becomes a child
of the pipeline's parent run (the flow sets `EVIT_PARENT_RUN_ID`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from evit.config import Params

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "EVIT_PARENT_RUN_ID"


def tracking_uri(params: Params) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri


def registry_uri(params: Params) -> str:
    return os.environ.get("MLFLOW_REGISTRY_URI") or params.tracking.registry_uri or tracking_uri(params)


def configure(params: Params) -> None:
    """Point the mlflow client at the configured tracking/registry servers."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    mlflow.set_tracking_uri(tracking_uri(params))
    mlflow.set_registry_uri(registry_uri(params))


def flat_params(section: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a params section into MLflow's key -> string form (values cut to 500 chars)."""
    out: dict[str, str] = {}
    if isinstance(section, dict):
        for k, v in section.items():
            out.update(flat_params(v, f"{prefix}{k}."))
        return out
    out[prefix.rstrip(".")] = str(section)[:500]
    return out


@contextlib.contextmanager
def stage_run(params: Params, stage: str, *, tags: dict[str, str] | None = None,
              log_sections: tuple[str, ...] = ()) -> Iterator[Any]:
    """Open an MLflow run for one stage (nested under the flow's parent run when there is one)."""
    import mlflow

    configure(params)
    mlflow.set_experiment(params.tracking.experiment)
    parent = os.environ.get(PARENT_RUN_ENV)
    all_tags = {"evit.stage": stage, **(tags or {})}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=stage, tags=all_tags) as run:
        for name in log_sections:
            section = params.section(name)
            mlflow.log_params(flat_params(section, f"{name}."))
        yield run
