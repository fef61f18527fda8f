"""The pipeline's tasks: thin shells over `evit.stages`, plus what orchestration adds per stage.

Each stage task loads the params (`evit.stages.load`), takes its turn on the host, runs
its stage function, records the stage in dvc.lock as `dvc repro` would, makes sure the
stage has a child run under the pipeline's MLflow run, and files its result under the
cache key of the state it recorded (`flows.cache`). What else is here:
- **Host turns.** Stages that time or compute on this host take turns on a host lock (two
  latency measurements sharing the CPU corrupt each other); only the LUT of a device
  timed elsewhere (`external` kinds, e.g. a phone over adb) runs alongside.
- **Retries** of transient failures (S3, MLflow, DVC's lock; `evit.retry`) with
  exponential backoff; user errors (`evit.errors.UserError`) fail at once.
- **Training under torchrun** when `EVIT_TORCHRUN_ARGS` is set.
- **Converting ahead**: `convert-ahead@<device>` makes the files of a converting kind's
  table (litert, executorch) beside training; best effort, the LUT converts what is missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff

from evit import cancel, paths, stages, tracking
from evit.config import Params
from evit.host import usable_cpus
from evit.io import read_json
from evit.retry import is_transient, with_retries
from flows import dvcfile, dvcrepo
from flows.cache import StageCache, metrics_file, versioned

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_BACKOFF_S = 10.0
TORCHRUN_ENV = "EVIT_TORCHRUN_ARGS"
"""e.g. "--nproc-per-node 8": the train task then launches `torchrun ... evit train` instead of
training in-process (infra/torchrun.sh shows the multi-node form)."""


def retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry transient failures only (`evit.retry.is_transient`)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as e:  # noqa: BLE001 - reading the result may raise the failure itself
            exc = e
    return isinstance(exc, BaseException) and is_transient(exc)


def with_transient_retries(fn: Callable[[], T], retries: int, what: str) -> T:
    """`fn`, retried with backoff while it fails for a transient reason (the flow's own calls)."""
    return with_retries(fn, retries=retries, what=what, base_delay=RETRY_BACKOFF_S, logger=log)


_HOST_LOCK = threading.Lock()


@contextlib.contextmanager
def host_turn(params: Params, kind: str, device: str | None, logger: Any) -> Iterator[None]:
    """Serialize the stages that time or compute on this host (see the module docstring)."""
    if kind == "lut" and device is not None and params.device(device).traits.external:
        yield
        return
    if not _HOST_LOCK.acquire(blocking=False):
        logger.info("%s: waiting for the host (another stage is measuring or computing on it)",
                    dvcfile.stage_name(kind, device))
        while not _HOST_LOCK.acquire(timeout=1.0):
            cancel.check("while waiting for the host")
    try:
        yield
    finally:
        _HOST_LOCK.release()


def _train(params: Params, params_file: str, parent_run_id: str | None) -> dict[str, Any]:
    resume = stages.train_resumable(params)
    launcher = os.environ.get(TORCHRUN_ENV, "").strip()
    if not launcher:
        return stages.train(params, resume=resume)
    cmd = [sys.executable, "-m", "torch.distributed.run", *shlex.split(launcher), "-m", "evit.cli", "train",
           "--params", params_file, *([] if resume else ["--fresh"])]
    env = {**os.environ, tracking.PARENT_RUN_ENV: parent_run_id or "", dvcrepo.PIPELINE_ENV: "1"}
    log.info("training under torchrun: %s", shlex.join(cmd))
    # The ranks' stdout (their JSON summaries) must not reach ours; their logs go to stderr.
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) as proc:
        while proc.poll() is None:
            signum = cancel.requested()
            if signum is not None:  # torchrun forwards it to the ranks, which checkpoint and stop
                proc.send_signal(signum)
                proc.wait()
                raise cancel.Cancelled(signum, "train (torchrun): the ranks stopped at a checkpoint")
            time.sleep(0.5)
        out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, out)
    log.debug("torchrun stdout:\n%s", out)
    return {"launcher": shlex.join(cmd), "metrics": read_json(paths.train_metrics_path())}


