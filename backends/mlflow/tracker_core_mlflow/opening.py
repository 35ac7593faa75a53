"""Opening an MLflow tracking URI: which URIs MLflow has a store for, the HTTP request
timeout, a database that refuses the login named at once, a fresh SQLite database migrated by
one process at a time.

:func:`open_client` builds the ``MlflowClient`` a
:class:`~tracker_core_mlflow.tracking.MlflowTrackingStore` uses (one attempt per request, see
:mod:`tracker_core_mlflow.rest`), its migration INFO lines kept out of the user's output.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tracker_core import arguments
from tracker_core.errors import ConfigurationError, TrackingStoreError, redact
from tracker_core_mlflow.errors import login_refused, scrub_chain, tracking_errors
from tracker_core_mlflow.quiet import quiet

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = [
    "DEFAULT_REQUEST_TIMEOUT",
    "TRACKING_SCHEMES",
    "check_tracking_uri",
    "open_client",
    "resolve_request_timeout",
]

#: seconds an HTTP request to an MLflow server may take (connect, then read) unless the store's
#: ``request_timeout`` or ``MLFLOW_HTTP_REQUEST_TIMEOUT`` says otherwise (MLflow's default: 120)
DEFAULT_REQUEST_TIMEOUT = 30.0


def resolve_request_timeout(explicit: float | None = None) -> float:
    """``explicit`` if given, else ``MLFLOW_HTTP_REQUEST_TIMEOUT`` if set, else
    :data:`DEFAULT_REQUEST_TIMEOUT`."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_TIMEOUT

    if explicit is not None:
        if explicit <= 0:
            raise ConfigurationError(f"request_timeout must be positive, got {explicit!r}")
        return float(explicit)
    if MLFLOW_HTTP_REQUEST_TIMEOUT.defined:
        return float(MLFLOW_HTTP_REQUEST_TIMEOUT.get())  # type: ignore[no-untyped-call]
    return DEFAULT_REQUEST_TIMEOUT


def _is_migration_chatter(record: logging.LogRecord) -> bool:
    """MLflow's INFO lines when it opens (and migrates) a database."""
    return record.levelno < logging.WARNING


@contextlib.contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[bool]:
    """Hold a file lock on a SQLite database while MLflow opens it.

    MLflow migrates a fresh database on first use; several worker processes starting at
    once on the same new file race in alembic and fail. The first one to take the lock
    migrates; the others find the tables ready. The lock is a ``flock`` on the database file
    itself; SQLite's own locks are POSIX record locks, which ``flock`` does not touch. Other
    URIs need no lock (yields False).

    An existing database is opened read-only for the lock (``flock`` needs no write access),
    so a read-only database file serves reads; writes to it then fail in MLflow with a
    :class:`~tracker_core.errors.TrackingStoreError`. A missing database is created empty
    (SQLite reads an empty file as an empty database), with its folder, as MLflow would.
    A file that cannot be opened raises :class:`~tracker_core.errors.TrackingStoreError`.
    """
    parts = urlsplit(uri)
    if parts.scheme != "sqlite" or parts.path in ("", "/", "/:memory:"):
        yield False
        return
    db_path = Path(parts.path[1:])  # sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db
    try:
        try:
            fd = os.open(db_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(db_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise TrackingStoreError(
            f"cannot open the SQLite tracking database {db_path}: {reason}; check that the "
            "path is right and that this user may read it (and write it, to record runs)"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


#: the schemes MLflow has a tracking store for (a ``+driver`` suffix is SQLAlchemy's)
TRACKING_SCHEMES = (
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "http",
    "https",
    "file",
    "databricks",
    "databricks-uc",
    "uc",
)


def _store_scheme(tracking_uri: str) -> str:
    """The scheme of a tracking URI, without SQLAlchemy's ``+driver`` suffix."""
    return urlsplit(tracking_uri).scheme.split("+", 1)[0].lower()


def check_tracking_uri(tracking_uri: str) -> None:
    """Refuse, before any connection, a URI for which MLflow has no tracking store."""
    scheme = _store_scheme(tracking_uri)
    if tracking_uri in ("databricks", "databricks-uc", "uc") or scheme in TRACKING_SCHEMES:
        return
    if len(scheme) <= 1:  # a plain path (or a Windows drive): MLflow's file store
        return
    arguments.refuse(
        "tracking_uri",
        tracking_uri,
        f"MLflow has no tracking store for {scheme}://; give sqlite:///path/mlflow.db, "
        "postgresql+psycopg://host/db (or mysql://, mssql://), or the http(s):// URL of an "
        "MLflow tracking server",
    )


#: database schemes MLflow reaches through SQLAlchemy over the network
_SERVER_DATABASES = frozenset({"postgresql", "mysql", "mssql"})


def _refuse_a_refused_login(uri: str, display_uri: str, password: str | None) -> None:
    """Connect once, and fail at once if the database refuses the login.

    MLflow retries a failed first connection ten times with doubling sleeps (about 100 s):
    right for a database that is down or starting, which is left to it, but a wrong password
    or an unknown role would only fail the same way 100 s later. Raises a permanent
    :class:`~tracker_core.errors.TrackingStoreError` carrying the server's words, redacted."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = None
    try:
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool)
        with engine.connect():
            return
    except Exception as exc:
        if not login_refused(exc):
            return  # down, starting, unreachable, no driver...: MLflow says so itself
        scrub_chain(exc, password)
        orig = getattr(exc, "orig", None) or exc
        detail = redact(str(orig).strip(), password)
        raise TrackingStoreError(
            f"open on tracking store {display_uri} failed: the database refused the login: {detail}"
        ) from exc
    finally:
        if engine is not None:
            engine.dispose()


def open_client(
    tracking_uri: str, display_uri: str, password: str | None, request_timeout: float
) -> MlflowClient:
    """A client of ``tracking_uri`` whose database is ready: a refused login raised at once,
    a fresh SQLite database migrated under its file lock."""
    from tracker_core_mlflow.rest import single_attempt_client

    if _store_scheme(tracking_uri) in _SERVER_DATABASES:
        _refuse_a_refused_login(tracking_uri, display_uri, password)
    with (
        quiet("mlflow.store.db.utils", _is_migration_chatter),
        _sqlite_init_lock(tracking_uri) as is_sqlite,
    ):
        client = single_attempt_client(tracking_uri, request_timeout)
        if is_sqlite:
            with tracking_errors("open", display_uri, password):
                client.search_experiments(max_results=1)  # a fresh DB migrates here
    return client
