"""Helpers shared by the benchmarks: timing, call counting, a table and ``--json``.

Not a benchmark itself; every ``bench_*.py`` script imports it from its own folder.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "CallCounter",
    "Row",
    "base_parser",
    "emit",
    "measure",
    "quiet_logs",
]

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def quiet_logs() -> None:
    """Keep MLflow's and tracker-core's INFO logging (and progress bars) off the table."""
    logging.basicConfig(level=logging.WARNING)
    for name in ("mlflow", "alembic", "tracker_core", "tracker_core_mlflow", "botocore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (the median is kept)")
    return parser


def measure(
    fn: Callable[[], Any],
    repeat: int,
    setup: Callable[[], Any] | None = None,
    counter: CallCounter | None = None,
) -> tuple[float, int]:
    """Median wall time of ``fn()`` over ``repeat`` runs, and the store calls of one run (the
    median too; 0 without ``counter``). ``setup()`` runs untimed and uncounted before each."""
    times: list[float] = []
    calls: list[int] = []
    for _ in range(max(1, repeat)):
        if setup is not None:
            setup()
        before = counter.count if counter is not None else 0
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        calls.append((counter.count if counter is not None else 0) - before)
    return statistics.median(times), int(statistics.median(calls))


def tracking_store_classes() -> list[type]:
    """The MLflow tracking store classes whose public methods :class:`CallCounter` counts:
    MLflow's (``AbstractStore`` defines ``search_runs``) and tracker-core's single-attempt
    REST store, whose ``log_batch_values`` is one request."""
    from mlflow.store.tracking.abstract_store import AbstractStore
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from tracker_core_mlflow.rest import SingleAttemptRestStore

    return [AbstractStore, RestStore, SingleAttemptRestStore, SqlAlchemyStore]


class CallCounter:
    """Counts outermost calls to the public methods of MLflow's tracking store classes (and of
    their bases: pass ``AbstractStore`` too, it defines ``search_runs``).

    Against an ``mlflow server`` (``RestStore``) one store call is one HTTP request; against
    SQLite (``SqlAlchemyStore``) it is one database session. Nested calls (a public store
    method calling another) count once.
    """

    def __init__(self, classes: Sequence[type]) -> None:
        self.count = 0
        self._local = threading.local()
        self._saved: list[tuple[type, str, Any]] = []
        self._classes = classes

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._local, "depth", 0)
            if depth == 0:
                self.count += 1
            self._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = depth

        return wrapper

    def __enter__(self) -> CallCounter:
        for cls in self._classes:
            for name, value in list(vars(cls).items()):
                if name.startswith("_") or not callable(value) or isinstance(value, type):
                    continue
                if isinstance(value, staticmethod | classmethod):
                    continue
                self._saved.append((cls, name, value))
                setattr(cls, name, self._wrap(value))
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, name, value in reversed(self._saved):
            setattr(cls, name, value)
        self._saved.clear()


Row = dict[str, Any]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) < 1:
            return f"{value:.3f}"
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def emit(
    title: str, rows: Sequence[Row], columns: Sequence[str], as_json: bool, meta: dict[str, Any]
) -> None:
    """Print ``rows`` as a Markdown table (or everything as JSON)."""
    info = {
        "benchmark": title,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": (
            f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
        ),
        "command": " ".join([".venv/bin/python", *sys.argv]),
        **meta,
    }
    if as_json:
        print(json.dumps({**info, "rows": list(rows)}, indent=2))
        return
    print(f"\n{title}")
    for key, value in info.items():
        if key != "benchmark":
            print(f"  {key}: {value}")
    print()
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
