"""The settings of a task-service process (API, worker or both), as one frozen value.

Defaults are the embedded layout: everything under one data folder (``./tracker-core-data``):
a private PostgreSQL for the task queue (``<data>/postgres``), MLflow tracking in SQLite
(``<data>/mlflow.db``) and models in a folder (``<data>/models``). The distributed layout
sets ``database_url`` (the PostgreSQL shared by API hosts and workers), and usually
``tracking_uri`` / ``artifact_uri`` (the MLflow server and bucket every worker uses).

Timings, and what they decide:

- ``heartbeat_seconds``: how often a worker tells PostgreSQL it is alive;
- ``stall_seconds``: a worker silent for this long is dead; its task is put back in the queue
  (so a killed worker's task is picked up after about ``stall_seconds + stall_check_seconds``);
  a live worker's task is never taken from it, however long it runs;
- ``stall_check_seconds``: how often a worker looks for dead workers' tasks;
- ``poll_seconds``: how often an idle worker polls for tasks, as a fallback to LISTEN/NOTIFY;
- ``cancel_grace_seconds``: how long a canceled task may take to reach a safe point before its
  training process is terminated; ``shutdown_grace_seconds`` the same when a worker stops;
- ``database_outage_seconds``: how long an API or a worker waits for its task database to
  answer again (an outage: PostgreSQL stopped, restarted, unreachable) before it gives up
  and exits (see :mod:`tracker_core.service.outage`);
- ``lease_seconds``: the run lease of the managers the training processes use (see
  :mod:`tracker_core.leases`): a killed worker's run can be resumed this long after it died;
- ``warm_child_seconds``: how long a training process whose job ended clean waits for the
  worker's next job of the same method (0: a new process for every job).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import attrs

from tracker_core.leases import DEFAULT_LEASE_SECONDS
from tracker_core.service.errors import ServiceConfigurationError
from tracker_core.uris import has_secret_query, has_userinfo, redact_uri

__all__ = ["DEFAULT_DATA_DIR", "DEFAULT_HOST", "DEFAULT_PORT", "ServiceSettings", "psycopg_url"]

DEFAULT_DATA_DIR = "tracker-core-data"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
_METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:-]{0,127}$")


def psycopg_url(url: str) -> str:
    """A PostgreSQL URL psycopg accepts: SQLAlchemy's ``postgresql+psycopg://`` (as MLflow
    takes it) loses its driver suffix; anything else must be ``postgres(ql)://``."""
    scheme, sep, rest = url.partition("://")
    base = scheme.split("+", 1)[0].lower()
    if not sep or base not in ("postgresql", "postgres"):
        got = f"scheme {scheme!r}" if sep else "no scheme"  # never the value: it may be secret
        raise ServiceConfigurationError(f"the task database must be a postgresql:// URL, got {got}")
    return f"postgresql://{rest}"


def _no_credentials(_inst: object, _attribute: attrs.Attribute[Any], value: str | None) -> None:
    """Models are stored under this URI, and it is shown in logs and task results: credentials
    never travel in it (as :func:`tracker_core.connect` refuses them)."""
    if value is not None and (has_userinfo(value) or has_secret_query(value)):
        raise ServiceConfigurationError(
            f"--artifact-uri {redact_uri(value, keep_user=False)} carries credentials: give "
            "them to the service's processes through the standard credential chain instead "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS profiles or roles, "
            "GOOGLE_APPLICATION_CREDENTIALS)"
        )


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not value > 0:
        raise ServiceConfigurationError(f"{attribute.name} must be > 0, got {value!r}")


def _check_methods(
    _inst: object, _attribute: attrs.Attribute[tuple[tuple[str, str], ...]], value: object
) -> None:
    assert isinstance(value, tuple)
    for name, spec in value:
        if not _METHOD_NAME.match(name):
            raise ServiceConfigurationError(f"invalid method name {name!r} in --method")
        if ":" not in spec:
            raise ServiceConfigurationError(
                f"--method {name}={spec}: the spec must be a 'module:attr' path"
            )


