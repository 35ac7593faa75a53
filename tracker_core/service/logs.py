"""The log lines of the service's processes: one format, and no credential in any of them.

``serve`` and ``worker`` (:func:`configure_service_logging`) and each training process
(:func:`configure_child_logging`) write every logger's lines (tracker-core's, uvicorn's,
Procrastinate's, psycopg's, MLflow's, Python warnings) as ``time LEVEL logger: message``
through :class:`RedactingFormatter`, which passes the whole line, traceback included, through
:func:`tracker_core.uris.redact_text`: a URI's password never reaches a log.

A record logged with ``extra={ONCE: True}`` (a notice that is true of every training process,
such as the pickle format's warning) is said once per worker, not once per training process:
the training process hands it to its worker (:func:`relay_once`), which logs it the first time
(:func:`log_once`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TextIO

from tracker_core.uris import redact_text

__all__ = [
    "FORMAT",
    "ONCE",
    "RedactingFormatter",
    "configure_child_logging",
    "configure_service_logging",
    "log_once",
]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: the ``extra`` key of a record to say once per worker process
ONCE = "tracker_core_once"
_SERVICE_HANDLER = "_tracker_service"

log = logging.getLogger(__name__)
_said: set[str] = set()


class RedactingFormatter(logging.Formatter):
    """A formatter whose lines have every URI's password (userinfo, ``password=``) masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def _install(stream: TextIO, fmt: str) -> logging.Handler:
    """One handler on the root logger (replacing one we installed before)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _SERVICE_HANDLER, False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter(fmt))
    setattr(handler, _SERVICE_HANDLER, True)
    root.addHandler(handler)
    logging.captureWarnings(True)  # warnings.warn(...) as log lines, not bare stderr text
    return handler


def configure_service_logging(level: int, *, verbose: bool = False) -> None:
    """``serve`` / ``worker``: tracker-core at ``level``, Procrastinate at WARNING (``level``
    when ``verbose``), everything else at WARNING, all in one format on the command line's
    standard error."""
    core = logging.getLogger("tracker_core")
    stream: TextIO = sys.stderr
    for cli in [h for h in core.handlers if getattr(h, "_tracker_cli", False)]:
        stream = getattr(cli, "stream", stream)
        core.removeHandler(cli)  # its lines go through the root handler, like every other's
    _install(stream, FORMAT)
    logging.getLogger().setLevel(logging.WARNING)
    core.setLevel(level)
    logging.getLogger("procrastinate").setLevel(level if verbose else logging.WARNING)
    # a database outage is said once, when it starts and when it ends (tracker_core.service.
    # outage), not by each of the pool's connection attempts
    logging.getLogger("psycopg.pool").setLevel(level if verbose else logging.ERROR)


def configure_child_logging(level: int, label: str, relay: Callable[[str], None]) -> None:
    """A training process: every logger at ``level``, its lines marked with ``label``; a
    record marked :data:`ONCE` goes to ``relay`` (its worker) instead of the log."""
    handler = _install(sys.stderr, f"%(asctime)s %(levelname)s {label} %(name)s: %(message)s")
    handler.addFilter(lambda record: relay_once(record, relay))
    logging.getLogger().setLevel(level)


def relay_once(record: logging.LogRecord, relay: Callable[[str], None]) -> bool:
    """Whether to log ``record`` here; a :data:`ONCE` record is relayed instead."""
    if not getattr(record, ONCE, False):
        return True
    relay(redact_text(record.getMessage()))
    return False


def log_once(message: str) -> None:
    """Log a relayed notice, the first time this process hears it."""
    if message not in _said:
        _said.add(message)
        log.info("%s", message)
