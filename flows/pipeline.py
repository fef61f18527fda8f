"""The evit pipeline as a Prefect flow: prepare -> train -> lut / search / export per device.

    evit pipeline                 # = run_pipeline("params.yaml"): ephemeral Prefect, no server
    make run                      # the same, after creating .venv

Each task is a thin shell over one stage function of `evit.stages` (no stage logic here).
What the flow adds is orchestration:

- **Caching that DVC agrees with** (`flows.cache`): a task is a cache hit when DVC reports
  its stage up to date, and a stage that runs is recorded in dvc.lock exactly as
  `dvc repro` would (`flows.tasks`), so either driver leaves the other nothing to redo.
  Per-device stages depend only on their own `devices.<i>` entry (a LUT: not on its
  `budgets_ms`), so changing one device's settings reruns only that device's branch.
- **Nothing produced is overwritten silently.** Before anything runs, outputs that differ
  from dvc.lock while their stage's inputs did not change (edited by hand; a stage run by
  hand records itself through the CLI) stop the run with their names and the two ways out.
- **The registry is an output of export.** A cached export whose versions the configured
  registry lacks (a new MLflow server, a wiped database) registers them again from the
  exported files, without re-exporting, and says so (`registered_again`).
- **What another machine needs**: a warning pointing at docs/operations.md while the DVC
  remote config (and dvc.lock) another machine needs is not committed to git.
- **Retries** of transient failures (S3, MLflow, DVC's lock; `evit.retry`) with exponential
  backoff; user errors (`evit.errors.UserError`) fail at once with their message.
- **Tracking**: one parent MLflow run per pipeline run, a child run per stage that ran,
  and a Prefect markdown artifact (also logged to the parent run) with the subnet chosen
  for each device and budget.
- **Fan-out**: per-device branches are submitted as concurrent futures; stages that time
  or compute on this host take turns on it (`flows.tasks.host_turn`).
- **Converting ahead**: a `litert` / `executorch` table is mostly converting files, which
  needs no quiet machine. When such a LUT will run, a `convert-ahead@<device>` task makes
  its files beside training and the baselines (they use `train.threads` cores; the
  conversions get the rest, in worker processes), and the LUT waits for it and then only
  measures. Best effort: the LUT converts whatever is still missing.
- **The end of a run**: the chosen subnets per device and budget (`flows.report`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Cancelled

import evit
from evit import cancel, paths, tracking
from evit import stages as evit_stages
from evit.config import Params
from evit.errors import UserError
from evit.workspace import workspace_lock
from flows import dvcfile, dvcrepo
from flows.cache import CACHE_DIR
from flows.report import subnet_rows, subnets_markdown, subnets_table
from flows.tasks import TASKS, convert_ahead_task, lut_will_run, with_transient_retries

log = logging.getLogger(__name__)

FLOW_NAME = "evit-pipeline"
ARTIFACT_KEY = "evit-subnets"
TEAM_DOC = "docs/operations.md#move-to-a-team-setup"
"""Where `evit pipeline` points when the record another machine needs is not committed."""

__all__ = ["ARTIFACT_KEY", "FLOW_NAME", "PipelineError", "check_selection", "pipeline_flow", "run_pipeline",
           "subnets_table"]


class PipelineError(RuntimeError):
    """One or more stages failed for a reason that is not the user's input (see the log)."""


def _restore_registry(params: Params, devices: Sequence[str], states: dict[str, str], retries: int,
                      logger: Any) -> dict[str, list[dict[str, Any]]]:
    """The registry is an output of export: for each cached export, register again what the
    configured registry lacks (a new MLflow server, a wiped database), from the exported files."""
    if not params.export.register_model:
        return {}
    restored: dict[str, list[dict[str, Any]]] = {}
    for device in devices:
        name = dvcfile.stage_name("export", device)
        if states.get(name) != "Cached":
            continue
        got = with_transient_retries(lambda d=device: evit_stages.restore_registrations(params, d), retries,
                                     f"{name}: registry check")
        if got:
            restored[device] = got
            logger.warning("%s: cached, but the registry lacked %d subnet(s); registered them again from %s "
                           "without re-exporting: %s", name, len(got), paths.export_dir(params, device),
                           ", ".join(f"{r['name']}/{r['version']} ({r['label']})" for r in got))
    return restored