def _call_stage(kind: str, params: Params, params_file: str, device: str | None,
                parent_run_id: str | None) -> dict[str, Any]:
    if kind == "prepare":
        return stages.prepare(params)
    if kind == "train":
        return _train(params, params_file, parent_run_id)
    if kind == "baselines":
        return stages.baselines(params)
    assert device is not None
    return {"lut": stages.lut, "search": stages.search, "export": stages.export}[kind](params, device)


def _run_stage(kind: str, root: str, params_file: str, device: str | None, parent_run_id: str | None) -> dict:
    logger = get_run_logger()
    name = dvcfile.stage_name(kind, device)
    project = Path(root)
    params = stages.load(project / params_file)
    cancel.check(f"before {name} started")
    with host_turn(params, kind, device, logger):
        t0 = time.perf_counter()
        dvcrepo.remove_outs(project, name)
        with tracking.parent_run(parent_run_id):
            summary = _call_stage(kind, params, params_file, device, parent_run_id)
        seconds = time.perf_counter() - t0
    state = dvcrepo.commit(project, name)
    try:
        with_transient_retries(lambda: _ensure_child_run(params, name, kind, parent_run_id), params.tracking.retries,
                                f"{name}: MLflow child run")
    except Exception as exc:  # noqa: BLE001 - the stage's outputs are recorded; tracking is secondary
        logger.warning("%s: could not record the MLflow child run (%s: %s)", name, type(exc).__name__, exc)
    result = {"stage": name, "recorded_by": "evit pipeline", "seconds": round(seconds, 2), "outs": state.outs,
              "summary": json.loads(json.dumps(summary, default=str))}
    # Also file the result under the key of the state just recorded, so the next run hits it.
    ctx = TaskRunContext.get()
    if ctx is not None:
        ctx.result_store.write(obj=result, key=versioned(state.key))
    logger.info("%s: done in %.1fs, recorded in dvc.lock", name, seconds)
    return result


_SECTION = {"prepare": "data", "train": "train", "lut": "space", "search": "search", "export": "export",
            "baselines": "baselines"}


def _ensure_child_run(params: Params, name: str, kind: str, parent_run_id: str | None) -> None:
    """Every stage that ran has a child run under the pipeline run: the stages that log their
    own (`tracking.stage_run`) keep theirs; for the others one is added with the stage's
    params section and the numbers of its metrics file."""
    if not parent_run_id or tracking.has_stage_run(params, parent_run_id, name):
        return
    device = name.partition("@")[2]
    metrics: dict[str, float] = {}
    artifacts: list[Path] = []
    tags = {"evit.device": device} if device else {}
    dicts: dict[str, Any] = {}
    metrics_path = metrics_file(name)
    if metrics_path is not None and metrics_path.is_file():
        metrics = dict(list(tracking.numeric_metrics(read_json(metrics_path)).items())[:500])
        artifacts.append(metrics_path)
    elif kind == "prepare" and paths.manifest_path(params).is_file():
        manifest = read_json(paths.manifest_path(params))
        metrics = tracking.numeric_metrics({f"images_{k}": v for k, v in manifest.get("totals", {}).items()})
        tags["evit.data_version"] = str(manifest.get("content_hash", ""))
        dicts["manifest-summary.json"] = {k: manifest[k] for k in ("classes", "counts", "totals", "source",
                                                                   "content_hash") if k in manifest}
    with tracking.parent_run(parent_run_id):
        tracking.log_stage(params, name, tags=tags or None, log_sections=(_SECTION[kind],), metrics=metrics,
                           artifacts=artifacts, dicts=dicts, best_effort=False)


_TASK_OPTIONS: dict[str, Any] = {
    "cache_policy": StageCache(),
    "persist_result": True,
    "result_serializer": "json",
    "cache_expiration": None,
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(RETRY_BACKOFF_S),
    "retry_jitter_factor": 0.2,
    "retry_condition_fn": retry_condition,
}


