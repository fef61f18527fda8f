"""MLflow tracking: where runs go and how stages open them.

The tracking URI comes from `MLFLOW_TRACKING_URI` when set (so a team server wins over
the file), else from `params.tracking.uri` (default: `sqlite:///mlflow.db` in the project
root). Artifacts go where the experiment says: the tracking server's artifact store when
there is one (`mlflow server --artifacts-destination s3://...`), else
`tracking.artifact_location` for a new experiment (e.g. s3://bucket/mlflow, endpoint from
`MLFLOW_S3_ENDPOINT_URL`), else ./mlruns.

A pipeline run is one parent MLflow run (`pipeline_run`, opened by the Prefect flow) with
one child run per stage that ran (`stage_run`, or in one call `log_stage`). Stages log
through the `StageRun` these hand out, so MLflow itself is imported here (and by the
registry and the training logbook's batched uploads) and nowhere else.

The parent id travels explicitly: the flow hands it to each task, the task binds it with
`parent_run(...)` in its own thread (Prefect runs tasks in worker threads), and
`EVIT_PARENT_RUN_ID` carries it to code that only reads the environment and to
subprocesses (torchrun workers).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import numbers
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from evit.config import Params
from evit.errors import UserError
from evit.retry import short, with_retries

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "EVIT_PARENT_RUN_ID"
_PARENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("evit_parent_run_id", default=None)


def _absolute_sqlite(uri: str) -> str:
    """Pin a relative `sqlite:///file.db` to the current directory.

    MLflow caches one store per URI string, so a relative path would keep pointing at the
    directory of the first stage that used it (tests and flows change directories).
    """
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


def tracking_uri(params: Params) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or _absolute_sqlite(params.tracking.uri)


def registry_uri(params: Params) -> str:
    return os.environ.get("MLFLOW_REGISTRY_URI") or params.tracking.registry_uri or tracking_uri(params)


# The client's own variables (MLflow's names), read here for the probe and the messages only:
# the MLflow client reads the same ones, so what is checked is what is used.
USER_ENV, PASSWORD_ENV, TOKEN_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"
CA_ENV, INSECURE_ENV = "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS"
ACCESS_HELP = "an MLflow admin grants it with `evit grant-roles` (docs/operations.md#team-mode)"


def access_message(status: int | str, uri: str, what: str = "") -> str | None:
    """The one line for an MLflow refusal of this client (401/403, or MLflow's codes for them);
    None for any other error. It names the variable to set, never a value of one."""
    doing = f" ({what})" if what else ""
    if status in (401, "UNAUTHENTICATED"):
        missing = [k for k in (USER_ENV, PASSWORD_ENV) if not os.environ.get(k)]
        if missing and not os.environ.get(TOKEN_ENV):
            return (f"the MLflow server at {uri} requires a login{doing}: set {' and '.join(missing)} "
                    f"(the account's name and password; HTTP 401)")
        user = os.environ.get(USER_ENV) or "(token)"
        return (f"the MLflow server at {uri} did not accept the login of {user!r}{doing}: check "
                f"{PASSWORD_ENV if os.environ.get(USER_ENV) else TOKEN_ENV} (HTTP 401)")
    if status in (403, "PERMISSION_DENIED"):
        user = os.environ.get(USER_ENV) or "this client"
        return f"the MLflow server at {uri} denied {user!r} permission{doing} (HTTP 403); {ACCESS_HELP}"
    return None


def _tls_context(uri: str) -> Any:
    """The TLS context the MLflow client would use: its CA bundle variable, else the system's."""
    import ssl

    if not uri.startswith("https://"):
        return None
    if os.environ.get(INSECURE_ENV, "").lower() in ("1", "true"):
        return ssl._create_unverified_context()  # the user asked for it by name
    return ssl.create_default_context(cafile=os.environ.get(CA_ENV) or None)


def _tls_message(uri: str, exc: BaseException) -> str | None:
    import ssl

    reason = getattr(exc, "reason", exc)
    if not isinstance(reason, ssl.SSLError):
        return None
    if isinstance(reason, ssl.SSLCertVerificationError):
        return (f"the TLS certificate of the MLflow server at {uri} is not trusted ({reason.verify_message}): set "
                f"{CA_ENV} to the CA bundle that signed it (team mode: the services' tls/ca.pem)")
    return f"TLS with the MLflow server at {uri} failed ({short(exc)}); check {CA_ENV} and the URL's port"


def _login_header() -> dict[str, str]:
    import base64

    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    if os.environ.get(TOKEN_ENV):
        return {"Authorization": f"Bearer {os.environ[TOKEN_ENV]}"}
    return {}


def check_server(params: Params, *, timeout_s: float = 10.0) -> None:
    """Fail in one line, before a pipeline starts anything that logs, when the tracking or
    registry URI is an http(s) server that does not answer, answers as something other
    than an MLflow server (no `/health`), does not take TLS with the configured CA bundle,
    or refuses this client's login (team mode: the line names the variable to set). Other
    URIs (sqlite, file stores) need no server.

    Retried `tracking.retries` times (transient failures only), like every registry call."""
    import urllib.error
    import urllib.request

    for uri in dict.fromkeys((tracking_uri(params), registry_uri(params))):
        if not uri.startswith(("http://", "https://")):
            continue
        base = uri.rstrip("/")
        context = _tls_context(uri)

        def probe(url: str, headers: dict[str, str] | None = None) -> None:
            req = urllib.request.Request(url, headers=headers or {})
            urllib.request.urlopen(req, timeout=timeout_s, context=context).close()

        retries = params.tracking.retries
        try:
            with_retries(lambda: probe(f"{base}/health"), retries=retries, what=f"reaching the MLflow server at {uri}",
                         logger=log)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):  # a server that guards even /health: the login probe below tells
                pass
            else:
                raise UserError(f"the MLflow server at {uri} answered HTTP {exc.code} on /health: is it an MLflow "
                                "server? (MLFLOW_TRACKING_URI / tracking.uri, tracking.registry_uri in params.yaml)") \
                    from None
        except (OSError, ValueError) as exc:
            tls = _tls_message(uri, exc)
            if tls:
                raise UserError(tls) from None
            raise UserError(f"the MLflow server at {uri} did not answer after {retries + 1} attempt(s) "
                            f"(tracking.retries = {retries}; {short(exc)}); check that it is running "
                            "(MLFLOW_TRACKING_URI / tracking.uri in params.yaml)") from None
        try:  # any authenticated account may search (results are filtered): only a bad login fails here
            probe(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", _login_header())
        except urllib.error.HTTPError as exc:
            message = access_message(exc.code, uri)
            if message:
                raise UserError(message) from None
        except OSError:
            pass  # it answered /health a moment ago; the client's own call will report what it meets


def configure(params: Params) -> None:
    """Point the mlflow client at the configured tracking/registry servers."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; undo that so the variable
    # keeps meaning "set by the user" and a later configure() with other params is honoured.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(tracking_uri(params))
    mlflow.set_registry_uri(registry_uri(params))
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def parent_run_id() -> str | None:
    """The pipeline run a stage run nests under: the bound one, else `EVIT_PARENT_RUN_ID`."""
    return _PARENT.get() or os.environ.get(PARENT_RUN_ENV) or None


@contextlib.contextmanager
def parent_run(run_id: str | None) -> Iterator[None]:
    """Nest the stage runs opened in this context (this thread) under `run_id`."""
    token = _PARENT.set(run_id)
    try:
        yield
    finally:
        _PARENT.reset(token)


def ensure_experiment(params: Params) -> str:
    """The id of `tracking.experiment`, created (with `tracking.artifact_location`) if missing."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure(params)
    client = MlflowClient()
    name = params.tracking.experiment
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=params.tracking.artifact_location))
    except MlflowException:  # created concurrently by another task or process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def flat_params(section: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a params section into MLflow's key -> string form (values cut to 500 chars)."""
    out: dict[str, str] = {}
    if isinstance(section, dict):
        for k, v in section.items():
            out.update(flat_params(v, f"{prefix}{k}."))
        return out
    out[prefix.rstrip(".")] = str(section)[:500]
    return out


