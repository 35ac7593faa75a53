"""Reads and state transitions of task rows and run rows (PostgreSQL, psycopg 3, async).

Every transition is one transaction that first locks the task's row (``SELECT ... FOR
UPDATE``), so two processes never both win one: the API cancels only a ``pending`` task; a
worker starts only a task that is not finished and not canceled, and stamps it with its own
``execution_id``; progress and the final status are written only by the execution that holds
the task. ``updated_at`` moves on every write.

A task is created together with its job in one transaction (:meth:`TaskRepository.create`):
the ``UNIQUE`` idempotency key makes N concurrent requests with one key create one row and
one job, and the others read that row.

Parallel runs. Once a task's own job has planned the iteration, :meth:`TaskRepository.fan_out`
writes one run row per params set and defers their jobs; from then on every change of a run
(:meth:`start_run`, :meth:`end_run`, a stalled job put back, a cancel) happens in a
transaction holding the task's row lock and ends with :meth:`_advance`, which, still under
that lock, counts the runs, defers the next queued ones up to the task's ``parallel_runs``,
and defers the completion job when no run is queued or running and none was deferred before
(``completion_job_id`` is then set in the same transaction). Two run jobs that end at the
same instant are serialized by the lock: the second sees the first one's end, so exactly one
of them defers the completion, and only once both have ended. A canceled task defers
nothing more and ends ``canceled`` once no run is running; a task whose run failed for good
(store failures past ``max_attempts``) ends ``error`` at once and its other jobs are aborted.

The methods live where their concept does: :mod:`tracker_core.service.task_rows` (reads,
creation, a task's own job), :mod:`tracker_core.service.run_rows` (fan-out, run jobs,
completion, ``_advance``); this module adds the cancel, which touches both.
"""

from __future__ import annotations

import attrs

from tracker_core.service.models import Task, TaskStatus
from tracker_core.service.run_rows import Jobs, PlannedRun, RunEnd, RunRows
from tracker_core.service.schema import TASK_TABLE
from tracker_core.service.task_rows import Deferrer as Deferrer
from tracker_core.service.task_rows import NewTask, StartOutcome

__all__ = [
    "CancelOutcome",
    "Jobs",
    "NewTask",
    "PlannedRun",
    "RunEnd",
    "StartOutcome",
    "TaskRepository",
]


_T = TASK_TABLE


@attrs.frozen
class CancelOutcome:
    """``task`` after a cancel request; ``action`` is ``canceled`` (it was pending),
    ``requested`` (it is processing: it stops at its next safe point) or ``finished``
    (nothing to cancel)."""

    task: Task
    action: str


class TaskRepository(RunRows):
    """The task table, over a psycopg async connection pool (Procrastinate's own)."""

    async def cancel(
        self, task_id: str, jobs: Jobs, *, by: str | None = None
    ) -> CancelOutcome | None:
        """Cancel a pending task (it never starts), or ask a processing one to stop: its
        queued jobs are canceled, its running ones asked to stop at their next safe point,
        and a task whose runs are out ends ``canceled`` once none is running (no completion).
        ``by``: who asks (an API token's name; the first one who asked is kept). None if
        there is no such task."""
        async with self._transaction() as (conn, cur):
            task = await self._lock(cur, task_id)
            if task is None:
                return None
            if task.status.is_terminal:
                return CancelOutcome(task, "finished")
            if task.status == TaskStatus.PENDING:
                query = (
                    f"UPDATE {_T} SET status = 'canceled', updated_at = clock_timestamp(), "
                    "cancel_requested_at = coalesce(cancel_requested_at, clock_timestamp()), "
                    "canceled_by = CASE WHEN cancel_requested_at IS NULL THEN %s "
                    "ELSE canceled_by END, error = NULL WHERE id = %s RETURNING *"
                )
                action = "canceled"
            else:
                query = (
                    f"UPDATE {_T} SET updated_at = clock_timestamp(), "
                    "cancel_requested_at = coalesce(cancel_requested_at, clock_timestamp()), "
                    "canceled_by = CASE WHEN cancel_requested_at IS NULL THEN %s "
                    "ELSE canceled_by END WHERE id = %s RETURNING *"
                )
                action = "requested"
            await cur.execute(query, (by, task_id))  # type: ignore[arg-type]
            updated = await cur.fetchone()
            assert updated is not None
            task = Task.from_row(updated)
            await jobs.cancel(conn, await self._job_ids(cur, task))
            if task.fanned_out:
                task = await self._advance(conn, cur, task, jobs)
            return CancelOutcome(task, action)
