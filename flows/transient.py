"""Which task failures are worth retrying: network and service hiccups, never user errors.

A stage that fails because S3, the MLflow server or DVC's lock was briefly unavailable
will likely succeed a minute later; a stage that fails on a bad params value, a corrupt
checkpoint or a bug will fail the same way again, so retrying it only delays the error
message. Every `evit.errors.UserError` is final (the stages already retried what they
could, e.g. registry calls); so is anything not recognised below.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

from evit.errors import UserError

_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN}
_S3_RETRY_CODES = {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
                   "Throttling", "ThrottlingException", "500", "502", "503", "504"}
_MLFLOW_RETRY_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED",
                       "DEADLINE_EXCEEDED", "ABORTED"}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _one_is_transient(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return True
    module = type(e).__module__
    name = type(e).__name__
    if module.startswith(("botocore", "aiobotocore", "urllib3", "requests", "aiohttp", "s3fs")):
        if name in ("ClientError",):
            code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
            return code in _S3_RETRY_CODES
        return name in ("EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                        "ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout", "ProtocolError",
                        "NewConnectionError", "MaxRetryError", "ClientConnectorError", "ServerDisconnectedError",
                        "ResponseStreamingError", "IncompleteReadError")
    if module.startswith("mlflow") and name in ("MlflowException", "RestException"):
        return str(getattr(e, "error_code", "")) in _MLFLOW_RETRY_CODES
    if module.startswith("dvc"):
        return name in ("LockError", "UploadError", "DownloadError")
    return False


def is_transient(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) is a network / service hiccup worth retrying."""
    if any(isinstance(e, UserError) for e in _chain(exc)):
        return False
    return any(_one_is_transient(e) for e in _chain(exc))


def retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry transient failures only."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as e:  # noqa: BLE001 - reading the result may raise the failure itself
            exc = e
    return isinstance(exc, BaseException) and is_transient(exc)