def _state_of(future: Any) -> str:
    state = future.state
    return str(state.name or state.type.value)


def check_selection(params: Params, stages: Sequence[str] | None, devices: Sequence[str] | None,
                    force: Sequence[str] | None) -> None:
    """Validate `-s/-d/--force` against the params before Prefect (or any server) starts."""
    select(stages, dvcfile.STAGE_KINDS, "stage kinds")
    select(force, dvcfile.STAGE_KINDS, "stage kinds to force")
    select(devices, [d.name for d in params.devices], "devices")


def select(requested: Sequence[str] | None, available: Sequence[str], what: str) -> list[str]:
    if not requested:
        return list(available)
    unknown = [r for r in requested if r not in available]
    if unknown:
        raise UserError(f"unknown {what} {unknown}; accepted: {list(available)}")
    return [a for a in available if a in requested]


def _refuse_to_overwrite(root: Path, kinds: Sequence[str], devices: Sequence[str], forced: set[str]) -> None:
    """Stop before anything runs when outputs on disk differ from what dvc.lock recorded (a
    stage run or a file edited outside both drivers): caching would silently restore the
    recorded outputs over them, a rerun would recompute over them."""
    names = [dvcfile.stage_name(k, d) for k in kinds if k not in forced
             for d in (devices if k in dvcfile.PER_DEVICE else [None])]
    modified = dvcrepo.modified_outputs(root, names)
    if not modified:
        return
    listed = "; ".join(f"{n}: {', '.join(outs)}" for n, outs in modified.items())
    first = next(iter(modified))
    raise UserError(f"outputs differ from what dvc.lock recorded, not overwriting them: {listed}. Keep them: "
                    f"`dvc commit {' '.join(modified)}`; discard them: `dvc checkout {' '.join(modified)}` "
                    f"(or rerun with --force {first.partition('@')[0]})")


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@flow(name=FLOW_NAME, log_prints=False, validate_parameters=True)
def pipeline_flow(params_path: str = "params.yaml", stages: list[str] | None = None,
                  devices: list[str] | None = None, force: list[str] | None = None,
                  wait: bool = True) -> dict[str, Any]:
    """The whole pipeline (or the `stages` kinds / `devices` given), cached per stage.

    params_path: params file; its directory is the project root (dvc.yaml, outputs).
    stages: stage kinds to run (prepare, train, lut, search, export); default all. Stages
        left out are not run; their outputs on disk are used as they are.
    devices: device names to run the per-device stages for; default all.
    force: stage kinds to rerun even when cached (e.g. ["prepare"] re-reads a data source
        that changes in place; unchanged data still leaves the later stages cached).
    wait: when another run holds the project (`evit.workspace`), wait for it (True) or fail
        at once (False).

    A SIGTERM / SIGINT stops every running stage after its current step (training writes a
    checkpoint of that step); the flow run ends Cancelled and the MLflow run KILLED.
    """
    logger = get_run_logger()
    params_file_path = Path(params_path).expanduser().resolve()
    root = params_file_path.parent
    with workspace_lock(root, f"evit pipeline ({params_file_path.name})", wait=wait), contextlib.chdir(root):
        try:
            return _pipeline_in(root, params_file_path.name, stages, devices, force or [], logger)
        except cancel.Cancelled as exc:
            logger.warning("pipeline %s", exc)
            return Cancelled(message=str(exc))  # type: ignore[return-value] - the run's final state


