"""What every ``tracker-core`` command shares: output, usage errors, reaching the stores.

:class:`Output` prints a command's result as a table or as JSON (and turns a closed standard
output into :class:`_OutputClosed`); :class:`UsageError` is a command-line mistake (exit 2).
:func:`require_tracking_store` refuses a local tracking store that does not exist, and
:func:`_manager` connects a reading command to the stores (``--retries`` included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

from tracker_core.errors import ConfigurationError
from tracker_core.leases import DEFAULT_LEASE_SECONDS
from tracker_core.manager import ExperimentsManager
from tracker_core.retry import RetryConfig, RetryParams

_ANY_PLUGIN = "tracker-core-cli"  # a placeholder plugin name for commands that need none
_ANY_METRIC = "tracker-core-cli"


#: exit status when standard output is closed early: 128 + SIGPIPE, as a shell reports it
EXIT_OUTPUT_CLOSED = 141


class UsageError(Exception):
    """A command-line mistake: exit status 2."""


class _OutputClosed(Exception):
    """Whoever reads our standard output went away (``| head``)."""


# ---------------------------------------------------------------------- output helpers
class Output:
    def __init__(self, as_json: bool, out: TextIO) -> None:
        self.as_json, self.out = as_json, out

    def emit(self, data: Any, table: Callable[[], Iterator[str]]) -> None:
        try:
            if self.as_json:
                json.dump(data, self.out, indent=2, sort_keys=True, default=str)
                self.out.write("\n")
            else:
                for line in table():
                    self.out.write(line + "\n")
            self.out.flush()
        except BrokenPipeError as exc:
            raise _OutputClosed() from exc


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Iterator[str]:
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        yield "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        if n == 0:
            yield "  ".join("-" * w for w in widths)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


# ---------------------------------------------------------------------- resolution
def _sqlite_problem(path: Path) -> str | None:
    """Why ``path`` is not an MLflow SQLite database we can read; None if it is one."""
    if not path.is_file():
        return "no such file"
    if not os.access(path, os.R_OK):
        return "this user may not read it"
    if path.stat().st_size == 0:
        return "the file is empty"
    try:
        # read-only: opening this way never creates or changes anything
        with contextlib.closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        ) as conn:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'experiments'"
            ).fetchone()
    except sqlite3.Error as exc:
        return f"not a readable SQLite database: {exc}"
    return None if found else "a SQLite database, but not MLflow's: it has no experiments"


def require_tracking_store(uri: str) -> None:
    """Raise :class:`ConfigurationError` unless a local tracking store at ``uri`` exists.

    A ``sqlite:`` URI must name an existing MLflow database, a plain path or ``file:`` URI
    (MLflow's file store) an existing folder. Other URIs (a tracking server, PostgreSQL) are
    not checked here. Commands that only read must not create a database: MLflow would
    create and migrate an empty one, and report nothing found in it.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    where: Path | None
    problem: str | None
    if scheme == "sqlite" or scheme.startswith("sqlite+"):
        raw = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if raw in ("", ":memory:"):
            where, problem = None, "an in-memory database holds nothing"
        else:
            where = Path(raw)
            problem = _sqlite_problem(where)
    elif scheme in ("", "file"):
        where = Path(unquote(parts.path) if scheme == "file" else uri)
        problem = None if where.is_dir() else "no such folder"
    else:
        return
    if problem:
        raise ConfigurationError(
            f"no tracking database at {where.absolute() if where else uri} ({problem}): "
            "point --tracking-uri (or MLFLOW_TRACKING_URI) at an existing one, "
            "e.g. sqlite:////abs/path/mlflow.db"
        )


def _manager(
    args: argparse.Namespace, *, plugin: bool = False, metric: bool = False, **extra: Any
) -> ExperimentsManager:
    """A manager for a command that reads (or repairs) an existing tracking store; ``extra``
    are more arguments of ``connect``."""
    from tracker_core.connect import connect

    if plugin and not args.plugin:
        raise UsageError(f"{args.command}: --plugin is required")
    if metric and not args.metric:
        raise UsageError(f"{args.command}: --metric is required")
    require_tracking_store(args.tracking_uri)
    return connect(
        args.artifact_uri,
        tracking_uri=args.tracking_uri,
        plugin_name=args.plugin or _ANY_PLUGIN,
        main_metric=args.metric or _ANY_METRIC,
        is_loss=args.loss,
        retry=_retry(args),
        lease_seconds=args.lease_seconds or DEFAULT_LEASE_SECONDS,
        **extra,
    )


def _retry(args: argparse.Namespace) -> RetryConfig | None:
    """``--retries N``: N attempts of every operation (None: the default policy, or the
    method's own for ``run``)."""
    return None if args.retries is None else RetryConfig(RetryParams(max_attempts=args.retries))


def _seconds(text: str) -> float:
    """``--lease-seconds``: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _attempts(text: str) -> int:
    """``--retries``: a whole number of attempts, at least one."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of attempts >= 1, got {text!r}")
    return value
