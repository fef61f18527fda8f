"""The evit pipeline as a Prefect flow: prepare -> train -> lut / search / export per device.

    evit pipeline                 # = run_pipeline("params.yaml"): ephemeral Prefect, no server
    make run                      # the same, after creating .venv

Each task is a thin shell over one stage function of `evit.stages` (no stage logic here).
What the flow adds is orchestration:

- **Caching that DVC agrees with.** A task is a cache hit when DVC reports its stage up to
  date: the dvc.lock entry matches the stage's params values and the content hashes of
  its inputs, and its outputs on disk still match the hashes recorded (outputs deleted
  but still in the DVC cache are restored, not recomputed). The Prefect cache key
  (`StageCache`) is that state: inputs + output hashes + evit version; results are
  persisted as JSON under `.evit-cache/prefect`, so a hit survives a new process. A stage
  that runs is recorded in dvc.lock exactly as `dvc repro` would, so `dvc status` is
  clean after a flow run, and a stage `dvc repro` ran is a cache hit for the flow.
  Per-device stages depend only on their own `devices.<i>` entry (a LUT: not on its
  `budgets_ms`), so changing one device's settings reruns only that device's branch.
- **Nothing produced is overwritten silently.** Before anything runs, outputs that differ
  from dvc.lock while their stage's inputs did not change (edited by hand; a stage run by
  hand records itself through the CLI) stop the run with their names and the two ways out.
- **The registry is an output of export.** A cached export whose versions the configured
  registry lacks (a new MLflow server, a wiped database) registers them again from the
  exported files, without re-exporting, and says so (`registered_again`).
- **The end of a run**: the chosen subnets per device and budget (`subnets`, printed as a
  table by `evit pipeline`), and a warning pointing at docs/operations.md while the DVC
  remote config (and dvc.lock) another machine needs is not committed to git.
- **Retries** of transient failures (S3, MLflow, DVC's lock) with exponential backoff;
  user errors (`evit.errors.UserError`) fail at once with their message.
- **Tracking**: one parent MLflow run per pipeline run, a child run per stage that ran,
  and a Prefect markdown artifact (also logged to the parent run) with the subnet chosen
  for each device and budget.
- **Fan-out**: per-device branches are submitted as concurrent futures. Stages that time
  or compute on this host take turns on a host lock (two latency measurements sharing
  the CPU corrupt each other); only the LUT of a `command` device (timed elsewhere, e.g.
  a phone over adb) runs alongside.
- **Converting ahead**: a `litert` / `executorch` table is mostly converting files, which
  needs no quiet machine. When such a LUT will run, a `convert-ahead@<device>` task makes
  its files beside training and the baselines (they use `train.threads` cores; the
  conversions get the rest, in worker processes), and the LUT waits for it and then only
  measures. Best effort: the LUT converts whatever is still missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.context import TaskRunContext
from prefect.states import Cancelled
from prefect.tasks import exponential_backoff

import evit
from evit import cancel, paths, stages, tracking
from evit.config import Params
from evit.errors import UserError
from evit.io import read_json
from evit.workspace import workspace_lock
from flows import dvcfile, dvcrepo
from flows.transient import is_transient, retry_condition

log = logging.getLogger(__name__)

CACHE_DIR = Path(".evit-cache") / "prefect"
"""Persisted task results (JSON), relative to the project root."""
FLOW_NAME = "evit-pipeline"
ARTIFACT_KEY = "evit-subnets"
RETRY_BACKOFF_S = 10.0
TEAM_DOC = "docs/operations.md#move-to-a-team-setup"
"""Where `evit pipeline` points when the record another machine needs is not committed."""
TORCHRUN_ENV = "EVIT_TORCHRUN_ARGS"
"""e.g. "--nproc-per-node 8": the train task then launches `torchrun ... evit train` instead of
training in-process (infra/torchrun.sh shows the multi-node form)."""


class PipelineError(RuntimeError):
    """One or more stages failed for a reason that is not the user's input (see the log)."""


# --- caching -----------------------------------------------------------------------------------

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
        key = _versioned(state.key)
        store = task_ctx.result_store
        if not store.exists(key):
            store.write(obj=_recorded_summary(root, name, state), key=key)
        return key


def _versioned(key: str) -> str:
    return f"{key}-v{evit.__version__}"


def _metrics_file(name: str) -> Path | None:
    kind, _, device = name.partition("@")
    return {"prepare": None, "train": paths.train_metrics_path(),
            "lut": paths.lut_metrics_path(device) if device else None,
            "search": paths.search_metrics_path(device) if device else None,
            "export": paths.export_metrics_path(device) if device else None,
            "baselines": paths.baselines_metrics_path()}.get(kind)


