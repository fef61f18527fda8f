"""Which failures are worth retrying, and the retry loop: one rule for the whole project.

A stage (or a registry call, or a flow's bookkeeping) that fails because S3, the MLflow
server or DVC's lock was briefly unavailable will likely succeed a little later; one that
fails on a bad params value, a corrupt checkpoint or a bug will fail the same way again,
so retrying it only delays the error message. So:
- every `evit.errors.UserError` (anywhere in the exception's cause chain) is final;
- network and service hiccups are transient: connection resets and timeouts, S3
  throttling and 5xx codes, MLflow's "internal error / unavailable / rate limited" codes
  (what an MLflow server answers with while restarting or overloaded), DVC's lock and
  transfer errors;
- anything not recognised is final.
Third-party exceptions are recognised by their class names along the MRO, so this module
imports none of those packages (MLflow stays in `evit.tracking` and `evit.registry`).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from evit.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN}
_S3_RETRY_CODES = {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
                   "Throttling", "ThrottlingException", "500", "502", "503", "504"}
MLFLOW_RETRY_CODES = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED",
                                "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "ABORTED"})
"""MLflow error codes that may go away by asking again (a 5xx, a timeout, a rate limit)."""
_NETWORK_PACKAGES = ("botocore", "aiobotocore", "urllib3", "requests", "aiohttp", "s3fs")
_NETWORK_ERRORS = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                   "ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout", "ProtocolError",
                   "NewConnectionError", "MaxRetryError", "ClientConnectorError", "ServerDisconnectedError",
                   "ResponseStreamingError", "IncompleteReadError"}
_NEVER = {"SSLError", "InvalidURL", "InvalidSchema", "MissingSchema", "InvalidHeader"}
"""Network-package errors (some subclass a connection error) that asking again cannot fix."""
_DVC_RETRY = {"LockError", "UploadError", "DownloadError"}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _classes(e: BaseException, packages: tuple[str, ...]) -> set[str]:
    """Names of the classes along `e`'s MRO that come from `packages`."""
    return {c.__name__ for c in type(e).__mro__ if c.__module__.split(".")[0] in packages}


def _one_is_transient(e: BaseException) -> bool:
    network = _classes(e, _NETWORK_PACKAGES)
    if network:
        if type(e).__name__ in _NEVER:
            return False
        if "ClientError" in network:
            code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
            return code in _S3_RETRY_CODES
        if network & _NETWORK_ERRORS:
            return True
    if "MlflowException" in _classes(e, ("mlflow",)):
        return str(getattr(e, "error_code", "")) in MLFLOW_RETRY_CODES
    if _classes(e, ("dvc",)) & _DVC_RETRY:
        return True
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS


def is_transient(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) is a network / service hiccup worth retrying."""
    if any(isinstance(e, UserError) for e in _chain(exc)):
        return False
    return any(_one_is_transient(e) for e in _chain(exc))


def short(exc: BaseException | None) -> str:
    """The first line of an error, cut to 300 characters (for one-line messages)."""
    text = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else repr(exc)
    return text[:300]


def with_retries(fn: Callable[[], T], *, retries: int, what: str, base_delay: float = 0.5,
                 on_failure: Callable[[], None] | None = None, logger: logging.Logger | None = None) -> T:
    """Call `fn`, retrying transient failures `retries` times with exponential backoff.

    A final failure (`is_transient` False) is raised at once; the last transient one is raised
    once the retries are spent. `on_failure` runs after every failed attempt (e.g. to take
    back what the attempt created).
    """
    logger = logger or log
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            if on_failure is not None:
                on_failure()
            if attempt >= retries or not is_transient(exc):
                raise
            delay = base_delay * 2**attempt
            logger.warning("%s failed (%s); retry %d/%d in %.1fs", what, short(exc), attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
