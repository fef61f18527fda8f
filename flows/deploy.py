"""Scheduled deployments of the pipeline flow: serve them on one machine, or register them
with a work pool (process or Kubernetes) for a team.

Two schedules, one flow (`flows.pipeline.pipeline_flow`), different parameters:

- `nightly-research` (02:00 every day): re-reads the data source (`force: [prepare]`), then
  lut, search and export for every device. Thanks to the stage cache a night where
  nothing changed costs seconds; a changed device setting rebuilds that device's LUT,
  and a new LUT or changed data re-runs the searches (on the current supernet).
- `weekly-retrain` (03:00 on Sundays): the whole pipeline, data re-read too; training
  reruns only when the data or the train/space params changed since the last run.

    evit serve                          # serve both on this machine (`prefect.serve`)
    python -m flows.deploy register --pool evit-process   # register with a work pool
    prefect worker start --pool evit-process              # on each machine that runs flows

Cron times are in `EVIT_SCHEDULE_TZ` (default UTC). A served process runs one flow run at a
time (the stages already share the host). Collisions:

- each deployment allows one active run (`concurrency_limit` 1). When a run is due while
  the previous run of the same deployment is still going, `nightly-research` drops the new
  one (`CANCEL_NEW`: the next night does the same work on fresher data), `weekly-retrain`
  queues it (`ENQUEUE`: a retraining is not skipped);
- the two deployments (or a hand-run `evit pipeline` / `dvc repro`) overlapping in one
  project are serialised by the workspace lock (`evit.workspace`): the later run waits,
  logging which run holds the project, and starts when it is done.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENTRYPOINT = "flows/pipeline.py:pipeline_flow"
TZ_ENV = "EVIT_SCHEDULE_TZ"


@dataclass(frozen=True)
class Schedule:
    name: str
    cron: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)
    collision: str = "ENQUEUE"
    """What happens to a run due while this deployment's previous run is active (see above)."""

    def concurrency(self) -> Any:
        from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

        return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy(self.collision))


SCHEDULES = (
    Schedule("nightly-research", "0 2 * * *",
             "Re-read the data; rebuild LUTs whose device settings changed; re-search and re-export where "
             "LUTs or data changed (current supernet).",
             {"stages": ["prepare", "lut", "search", "export"], "force": ["prepare"]}, collision="CANCEL_NEW"),
    Schedule("weekly-retrain", "0 3 * * 0",
             "The whole pipeline with the data re-read; retrains when data or train/space params changed.",
             {"force": ["prepare"]}, collision="ENQUEUE"),
)


def _cron(schedule: Schedule, active: bool = True) -> Any:
    from prefect.schedules import Cron

    return Cron(schedule.cron, timezone=os.environ.get(TZ_ENV, "UTC"), active=active)


def runner_deployments(params_path: str | os.PathLike[str], *, schedules_active: bool = True) -> list[Any]:
    """The deployments as `RunnerDeployment`s for `prefect.serve` (params path made absolute)."""
    from flows.pipeline import pipeline_flow

    params = str(Path(params_path).expanduser().resolve())
    return [
        pipeline_flow.to_deployment(
            name=s.name, description=s.description, schedules=[_cron(s, schedules_active)],
            parameters={"params_path": params, **s.parameters}, tags=["evit", s.name],
            concurrency_limit=s.concurrency())
        for s in SCHEDULES
    ]


def serve_deployments(params_path: str | os.PathLike[str], *, schedules_active: bool = True) -> None:
    """`evit serve`: register the deployments with the Prefect API and run their flow runs here
    until interrupted (Ctrl-C pauses the schedules again)."""
    from prefect import serve

    deployments = runner_deployments(params_path, schedules_active=schedules_active)
    log.info("serving %s", ", ".join(f"{d.name} ({s.cron})" for d, s in zip(deployments, SCHEDULES)))
    serve(*deployments, limit=1, print_starting_message=True)


def register(params_path: str, *, pool: str, source: str | None = None, image: str | None = None,
             job_variables: dict[str, Any] | None = None) -> list[str]:
    """Register the deployments with work pool `pool` (a worker of that pool runs them).

    source: the project directory as the worker sees it (default: this checkout). For a
    Kubernetes or Docker pool pass `image` (the pipeline image of infra/Dockerfile, whose
    project lives at /app) and `source=/app`; `params_path` is then relative to it.
    """
    from flows.pipeline import pipeline_flow

    src = source or str(Path(__file__).resolve().parents[1])
    params = params_path if os.path.isabs(params_path) else str(Path(src) / params_path)
    remote_flow = pipeline_flow.from_source(source=src, entrypoint=ENTRYPOINT)
    ids = []
    for s in SCHEDULES:
        dep_id = remote_flow.deploy(
            name=s.name, work_pool_name=pool, image=image, build=False, push=False, description=s.description,
            schedules=[_cron(s)], parameters={"params_path": params, **s.parameters}, tags=["evit", s.name],
            concurrency_limit=s.concurrency(), job_variables=job_variables or {}, print_next_steps=False)
        ids.append(str(dep_id))
    return ids


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve or register the evit deployments (schedules).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve", help="serve both deployments from this process (= evit serve)")
    sv.add_argument("--params", "-p", default="params.yaml")
    rg = sub.add_parser("register", help="register both deployments with a work pool")
    rg.add_argument("--params", "-p", default="params.yaml", help="params file, relative to --source")
    rg.add_argument("--pool", required=True, help="work pool name (create it: prefect work-pool create NAME --type process)")
    rg.add_argument("--source", default=None, help="project directory on the worker (default: this checkout)")
    rg.add_argument("--image", default=None, help="image for docker/kubernetes pools (infra/Dockerfile)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "serve":
        serve_deployments(args.params)
    else:
        for dep_id in register(args.params, pool=args.pool, source=args.source, image=args.image):
            log.info("registered deployment %s", dep_id)


if __name__ == "__main__":  # pragma: no cover
    main()