def _recorded_summary(root: Path, name: str, state: dvcrepo.StageState) -> dict[str, Any]:
    """What a stage produced, read back from disk, for a result DVC (not this flow) recorded."""
    metrics_path = _metrics_file(name)
    metrics = None
    if metrics_path is not None and (root / metrics_path).is_file():
        with contextlib.suppress(ValueError, OSError):
            metrics = read_json(root / metrics_path)
    return {"stage": name, "recorded_by": "dvc.lock", "outs": state.outs, "metrics": metrics}


# --- per-stage work ----------------------------------------------------------------------------

_HOST_LOCK = threading.Lock()


@contextlib.contextmanager
def _host_turn(params: Params, kind: str, device: str | None, logger: Any) -> Iterator[None]:
    """Serialize the stages that time or compute on this host (see the module docstring)."""
    if kind == "lut" and device is not None and params.device(device).kind == "command":
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


def _can_resume(params: Params) -> bool:
    """Resume training only from a models/last.pt of these very params and data (a params
    change that makes the stage rerun must start over, not mix two configurations)."""
    from evit.train import checkpoint as ckpt_mod

    last = paths.resume_path(params)
    if not ckpt_mod.rolling_exists(last):
        return True
    try:
        manifest = read_json(paths.manifest_path(params))
        ck, _ = ckpt_mod.load_rolling(last)  # a corrupt latest falls back to last.prev.pt (reported)
        same = ck.get("params_hash") == ckpt_mod.params_hash(params, str(manifest["content_hash"]))
    except Exception as exc:  # noqa: BLE001 - unreadable: the trainer would refuse it too
        log.warning("%s is unreadable (%s); training starts over", last, type(exc).__name__)
        return False
    if not same:
        log.info("%s belongs to other train/space params or data; training starts over", last)
    return same


def _train(params: Params, params_file: str, parent_run_id: str | None) -> dict[str, Any]:
    from evit import stages

    resume = _can_resume(params)
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
    from evit import stages

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
    with _host_turn(params, kind, device, logger):
        t0 = time.perf_counter()
        dvcrepo.remove_outs(project, name)
        with tracking.parent_run(parent_run_id):
            summary = _call_stage(kind, params, params_file, device, parent_run_id)
        seconds = time.perf_counter() - t0
    state = dvcrepo.commit(project, name)
    try:
        _with_transient_retries(lambda: _ensure_child_run(params, name, kind, parent_run_id), params.tracking.retries,
                                f"{name}: MLflow child run")
    except Exception as exc:  # noqa: BLE001 - the stage's outputs are recorded; tracking is secondary
        logger.warning("%s: could not record the MLflow child run (%s: %s)", name, type(exc).__name__, exc)
    result = {"stage": name, "recorded_by": "evit pipeline", "seconds": round(seconds, 2), "outs": state.outs,
              "summary": json.loads(json.dumps(summary, default=str))}
    # Also file the result under the key of the state just recorded, so the next run hits it.
    ctx = TaskRunContext.get()
    if ctx is not None:
        ctx.result_store.write(obj=result, key=_versioned(state.key))
    logger.info("%s: done in %.1fs, recorded in dvc.lock", name, seconds)
    return result


_SECTION = {"prepare": "data", "train": "train", "lut": "space", "search": "search", "export": "export",
            "baselines": "baselines"}


