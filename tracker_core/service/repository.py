"""Reads and state transitions of task rows and run rows (PostgreSQL, psycopg 3, async).

Every transition is one transaction that first locks the task's row (``SELECT ... FOR
UPDATE``), so two processes never both win one: the API cancels only a ``pending`` task; a
worker starts only a task that is not finished and not canceled, and stamps it with its own
``execution_id``; progress and the final status are written only by the execution that holds
the task. ``updated_at`` moves on every write.

A task is created together with its job in one transaction (:meth:`TaskRows.create`): the
``UNIQUE`` idempotency key makes N concurrent requests with one key create one row and one job,
and the others read that row.

Once a task's runs are out, every change of a run (a start, an end, a stalled job put back, a
cancel) happens in a transaction holding the task's row lock and ends with
:meth:`RunRows.advance_locked`, which, still under that lock, counts the runs, defers the next
queued ones up to the task's ``parallel_runs``, and defers the completion job when no run is
queued or running and none was deferred before (``completion_job_id`` is then set in the same
transaction). Two run jobs that end at the same instant are serialized by the lock: the second
sees the first one's end, so exactly one of them defers the completion, and only once both have
ended.

:class:`TaskRepository` is composed of the parts, each over one :class:`TaskTable`:
``tasks`` (:class:`TaskRows`: reads, creation, a task's own job, cancels) and ``runs``
(:class:`RunRows`: fan-out, run jobs, completion). Given an outage rider, every call of either
is ridden out (:func:`tracker_core.service.outage.riding`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg_pool import AsyncConnectionPool

from tracker_core.service.run_rows import Jobs, PlannedRun, RunEnd, RunRows
from tracker_core.service.task_rows import (
    CancelAction,
    CancelOutcome,
    Deferrer,
    NewTask,
    StartOutcome,
    StartReason,
    TaskRows,
)
from tracker_core.service.task_table import TaskTable

if TYPE_CHECKING:
    from tracker_core.service.outage import OutageRider

__all__ = [
    "CancelAction",
    "CancelOutcome",
    "Deferrer",
    "Jobs",
    "NewTask",
    "PlannedRun",
    "RunEnd",
    "RunRows",
    "StartOutcome",
    "StartReason",
    "TaskRepository",
    "TaskRows",
    "TaskTable",
]


class TaskRepository:
    """The task table and the run table: ``tasks`` and ``runs``, over one connection pool
    (Procrastinate's own); with ``rider``, every call of theirs rides out a database outage."""

    def __init__(self, pool: AsyncConnectionPool[Any], *, rider: OutageRider | None = None) -> None:
        table = TaskTable(pool)
        runs = RunRows(table)
        tasks = TaskRows(table, runs)
        if rider is not None:
            from tracker_core.service.outage import riding

            tasks, runs = riding(tasks, rider), riding(runs, rider)
        self.tasks: TaskRows = tasks
        self.runs: RunRows = runs