def _pipeline_in(root: Path, params_file: str, stages: list[str] | None, devices: list[str] | None,
                 force: list[str], logger: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    params = evit_stages.load(params_file)
    kinds = select(stages, dvcfile.STAGE_KINDS, "stage kinds")
    forced = set(select(force, dvcfile.STAGE_KINDS, "stage kinds to force")) if force else set()
    names = select(devices, [d.name for d in params.devices], "devices")
    dvcrepo.ensure_repo(root)
    if dvcfile.sync(params, params_file, root):
        logger.info("dvc.yaml re-rendered from %s", params_file)
    dvcrepo.sync_remote(params.storage, root)
    _refuse_to_overwrite(root, kinds, names, forced)

    options = {"result_storage": root / CACHE_DIR, "retries": params.tracking.retries}
    retries = params.tracking.retries
    with tracking.pipeline_run(params, tags={"evit.params_file": params_file, "evit.version": evit.__version__,
                                             "evit.stages": ",".join(kinds), "evit.devices": ",".join(names)}) \
            as prun, _env(tracking.PARENT_RUN_ENV, prun.run_id):
        with_transient_retries(lambda: prun.log_artifact(str(root / params_file)), retries, "logging params")

        def submit(kind: str, device: str | None, wait_for: list[Any]) -> Any:
            t = TASKS[kind].with_options(**options)
            return t.submit(str(root), params_file, device, prun.run_id, kind in forced,
                            wait_for=[w for w in wait_for if w is not None])

        # before any task thread starts importing (see _import_before_converting)
        ahead_devices = [d for d in names if "lut" in kinds and params.device(d).traits.converts_files
                         and lut_will_run(root, d, forced)]
        if ahead_devices:
            evit_stages.import_ahead({params.device(d).kind for d in ahead_devices})
        futures: dict[str, Any] = {}
        prep = submit("prepare", None, []) if "prepare" in kinds else None
        train = submit("train", None, [prep]) if "train" in kinds else None
        # The comparison needs them before any search; off (no stage in dvc.yaml) when the list is empty.
        base = submit("baselines", None, [prep]) if "baselines" in kinds and params.baselines.models else None
        futures.update({n: f for n, f in (("prepare", prep), ("train", train), ("baselines", base)) if f is not None})
        aheads: dict[str, Any] = {}
        for d in ahead_devices:
            aheads[f"convert-ahead@{d}"] = convert_ahead_task.submit(
                str(root), params_file, d, wait_for=[w for w in (prep,) if w is not None])
        for d in names:
            lut = submit("lut", d, [train or prep, aheads.get(f"convert-ahead@{d}")]) if "lut" in kinds else None
            search = submit("search", d, [lut, train or prep, base]) if "search" in kinds else None
            export = submit("export", d, [search, train or prep]) if "export" in kinds else None
            for kind, fut in (("lut", lut), ("search", search), ("export", export)):
                if fut is not None:
                    futures[dvcfile.stage_name(kind, d)] = fut
        _wait_all({**aheads, **futures}, logger)

        states = {name: _state_of(f) for name, f in futures.items()}
        cached = sorted(n for n, s in states.items() if s == "Cached")
        ran = sorted(n for n, f in futures.items() if f.state.is_completed() and states[n] != "Cached")
        failed = {n: f for n, f in futures.items() if not f.state.is_completed()}
        summary: dict[str, Any] = {"stages": states, "cached": cached, "ran": ran, "failed": sorted(failed),
                                   "mlflow_run_id": prun.run_id, "project": str(root)}

        pushed = None
        if params.storage.push and not failed:
            pushed = with_transient_retries(lambda: dvcrepo.push(root), retries, "dvc push")
            logger.info("dvc push: %d file(s) sent to %s", pushed, params.storage.remote)
        summary["pushed"] = pushed

        restored = {} if failed else _restore_registry(params, names, states, retries, logger)
        summary["registered_again"] = {d: [f"{r['name']}/{r['version']}" for r in got] for d, got in restored.items()}
        summary["subnets"] = subnet_rows(params, names, restored)

        markdown = subnets_markdown(params, names)
        with contextlib.suppress(Exception):  # the artifact is a convenience; never fail the run on it
            create_markdown_artifact(markdown, key=ARTIFACT_KEY, description="evit: discovered subnets")
        seconds = time.perf_counter() - t0
        summary["seconds"] = round(seconds, 2)

        def log_parent() -> None:
            prun.log_text(markdown, "subnets.md")
            prun.set_tags({"evit.cached_stages": ",".join(cached) or "-", "evit.ran_stages": ",".join(ran) or "-",
                           "evit.failed_stages": ",".join(sorted(failed)) or "-"})
            prun.log_metrics({"pipeline_seconds": seconds, "stages_cached": len(cached), "stages_ran": len(ran),
                              "stages_failed": len(failed)})

        with_transient_retries(log_parent, retries, "logging the pipeline run")
        summary["uncommitted"] = dvcrepo.uncommitted(root)
        shared_remote = params.storage.remote.startswith("s3://") or Path(params.storage.remote).is_absolute()
        if ".dvc/config" in summary["uncommitted"] or (shared_remote and "dvc.lock" in summary["uncommitted"]):
            files = summary["uncommitted"]
            logger.warning("%s %s not committed to git: another machine cannot `dvc pull` these outputs. Commit "
                           "them and `dvc push` (see %s)", ", ".join(files), "is" if len(files) == 1 else "are",
                           TEAM_DOC)
        logger.info("pipeline: %d stage(s) ran, %d cached, %d failed in %.1fs", len(ran), len(cached), len(failed),
                    seconds)
        if failed:
            _raise_failure(failed, states)
        return summary


def _wait_all(futures: dict[str, Any], logger: Any) -> None:
    """Wait for every stage; on SIGTERM / SIGINT ask them to stop, wait for that, raise `Cancelled`.

    Under a flow, Prefect turns SIGTERM into `TerminationSignal` in this (the main) thread,
    while the stages run on in worker threads: without this they would train on until the
    process is killed. With the CLI's handler, SIGINT arrives as a request (`evit.cancel`)."""
    try:
        for fut in futures.values():
            fut.wait()
    except BaseException as exc:
        signum = getattr(exc, "signal", None) if type(exc).__name__ == "TerminationSignal" else (
            signal.SIGINT if isinstance(exc, KeyboardInterrupt) else None)
        if signum is None:
            raise
        cancel.request(signum)
    signum = cancel.requested()
    if signum is None:
        return
    logger.warning("%s: stopping the running stages after their current step", signal.Signals(signum).name)
    for fut in futures.values():
        with contextlib.suppress(Exception):
            fut.wait()
    stopped = sorted(n for n, f in futures.items() if not f.state.is_completed())
    raise cancel.Cancelled(signum, f"(stages not completed: {', '.join(stopped) or '-'}; re-run to resume)")


def _raise_failure(failed: dict[str, Any], states: dict[str, str]) -> None:
    errors = []
    for name, fut in failed.items():
        exc = fut.state.result(raise_on_failure=False) if fut.state.is_failed() else None
        if isinstance(exc, UserError):
            raise exc
        errors.append(f"{name}: {states[name]}" + (f" ({type(exc).__name__}: {exc})" if isinstance(exc, BaseException)
                                                   else ""))
    raise PipelineError("pipeline stages did not complete: " + "; ".join(errors))


def run_pipeline(params_path: str = "params.yaml", *, stages: list[str] | None = None,
                 devices: list[str] | None = None, force: list[str] | None = None,
                 wait: bool = True) -> dict[str, Any]:
    """Run the flow in this process (`evit pipeline`); Prefect's ephemeral mode when no
    PREFECT_API_URL is configured. Returns the flow's summary.

    Whatever the stages or libraries print (e.g. exporters' progress) goes to stderr, so
    stdout carries only the summary the CLI prints."""
    with contextlib.redirect_stdout(sys.stderr):
        state = pipeline_flow(params_path=params_path, stages=stages, devices=devices, force=force, wait=wait,
                              return_state=True)
    if state.is_cancelled():
        signum = cancel.requested() or signal.SIGTERM
        message, prefix = state.message or "", f"cancelled by {signal.Signals(signum).name} "
        raise cancel.Cancelled(signum, message.removeprefix(prefix))
    return state.result()