def parse_method_options(
    options: list[str] | tuple[str, ...] | None,
) -> tuple[tuple[str, str], ...]:
    """``["name=module:attr", ...]`` (``--method``; also ``$TRACKER_CORE_METHODS``, comma
    separated) as ``((name, spec), ...)``."""
    items = list(options or [])
    env = os.environ.get("TRACKER_CORE_METHODS", "")
    items += [part for part in (p.strip() for p in env.split(",")) if part]
    out: dict[str, str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise ServiceConfigurationError(
                f"--method {item!r}: expected NAME=module:attr (e.g. my-method=pkg.mod:MyMethod)"
            )
        out[name.strip()] = spec.strip()
    result = tuple(sorted(out.items()))
    _check_methods(None, None, result)  # type: ignore[arg-type]
    return result


@attrs.frozen
class ServiceSettings:
    """Everything a service process needs; see the module docstring for the timings."""

    #: the task database; None: the embedded PostgreSQL under ``data_dir``
    database_url: str | None = attrs.field(
        default=None, converter=attrs.converters.optional(psycopg_url)
    )
    data_dir: Path = attrs.field(default=Path(DEFAULT_DATA_DIR), converter=Path)
    #: MLflow tracking URI; None: ``sqlite:///<data_dir>/mlflow.db``
    tracking_uri: str | None = None
    #: where models live; None: ``<data_dir>/models``
    artifact_uri: str | None = attrs.field(default=None, validator=_no_credentials)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    #: tasks one worker runs at once (one training process each)
    concurrency: int = attrs.field(default=1, validator=_positive)
    heartbeat_seconds: float = attrs.field(default=5.0, validator=_positive)
    stall_seconds: float = attrs.field(default=20.0, validator=_positive)
    stall_check_seconds: int = attrs.field(default=5, validator=_positive)
    poll_seconds: float = attrs.field(default=2.0, validator=_positive)
    cancel_grace_seconds: float = attrs.field(default=30.0, validator=_positive)
    shutdown_grace_seconds: float = attrs.field(default=10.0, validator=_positive)
    lease_seconds: float = attrs.field(default=DEFAULT_LEASE_SECONDS, validator=_positive)
    database_outage_seconds: float = attrs.field(default=300.0, validator=_positive)
    warm_child_seconds: float = attrs.field(default=10.0, validator=attrs.validators.ge(0))
    #: jobs that ended are deleted from the queue's tables this many hours later (their
    #: tasks stay: the task table is the record)
    keep_jobs_hours: int = attrs.field(default=24, validator=attrs.validators.ge(0))
    #: attempts of a task whose stores keep failing (after the stores' own retries)
    max_attempts: int = attrs.field(default=3, validator=_positive)
    #: wait before retrying such a task: retry_wait_seconds * 2**(failures - 1)
    retry_wait_seconds: float = attrs.field(default=10.0, validator=_positive)
    #: extra methods offered besides the entry points: ((name, "module:attr"), ...)
    methods: tuple[tuple[str, str], ...] = attrs.field(default=(), validator=_check_methods)
    #: seed passed to the methods' initial_params
    seed: int = 0
    #: as root, let the embedded PostgreSQL create its ``pgserver`` account (see embedded)
    allow_root: bool = False
    #: temporary files of the training processes (None: the system's temporary folder)
    work_dir: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    #: host names a request's ``Host`` header may name (empty: the bound address's names plus
    #: localhost and 127.0.0.1; ``*``: any); see :mod:`tracker_core.service.auth`
    allowed_hosts: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    #: run the API without authentication, on any address (a WARNING at start and on /health)
    insecure_no_auth: bool = False

    def __attrs_post_init__(self) -> None:
        if self.stall_seconds <= 2 * self.heartbeat_seconds:
            raise ServiceConfigurationError(
                f"stall_seconds ({self.stall_seconds}) must be more than twice "
                f"heartbeat_seconds ({self.heartbeat_seconds}), or live workers look dead"
            )

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def resolved_tracking_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        return f"sqlite:///{(self.data_dir / 'mlflow.db').resolve()}"

    @property
    def resolved_artifact_uri(self) -> str:
        if self.artifact_uri:
            return self.artifact_uri
        return str((self.data_dir / "models").resolve())

    def redacted_database_url(self) -> str:
        """The database URL without its password (userinfo or ``?password=``), for logs."""
        if self.database_url is None:
            return f"embedded PostgreSQL in {self.data_dir / 'postgres'}"
        return redact_uri(self.database_url)

    def redacted_tracking_uri(self) -> str:
        """The tracking URI without its password, for logs."""
        return redact_uri(self.resolved_tracking_uri)
