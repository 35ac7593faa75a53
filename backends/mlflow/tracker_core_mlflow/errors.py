"""How MLflow failures become tracker-core errors.

:func:`classify_mlflow_error` tells transient failures (worth a retry) from permanent ones;
:func:`tracking_errors` is the one place where a failed MLflow call is turned into a
:class:`~tracker_core.errors.TrackingStoreError` naming the operation, with credentials
scrubbed from its message *and* from the chained originals (MLflow puts the full tracking URL,
``user:password@`` included, into its own messages).

Transient failures are raised as :class:`TransientTrackingStoreError`, which is both a
``TrackingStoreError`` and a :class:`~tracker_core.errors.TransientError`, so the retrier
retries them without knowing MLflow.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from tracker_core.errors import TrackerError, TrackingStoreError, TransientError, redact
from tracker_core.retry import classify_chain, classify_http_status, exception_chain

__all__ = [
    "PERMANENT_CODES",
    "TRANSIENT_CODES",
    "TransientTrackingStoreError",
    "classify_mlflow_error",
    "environ_changed_while_read",
    "error_code",
    "login_refused",
    "scrub_chain",
    "tracking_errors",
]

#: MLflow error codes that are worth a retry whatever their origin
TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})
#: MLflow error codes that no retry can fix
PERMANENT_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "BAD_REQUEST",
        "INVALID_STATE",
        "ENDPOINT_NOT_FOUND",
        "NOT_IMPLEMENTED",
    }
)
#: SQLite's answer to a write on a read-only file (MLflow reports it TEMPORARILY_UNAVAILABLE)
_READ_ONLY = "attempt to write a readonly database"
# "failed with error code 503 != 200" (non-JSON error body) and urllib3's
# "too many 503 error responses" (MLflow's own HTTP retries exhausted)
_STATUS_IN_MESSAGE = re.compile(r"(?:error code|too many) (\d{3})\b")


_ENVIRON_READERS = frozenset({"collections.abc", "_collections_abc", "os"})

#: another request wrote the same run's metric, param or tag row first: a retried request
#: (its first attempt timed out on our side) still running on the server. MLflow's SQL store
#: skips rows it finds, but not rows a concurrent transaction has yet to commit, so the later
#: insert fails (PostgreSQL, SQLite, MySQL wording). A retry finds them committed and skips
#: them; a param logged with another value then fails for good (INVALID_PARAMETER_VALUE).
_CONCURRENT_DUPLICATE = re.compile(
    r'duplicate key value violates unique constraint "(?:metric|latest_metric|param|tag)_pk"'
    r"|UNIQUE constraint failed: (?:metrics|latest_metrics|params|tags)\."
    r"|Duplicate entry .* for key '(?:metrics|latest_metrics|params|tags)\.PRIMARY'"
)


class TransientTrackingStoreError(TrackingStoreError, TransientError):
    """A tracking-store failure worth retrying (connection, timeout, 5xx, 429, locked DB)."""


def error_code(exc: BaseException) -> str | None:
    """The MLflow error code name (``"RESOURCE_DOES_NOT_EXIST"``...) of an MlflowException."""
    code = getattr(exc, "error_code", None)
    return code if isinstance(code, str) else None


def _http_status(exc: BaseException) -> int | None:
    match = _STATUS_IN_MESSAGE.search(str(exc))
    return int(match.group(1)) if match else None


def environ_changed_while_read(exc: BaseException) -> bool:
    """True for the ``KeyError`` of a variable deleted from ``os.environ`` by another thread
    while this one iterated over it (``os.environ.items()``, ``dict(os.environ)``...).

    MLflow's telemetry does that once per process: ``import mlflow`` sets
    ``_MLFLOW_TELEMETRY_SESSION_ID``, and when its background thread fails to fetch its
    configuration (no internet), ``_set_telemetry_client(None)`` pops it
    (``mlflow/telemetry/client.py``), while ``requests`` iterates ``os.environ`` for proxy
    settings on every HTTP request (``urllib.request.getproxies_environment``). Such a request
    was never sent; trying again is safe.
    """
    if not isinstance(exc, KeyError):
        return False
    modules: list[str] = []  # the module of each frame, outermost first
    tb = exc.__traceback__
    while tb is not None:
        modules.append(str(tb.tb_frame.f_globals.get("__name__")))
        tb = tb.tb_next
    # os._Environ.__getitem__, called by a Mapping view (items(), values(): the module
    # _collections_abc names itself collections.abc) or by os.environ.copy()
    return len(modules) >= 2 and modules[-1] == "os" and modules[-2] in _ENVIRON_READERS


def _classify_one(exc: BaseException) -> bool | None:
    import requests
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, TransientError):
        return True
    if _CONCURRENT_DUPLICATE.search(str(exc)):
        return True
    if environ_changed_while_read(exc):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return True
    if isinstance(exc, requests.exceptions.RetryError):
        return True  # MLflow's own retries on 408/429/5xx ran out
    if type(exc).__name__ == "OperationalError" and "database is locked" in str(exc):
        return True  # SQLAlchemy / sqlite3 busy database
    if _READ_ONLY in str(exc):
        return False  # SQLite: the database file (or its folder) is read-only
    if not isinstance(exc, MlflowException):
        return None
    code = error_code(exc)
    if code in TRANSIENT_CODES:
        return True
    status = _http_status(exc)
    if status is not None:
        return classify_http_status(status)
    if isinstance(exc, RestException) and code == "INTERNAL_ERROR":
        return True  # the server answered 500
    if code in PERMANENT_CODES:
        return False
    http = int(exc.get_http_status_code())  # type: ignore[no-untyped-call]
    if code != "INTERNAL_ERROR" and 400 <= http < 500:
        return classify_http_status(http)
    return None  # a local INTERNAL_ERROR: look at what caused it


#: what a database server says when it refuses a login (PostgreSQL: SQLSTATE class 28 and its
#: messages; MySQL: error 1045; SQL Server: error 18456), wherever the driver puts it
_LOGIN_REFUSED = re.compile(
    r'password authentication failed|no pg_hba\.conf entry|role "[^"]*" does not exist'
    r"|Access denied for user|Login failed for user"
)


def login_refused(exc: BaseException) -> bool:
    """Whether a database server refused the login (a wrong password, an unknown role, an
    access rule): permanent, unlike a server that is down or still starting."""
    for link in exception_chain(exc):
        sqlstate = getattr(link, "sqlstate", None) or getattr(link, "pgcode", None)
        if isinstance(sqlstate, str) and sqlstate.startswith("28"):
            return True
        if _LOGIN_REFUSED.search(str(link)):
            return True
    return False


def classify_mlflow_error(exc: BaseException) -> bool | None:
    """True if ``exc`` (or what caused it) is transient, False if permanent, None if unknown.

    Transient: requests connection errors and timeouts, MLflow's exhausted HTTP retries,
    HTTP 5xx / 408 / 429, ``TEMPORARILY_UNAVAILABLE`` / ``REQUEST_LIMIT_EXCEEDED``, a server
    ``INTERNAL_ERROR``, SQLite's "database is locked", an environment variable deleted while
    it was read (:func:`environ_changed_while_read`). Permanent: invalid parameter, missing
    or existing resource, permission denied, other 4xx. A wrapped
    :class:`~tracker_core.errors.TrackingStoreError` is judged by its cause.
    """
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, TrackerError):
        cause = exc.__cause__
        return bool(cause is not None and classify_mlflow_error(cause))
    verdict = classify_chain(exc, _classify_one)
    if verdict is not None:
        return verdict
    return None


def scrub_chain(exc: BaseException, *secrets: str | None) -> None:
    """Redact credentials in place from ``exc`` and every exception it chains to."""
    for link in exception_chain(exc):
        with contextlib.suppress(Exception):  # exotic exception types: best effort
            link.args = tuple(
                redact(arg, *secrets) if isinstance(arg, str) else arg for arg in link.args
            )
            message: Any = getattr(link, "message", None)
            if isinstance(message, str):
                link.message = redact(message, *secrets)  # type: ignore[attr-defined]


@contextlib.contextmanager
def tracking_errors(operation: str, uri: str, *secrets: str | None) -> Iterator[None]:
    """Turn any failure inside the block into a (possibly transient) TrackingStoreError.

    Tracker errors pass through unchanged. The original is chained as ``__cause__``; every
    message in the chain is redacted.
    """
    try:
        yield
    except TrackerError:
        raise
    except Exception as exc:
        scrub_chain(exc, *secrets)
        transient = classify_mlflow_error(exc)
        kind = TransientTrackingStoreError if transient else TrackingStoreError
        detail = (
            _not_an_mlflow_server(exc, uri)
            or (_unreachable(exc, uri) if transient else None)
            or f"{type(exc).__name__}: {exc}"
        )
        message = redact(f"{operation} on tracking store {uri} failed: {detail}", *secrets)
        raise kind(message) from exc


#: MLflow's message for an answer that is not 200: its status, and the body it read
_ANSWER = re.compile(
    r"endpoint (\S+) failed with error code (\d{3}) != 200\. Response body: '(.*)", re.S
)
#: why a connection failed, as urllib3 words it
_REASON = re.compile(r"(\[Errno -?\d+\] [^'\")]+|Read timed out|timed out)")


def _not_an_mlflow_server(exc: BaseException, uri: str) -> str | None:
    """For an answer no MLflow server gives (an HTML page, a 404 or 501 without MLflow's
    JSON error): a short text that says so, instead of the page."""
    match = _ANSWER.search(str(exc))
    if match is None:
        return None
    endpoint, status, body = match.group(1), int(match.group(2)), match.group(3).lstrip()
    if body.startswith("{") and "error_code" in body:
        return None  # MLflow's own error
    if status not in (404, 405, 501) and not body.startswith("<"):
        return None
    return (
        f"the server answered HTTP {status} to {endpoint} with a page that is not MLflow's: "
        f"is {uri} an MLflow tracking server? (check the host, the port and any path prefix)"
    )


def _unreachable(exc: BaseException, uri: str) -> str | None:
    """For a request to a server that never answered (refused, unresolved, timed out): a
    short text that says so and what to check."""
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    text = " ".join(str(link) for link in exception_chain(exc))
    never_answered = any(
        isinstance(link, requests.exceptions.ConnectionError | requests.exceptions.Timeout)
        for link in exception_chain(exc)
    ) or any(marker in text for marker in ("NewConnectionError", "timed out", "Max retries"))
    if not never_answered:
        return None
    reason = _REASON.search(text)
    why = reason.group(1).strip() if reason else ""
    if "timed out" in why:
        return (
            f"{uri} did not answer within the request timeout ({why}; "
            "MLFLOW_HTTP_REQUEST_TIMEOUT): is an MLflow tracking server running there?"
        )
    why = f" ({why})" if why else ""
    return f"could not reach {uri}{why}: is an MLflow tracking server running there?"
