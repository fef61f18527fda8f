"""Talking to the MLflow registry: one client setup, one HTTP policy, retries with one rule.

Transient failures (registry unreachable, 5xx) are retried `tracking.retries` times with
exponential backoff (`evit.retry`, the project's one rule of what is transient); then
`RegistryError` says what failed, where, and what to check.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from evit.config import Params
from evit.errors import RegistryError, UserError
from evit.retry import is_transient, short, with_retries
from evit.tracking import access_message, configure, registry_uri, tracking_uri

log = logging.getLogger(__name__)

T = TypeVar("T")


@contextlib.contextmanager
def http_policy(timeout_s: int = 30) -> Iterator[None]:
    """Let our retry loop, not MLflow's internal one (7 tries, minutes of backoff), decide.

    A user's own MLFLOW_HTTP_REQUEST_* settings win.
    """
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
              "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    added = [k for k in wanted if k not in os.environ]
    for k in added:
        os.environ[k] = wanted[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def error_code(exc: BaseException) -> str | None:
    """MLflow's error code of `exc` (None for errors that are not MLflow's)."""
    from mlflow.exceptions import MlflowException

    return str(exc.error_code) if isinstance(exc, MlflowException) else None


def retrying(what: str, fn: Callable[[], T], retries: int, uri: str, *, base_delay: float = 0.5,
             on_failure: Callable[[], None] | None = None) -> T:
    """Call `fn`, retrying transient failures `retries` times; RegistryError once they are spent."""
    try:
        return with_retries(fn, retries=retries, what=what, base_delay=base_delay, on_failure=on_failure, logger=log)
    except UserError:
        raise
    except Exception as exc:
        if not is_transient(exc):
            code = error_code(exc)
            if code is None:
                raise
            denied = access_message(code, uri, what)
            if denied:  # team mode: a missing login or grant is one line that names the variable or the fix
                raise RegistryError(denied) from None
            # an answer that is not MLflow's (a web server's 404 page, a proxy's login form) or a refusal
            raise RegistryError(
                f"{what}: the MLflow registry at {uri} refused the request: {short(exc)}. Check that {uri} is an "
                "MLflow server (MLFLOW_TRACKING_URI / tracking.uri in params.yaml).") from exc
        raise RegistryError(
            f"{what}: the MLflow registry at {uri} did not answer after {retries + 1} attempt(s) "
            f"(tracking.retries = {retries}); last error: {short(exc)}. Check that the server is running "
            "(MLFLOW_TRACKING_URI / tracking.uri in params.yaml)."
        ) from exc


def mlflow_client(params: Params) -> Any:
    from mlflow import MlflowClient

    configure(params)
    return MlflowClient(tracking_uri=tracking_uri(params), registry_uri=registry_uri(params))