def numeric_metrics(obj: Any, prefix: str = "") -> dict[str, float]:
    """The finite numbers in a (nested) metrics document, flattened to MLflow metric names
    (`{"a": {"b": 1}}` -> `{"a.b": 1.0}`); booleans, strings and NaN/inf are left out."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(numeric_metrics(v, f"{prefix}{k}."))
    elif isinstance(obj, numbers.Real) and not isinstance(obj, bool) and math.isfinite(float(obj)):
        out[prefix.rstrip(".")] = float(obj)
    return out


class StageRun:
    """One open MLflow run of a stage: what a stage may record, without importing MLflow itself."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_params(self, values: dict[str, Any]) -> None:
        import mlflow

        mlflow.log_params({k: str(v)[:500] for k, v in values.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log the finite numbers of `metrics` (`numeric_metrics`; names cut to MLflow's 250 characters)."""
        import mlflow

        finite = {k[:250]: v for k, v in numeric_metrics(metrics).items()}
        if finite:
            mlflow.log_metrics(finite, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        import mlflow

        mlflow.log_dict(obj, artifact_file)

    @contextlib.contextmanager
    def child(self, run_name: str, tags: dict[str, str] | None = None) -> Iterator[StageRun]:
        """A run nested under this one (e.g. each training run of the ablation)."""
        import mlflow

        with mlflow.start_run(run_name=run_name, nested=True, tags=tags) as run:
            yield StageRun(run.info.run_id)


@contextlib.contextmanager
def stage_run(params: Params, stage: str, *, tags: dict[str, str] | None = None,
              log_sections: tuple[str, ...] = ()) -> Iterator[StageRun]:
    """Open an MLflow run for one stage (nested under the pipeline's parent run when there is one)."""
    import mlflow

    experiment_id = ensure_experiment(params)
    parent = parent_run_id()
    all_tags = {"evit.stage": stage, **(tags or {})}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    run = mlflow.start_run(run_name=stage, experiment_id=experiment_id, tags=all_tags,
                           nested=mlflow.active_run() is not None)
    status = "FAILED"
    try:
        for name in log_sections:
            section = params.section(name)
            mlflow.log_params(flat_params(section, f"{name}."))
        yield StageRun(run.info.run_id)
        status = "FINISHED"
    except BaseException as exc:
        status = end_status(exc)
        raise
    finally:
        mlflow.end_run(status)


def log_stage(params: Params, stage: str, *, tags: dict[str, str] | None = None, log_sections: tuple[str, ...] = (),
              values: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
              artifacts: Iterable[str | os.PathLike[str]] = (), artifact_path: str | None = None,
              dicts: dict[str, Any] | None = None, best_effort: bool = True) -> str | None:
    """Record a finished stage as one MLflow run: params sections and `values`, metrics, the
    artifacts that exist, JSON documents (`dicts`: artifact file -> object). The one way a
    stage logs itself; returns the run id.

    `best_effort`: a tracking failure (an unreachable server) is a warning, because the
    stage's own outputs are already written and must not be thrown away for it.
    """
    try:
        with stage_run(params, stage, tags=tags, log_sections=log_sections) as run:
            if values:
                run.log_params(values)
            if metrics:
                run.log_metrics(metrics)
            for name, obj in (dicts or {}).items():
                run.log_dict(obj, name)
            for f in artifacts:
                if Path(f).is_file():
                    run.log_artifact(f, artifact_path=artifact_path)
            return run.run_id
    except Exception as exc:
        if not best_effort:
            raise
        log.warning("%s: could not log to MLflow (%s: %s); the stage's outputs are written", stage,
                    type(exc).__name__, exc)
        return None


def has_stage_run(params: Params, parent: str, stage: str) -> bool:
    """Whether the pipeline run `parent` already has a child run for `stage`."""
    from mlflow import MlflowClient

    experiment_id = ensure_experiment(params)
    found = MlflowClient().search_runs(
        [experiment_id], max_results=1,
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.`evit.stage` = '{stage}'")
    return bool(found)


def end_status(exc: BaseException | None) -> str:
    """The MLflow run status for how the work ended: a SIGTERM/SIGINT stop is KILLED, not FAILED."""
    from evit.cancel import Cancelled

    if exc is None:
        return "FINISHED"
    if isinstance(exc, (Cancelled, KeyboardInterrupt)) or type(exc).__name__ == "TerminationSignal":
        return "KILLED"
    return "FAILED"


class PipelineRun:
    """The parent MLflow run of one pipeline run; created and ended explicitly (not the
    thread-local "active run"), so tasks in any thread can nest under it by id."""

    def __init__(self, params: Params, *, run_name: str = "pipeline", tags: dict[str, str] | None = None) -> None:
        from mlflow import MlflowClient

        experiment_id = ensure_experiment(params)
        self.client = MlflowClient()
        run = self.client.create_run(experiment_id, run_name=run_name, tags={"evit.stage": "pipeline", **(tags or {})})
        self.run_id: str = run.info.run_id
        self.experiment_id = experiment_id

    def log_params(self, values: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in values.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


@contextlib.contextmanager
def pipeline_run(params: Params, *, run_name: str = "pipeline",
                 tags: dict[str, str] | None = None) -> Iterator[PipelineRun]:
    """Open the parent run; it ends FINISHED, KILLED when stopped by a signal, else FAILED if the body raises."""
    run = PipelineRun(params, run_name=run_name, tags=tags)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except BaseException as exc:
        status = end_status(exc)
        raise
    finally:
        try:
            run.end(status)
        except Exception as exc:  # noqa: BLE001 - do not mask the pipeline's own outcome
            log.warning("could not close the MLflow pipeline run %s: %s", run.run_id, exc)