@task(name="prepare", task_run_name="prepare", **_TASK_OPTIONS)
def prepare_task(root: str, params_file: str, device: str | None = None, parent_run_id: str | None = None,
                 force: bool = False) -> dict:
    """Data source -> data/prepared (stratified uint8 shards + manifest)."""
    return _run_stage("prepare", root, params_file, None, parent_run_id)


@task(name="train", task_run_name="train", **_TASK_OPTIONS)
def train_task(root: str, params_file: str, device: str | None = None, parent_run_id: str | None = None,
               force: bool = False) -> dict:
    """Prepared data -> models/supernet.pt (resumes a killed run of the same params)."""
    return _run_stage("train", root, params_file, None, parent_run_id)


@task(name="lut", task_run_name="lut@{device}", **_TASK_OPTIONS)
def lut_task(root: str, params_file: str, device: str | None = None, parent_run_id: str | None = None,
             force: bool = False) -> dict:
    """Search space x device -> luts/<device>.json (+ validation report)."""
    return _run_stage("lut", root, params_file, device, parent_run_id)


@task(name="search", task_run_name="search@{device}", **_TASK_OPTIONS)
def search_task(root: str, params_file: str, device: str | None = None, parent_run_id: str | None = None,
                force: bool = False) -> dict:
    """Supernet + LUT -> the best subnet per budget of the device."""
    return _run_stage("search", root, params_file, device, parent_run_id)


@task(name="export", task_run_name="export@{device}", **_TASK_OPTIONS)
def export_task(root: str, params_file: str, device: str | None = None, parent_run_id: str | None = None,
                force: bool = False) -> dict:
    """Chosen subnets -> exports/<device>/ (ONNX, safetensors, card), registered in MLflow."""
    return _run_stage("export", root, params_file, device, parent_run_id)


@task(name="baselines", task_run_name="baselines", **_TASK_OPTIONS)
def baselines_task(root: str, params_file: str, device: str | None = None, parent_run_id: str | None = None,
                   force: bool = False) -> dict:
    """Prepared data -> standalone timm models, same recipe, timed on every device (evit.baselines)."""
    return _run_stage("baselines", root, params_file, None, parent_run_id)


TASKS = {"prepare": prepare_task, "train": train_task, "lut": lut_task, "search": search_task,
         "export": export_task, "baselines": baselines_task}


def lut_will_run(root: Path, device: str, forced: set[str]) -> bool:
    """Whether lut@<device> is forced or out of date now (when unsure: yes, converting ahead is harmless)."""
    if "lut" in forced:
        return True
    try:
        return not dvcrepo.stage_state(root, dvcfile.stage_name("lut", device), restore=False).up_to_date
    except Exception:  # noqa: BLE001 - the lut task's own cache check reports any real problem
        return True


@task(name="convert-ahead", task_run_name="convert-ahead@{device}", cache_policy=NO_CACHE, persist_result=False)
def convert_ahead_task(root: str, params_file: str, device: str) -> dict:
    """Convert the files lut@<device> will time while training runs (best effort: lut converts
    whatever is missing itself, so a failure here only costs time)."""
    logger = get_run_logger()
    params = stages.load(Path(root) / params_file)
    cancel.check(f"before converting ahead for lut@{device}")
    dp = params.device(device)
    # beside the host's stages: training and the baselines use `train.threads` cores
    cpus = usable_cpus()
    jobs = dp.convert_jobs or max(1, cpus - (params.train.threads or cpus))
    try:
        out = stages.convert_ahead(params, device, jobs=jobs)
    except cancel.Cancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - the lut stage converts what is missing
        logger.warning("convert-ahead@%s failed (%s: %s); lut@%s converts its files itself", device,
                       type(exc).__name__, exc, device)
        return {"device": device, "error": str(exc)}
    logger.info("convert-ahead@%s: %d file(s) converted, %d in the cache, %.0f s", device, out["files_made"],
                out["files_reused"], out["seconds"])
    return out