def _numeric(obj: Any, prefix: str = "") -> dict[str, float]:
    """The numbers in a metrics document, flattened to MLflow metric names."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_numeric(v, f"{prefix}{k}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix.rstrip(".")] = float(obj)
    return out


def _ensure_child_run(params: Params, name: str, kind: str, parent_run_id: str | None) -> None:
    """Every stage that ran has a child run under the pipeline run: the stages that log their
    own (`tracking.stage_run`) keep theirs; for the others one is added with the stage's
    params section and the numbers of its metrics file."""
    if not parent_run_id:
        return
    import mlflow
    from mlflow import MlflowClient

    experiment_id = tracking.ensure_experiment(params)
    found = MlflowClient().search_runs(
        [experiment_id], max_results=1,
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`evit.stage` = '{name}'")
    if found:
        return
    device = name.partition("@")[2]
    with tracking.parent_run(parent_run_id), \
            tracking.stage_run(params, name, tags={"evit.device": device} if device else None,
                               log_sections=(_SECTION[kind],)):
        metrics_path = _metrics_file(name)
        if metrics_path is not None and metrics_path.is_file():
            numbers = _numeric(read_json(metrics_path))
            if numbers:
                mlflow.log_metrics({k[:250]: v for k, v in list(numbers.items())[:500]})
            mlflow.log_artifact(str(metrics_path))
        elif kind == "prepare" and paths.manifest_path(params).is_file():
            manifest = read_json(paths.manifest_path(params))
            mlflow.log_metrics({f"images_{k}": float(v) for k, v in manifest.get("totals", {}).items()})
            mlflow.set_tag("evit.data_version", str(manifest.get("content_hash", "")))
            mlflow.log_dict({k: manifest[k] for k in ("classes", "counts", "totals", "source", "content_hash")
                             if k in manifest}, "manifest-summary.json")


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

CONVERTING_KINDS = ("litert", "executorch")
"""Device kinds whose table build is mostly converting files (evit.latency.mobile)."""


_SHARED_IMPORTS = ("timm", "timm.data", "evit.train.stage", "evit.baselines.stage", "evit.nn.static",
                   "evit.latency.stage", "evit.latency.mobile", "evit.formats.pte", "evit.formats.tflite", "torch.export")


def _import_before_converting(kinds: set[str]) -> None:
    """Import, in the flow's own thread, what convert-ahead and the stages beside it load.

    Why: convert-ahead runs in a thread beside the training and baselines threads, and two
    threads importing the same package for the first time can each see the other's
    half-initialised module ("cannot import name 'IMAGENET_DEFAULT_MEAN' from partially
    initialized module 'timm.data'", seen here). Imported once up front, nothing is left to
    race on; the seconds it takes are paid by the stages anyway.
    """
    import importlib

    for name in _SHARED_IMPORTS:
        importlib.import_module(name)
    if "executorch" in kinds:
        importlib.import_module("executorch.runtime")
    if "litert" in kinds:
        importlib.import_module("ai_edge_litert.interpreter")


def _lut_will_run(root: Path, device: str, forced: set[str]) -> bool:
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
    from evit.host import usable_cpus
    from evit.latency.stage import convert_ahead

    logger = get_run_logger()
    params = stages.load(Path(root) / params_file)
    cancel.check(f"before converting ahead for lut@{device}")
    dp = params.device(device)
    # beside the host's stages: training and the baselines use `train.threads` cores
    cpus = usable_cpus()
    jobs = dp.convert_jobs or max(1, cpus - (params.train.threads or cpus))
    try:
        out = convert_ahead(params, device, jobs=jobs)
    except cancel.Cancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - the lut stage converts what is missing
        logger.warning("convert-ahead@%s failed (%s: %s); lut@%s converts its files itself", device,
                       type(exc).__name__, exc, device)
        return {"device": device, "error": str(exc)}
    logger.info("convert-ahead@%s: %d file(s) converted, %d in the cache, %.0f s", device, out["files_made"],
                out["files_reused"], out["seconds"])
    return out


# --- reporting ---------------------------------------------------------------------------------

def subnets_markdown(params: Params, devices: Sequence[str]) -> str:
    """The discovered subnets per device and budget, as a markdown table."""
    lines = ["# evit: subnets per device and budget", "",
             "| device | budget | arch | FLOPs (M) | params (M) | predicted ms | measured ms | search top-1 "
             "| val top-1 | registered |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for device in devices:
        result_path = paths.search_dir(params, device) / "result.json"
        if not result_path.is_file():
            lines.append(f"| {device} | - | (no search result) | | | | | | | |")
            continue
        result = read_json(result_path)
        registered: dict[str, Any] = {}
        export_metrics = paths.export_metrics_path(device)
        if export_metrics.is_file():
            registered = read_json(export_metrics).get("registered", {})
        model = params.export.model_name.format(device=device)
        for b in result.get("budgets", []):
            label = b.get("label", "?")
            if not b.get("feasible"):
                lines.append(f"| {device} | {label} | infeasible: {b.get('reason', '')} | | | | | | | |")
                continue
            reg = registered.get(label)
            reg_text = f"{model} v{reg['version']}" if reg else "-"
            lines.append(
                f"| {device} | {label} | `{b.get('key', '')}` | {b.get('flops_m', 0):.2f} | {b.get('params_m', 0):.3f} "
                f"| {b.get('predicted_latency_ms', 0):.3f} | {b.get('measured_latency_ms', 0):.3f} "
                f"| {b.get('search_top1', 0):.4f} | {b.get('val_top1', 0):.4f} | {reg_text} |")
    return "\n".join(lines) + "\n"


def subnet_rows(params: Params, devices: Sequence[str],
                restored: dict[str, list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """The chosen subnet per device and budget, for the end-of-run table: top-1, predicted and
    measured latency, and the registry reference to fetch it with (`restored`: versions just
    registered again on this registry, which win over the numbers the export recorded)."""
    rows: list[dict[str, Any]] = []
    for device in devices:
        result_path = paths.search_dir(params, device) / "result.json"
        if not result_path.is_file():
            continue
        export_metrics = paths.export_metrics_path(device)
        registered = dict(read_json(export_metrics).get("registered", {})) if export_metrics.is_file() else {}
        registered.update({r["label"]: r for r in (restored or {}).get(device, [])})
        model = params.export.model_name.format(device=device)
        for b in read_json(result_path).get("budgets", []):
            label = b.get("label", "?")
            if not b.get("feasible"):
                rows.append({"device": device, "budget": label, "feasible": False})
                continue
            reg = registered.get(label)
            rows.append({"device": device, "budget": label, "feasible": True, "val_top1": b.get("val_top1"),
                         "predicted_ms": b.get("predicted_latency_ms"), "measured_ms": b.get("measured_latency_ms"),
                         "fetch": f"{model}/{reg['version']}" if reg else None,
                         "aliases": sorted(reg.get("aliases", [])) if reg else []})
    return rows


def subnets_table(rows: Sequence[dict[str, Any]]) -> str:
    """`subnet_rows` as the plain-text table `evit pipeline` ends with."""
    if not rows:
        return "no subnets chosen yet (run the search and export stages)"
    head = ("device", "budget", "val top-1", "predicted ms", "measured ms", "fetch with")
    body = []
    for r in rows:
        if not r["feasible"]:
            body.append((r["device"], r["budget"], "infeasible", "", "", ""))
            continue
        fetch = f"evit fetch {r['fetch']}" if r["fetch"] else "(not registered)"
        body.append((r["device"], r["budget"], f"{r['val_top1']:.4f}", f"{r['predicted_ms']:.3f}",
                     f"{r['measured_ms']:.3f}", fetch))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
                     for line in (head, tuple("-" * w for w in widths), *body))


def _restore_registry(params: Params, devices: Sequence[str], states: dict[str, str], retries: int,
                      logger: Any) -> dict[str, list[dict[str, Any]]]:
    """The registry is an output of export: for each cached export, register again what the
    configured registry lacks (a new MLflow server, a wiped database), from the exported files."""
    from evit.registry import restore_registrations

    if not params.export.register_model:
        return {}
    restored: dict[str, list[dict[str, Any]]] = {}
    for device in devices:
        name = dvcfile.stage_name("export", device)
        if states.get(name) != "Cached":
            continue
        got = _with_transient_retries(lambda d=device: restore_registrations(params, d), retries,
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


# --- the flow ----------------------------------------------------------------------------------

def check_selection(params: Params, stages: Sequence[str] | None, devices: Sequence[str] | None,
                    force: Sequence[str] | None) -> None:
    """Validate `-s/-d/--force` against the params before Prefect (or any server) starts."""
    _select(stages, dvcfile.STAGE_KINDS, "stage kinds")
    _select(force, dvcfile.STAGE_KINDS, "stage kinds to force")
    _select(devices, [d.name for d in params.devices], "devices")


def _select(requested: Sequence[str] | None, available: Sequence[str], what: str) -> list[str]:
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


def _with_transient_retries(fn: Any, retries: int, what: str) -> Any:
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= retries or not is_transient(exc):
                raise
            delay = RETRY_BACKOFF_S * 2**attempt
            log.warning("%s failed (%s); retry %d/%d in %.0fs", what, exc, attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


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


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


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
    with workspace_lock(root, f"evit pipeline ({params_file_path.name})", wait=wait), _chdir(root):
        try:
            return _pipeline_in(root, params_file_path.name, stages, devices, force or [], logger)
        except cancel.Cancelled as exc:
            logger.warning("pipeline %s", exc)
            return Cancelled(message=str(exc))  # type: ignore[return-value] - the run's final state


def _pipeline_in(root: Path, params_file: str, stages: list[str] | None, devices: list[str] | None,
                 force: list[str], logger: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    params = stages.load(params_file)
    kinds = _select(stages, dvcfile.STAGE_KINDS, "stage kinds")
    forced = set(_select(force, dvcfile.STAGE_KINDS, "stage kinds to force")) if force else set()
    names = _select(devices, [d.name for d in params.devices], "devices")
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
        _with_transient_retries(lambda: prun.log_artifact(str(root / params_file)), retries, "logging params")

        def submit(kind: str, device: str | None, wait_for: list[Any]) -> Any:
            t = TASKS[kind].with_options(**options)
            return t.submit(str(root), params_file, device, prun.run_id, kind in forced,
                            wait_for=[w for w in wait_for if w is not None])

        # before any task thread starts importing (see _import_before_converting)
        ahead_devices = [d for d in names if "lut" in kinds and params.device(d).kind in CONVERTING_KINDS
                         and _lut_will_run(root, d, forced)]
        if ahead_devices:
            _import_before_converting({params.device(d).kind for d in ahead_devices})
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
            pushed = _with_transient_retries(lambda: dvcrepo.push(root), retries, "dvc push")
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

        _with_transient_retries(log_parent, retries, "logging the pipeline run")
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
