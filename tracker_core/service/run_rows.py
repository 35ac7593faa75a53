"""A fanned-out task's bookkeeping: its run rows, their jobs and its completion.

:class:`RunRows` works once a task's own job has planned the iteration:
:meth:`RunRows.fan_out` writes one run row per params set, :meth:`RunRows.start_run` and
:meth:`RunRows.end_run` follow each run job, the completion job starts with
:meth:`RunRows.start_completion`, and every change ends with :meth:`RunRows.advance_locked`,
under the task's row lock (see :mod:`tracker_core.service.repository`). :class:`Jobs` is what
this needs of the queue.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tracker_core.service.models import RunRow, RunState, Task, TaskStatus
from tracker_core.service.schema import RUN_TABLE, TASK_TABLE
from tracker_core.values import RunStatus

if TYPE_CHECKING:
    from tracker_core.service.task_table import TaskTable

log = logging.getLogger(__name__)

_T = TASK_TABLE
_R = RUN_TABLE


class Jobs(Protocol):
    """What the repository needs of the queue (:class:`tracker_core.service.queue.QueueJobs`):
    defer and cancel jobs on a connection, inside the caller's transaction."""

    async def defer_run(
        self, connection: Any, *, task_id: str, experiment_id: str, params_id: str
    ) -> int: ...

    async def defer_completion(self, connection: Any, *, task_id: str) -> int: ...

    async def cancel(
        self, connection: Any, job_ids: list[int], *, keep: int | None = None
    ) -> None: ...


@attrs.frozen
class PlannedRun:
    """A params set of a planned iteration: its id, and how its run had already ended
    (an MLflow status) if it had."""

    params_id: str
    ended: RunStatus | None = attrs.field(
        default=None, converter=attrs.converters.optional(RunStatus)
    )

    @property
    def state(self) -> RunState:
        return RunState.QUEUED if self.ended is None else RunState.ended_as(self.ended)


@attrs.frozen
class RunEnd:
    """How a run job ended: ``state`` finished or failed (the run ended in MLflow,
    ``mlflow_status`` tells how), or queued (it did not end: it is waiting again, for its
    job's retry or for a later task); ``failure`` counts one more failed attempt."""

    state: RunState = attrs.field(converter=RunState)
    mlflow_status: RunStatus | None = attrs.field(
        default=None, converter=attrs.converters.optional(RunStatus)
    )
    run_id: str | None = None
    metric: float | None = None
    error: str | None = None
    trained: bool = False
    failure: bool = False


class RunRows:
    """The run table and the transitions of a fanned-out task, between its fan-out and its
    end."""

    def __init__(self, table: TaskTable) -> None:
        self._table = table

    async def _live_fanned_out(
        self, conn: AsyncConnection[Any], cur: Any, task_id: str, jobs: Jobs
    ) -> Task | None:
        """The task, locked, if its iteration is fanned out and still to be worked on; None
        when it ended, or when a cancel was requested (which this call then carries on)."""
        task = await self._table.lock(cur, task_id)
        if task is None or task.status.is_terminal or not task.fanned_out:
            return None
        if task.cancel_requested_at is not None:
            await self.advance_locked(conn, cur, task, jobs)
            return None
        return task

    # ------------------------------------------------------------------ parallel runs
    async def fan_out(
        self,
        task_id: str,
        execution_id: str,
        plan: dict[str, Any],
        runs: Sequence[PlannedRun],
        parallel_runs: int | None,
        jobs: Jobs,
    ) -> Task | None:
        """Record the plan made by this execution of the task's job, one run row per params
        set, and defer the first run jobs (up to ``parallel_runs``; None: all). The task
        stays ``processing`` and no execution holds it any more. A cancel requested meanwhile
        ends it ``canceled`` (nothing was started). None if this execution lost the task."""
        async with self._table.transaction() as (conn, cur):
            task = await self._table.lock(cur, task_id)
            if task is None or task.status != TaskStatus.PROCESSING:
                return None
            if task.execution_id != execution_id:
                return None
            if task.cancel_requested_at is not None:
                return await self._table.mark_canceled(cur, task_id)
            await cur.executemany(
                f"INSERT INTO {_R} (task_id, params_id, position, status, mlflow_status) "  # type: ignore[arg-type]
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (task_id, params_id) DO NOTHING",
                [
                    (task_id, r.params_id, i, r.state.value, r.ended and r.ended.value)
                    for i, r in enumerate(runs)
                ],
            )
            await cur.execute(
                f"UPDATE {_T} SET plan = %s, parallel_runs = %s, execution_id = NULL, "  # type: ignore[arg-type]
                "worker = NULL, updated_at = clock_timestamp() WHERE id = %s RETURNING *",
                (Jsonb(plan), parallel_runs, task_id),
            )
            row = await cur.fetchone()
            assert row is not None
            return await self.advance_locked(conn, cur, Task.from_row(row), jobs)

    async def start_run(
        self,
        task_id: str,
        params_id: str,
        job_id: int,
        execution_id: str,
        worker: str,
        jobs: Jobs,
    ) -> tuple[Task, RunRow] | None:
        """Mark the run ``running`` for this execution of its job; None when it must not
        run: it ended already (a job for a finished run does nothing), its task ended, or a
        cancel was requested. A ``running`` row held by an earlier execution of the *same*
        job is taken over (that execution died: the queue only redelivers a job then)."""
        async with self._table.transaction() as (conn, cur):
            task = await self._live_fanned_out(conn, cur, task_id, jobs)
            if task is None:
                return None
            await cur.execute(
                f"""
                UPDATE {_R} SET status = 'running', execution_id = %s, worker = %s,
                       job_id = %s, attempts = attempts + 1, started_at = clock_timestamp(),
                       ended_at = NULL, updated_at = clock_timestamp()
                 WHERE task_id = %s AND params_id = %s
                   AND (status = 'queued' OR (status = 'running' AND job_id = %s))
                RETURNING *
                """,  # type: ignore[arg-type]
                (execution_id, worker, job_id, task_id, params_id, job_id),
            )
            row = await cur.fetchone()
            if row is None:
                return None
            run = RunRow.from_row(row)
            task = await self.advance_locked(conn, cur, task, jobs)
            return task, run

    async def end_run(
        self, task_id: str, params_id: str, execution_id: str, end: RunEnd, jobs: Jobs
    ) -> tuple[Task | None, RunRow | None]:
        """Record how this execution's run ended, then advance the task (next runs, the
        completion, a cancel). The run row is written only by the execution that holds it,
        so a run is never marked twice. ``(task, run row)``; the row is None if this
        execution did not hold the run any more."""
        assert end.state != RunState.RUNNING
        async with self._table.transaction() as (conn, cur):
            task = await self._table.lock(cur, task_id)
            if task is None:
                return None, None
            await cur.execute(
                f"""
                UPDATE {_R} SET status = %s, execution_id = NULL,
                       mlflow_status = coalesce(%s, mlflow_status),
                       run_id = coalesce(%s, run_id), metric = %s, error = %s,
                       trained = trained OR %s, failures = failures + %s,
                       ended_at = CASE WHEN %s = 'queued' THEN NULL ELSE clock_timestamp() END,
                       updated_at = clock_timestamp()
                 WHERE task_id = %s AND params_id = %s AND status = 'running'
                   AND execution_id = %s
                RETURNING *
                """,  # type: ignore[arg-type]
                (
                    end.state.value,
                    end.mlflow_status and end.mlflow_status.value,
                    end.run_id,
                    end.metric,
                    end.error,
                    end.trained,
                    1 if end.failure else 0,
                    end.state.value,
                    task_id,
                    params_id,
                    execution_id,
                ),
            )
            row = await cur.fetchone()
            run = None if row is None else RunRow.from_row(row)
            if run is not None:
                task = await self.advance_locked(conn, cur, task, jobs)
            return task, run

    async def requeue_run(self, task_id: str, params_id: str, jobs: Jobs) -> Task | None:
        """A run whose worker died: ``queued`` again (its job is back in the queue)."""
        async with self._table.transaction() as (conn, cur):
            task = await self._table.lock(cur, task_id)
            if task is None:
                return None
            await cur.execute(
                f"UPDATE {_R} SET status = 'queued', execution_id = NULL, "  # type: ignore[arg-type]
                "updated_at = clock_timestamp() "
                "WHERE task_id = %s AND params_id = %s AND status = 'running'",
                (task_id, params_id),
            )
            return await self.advance_locked(conn, cur, task, jobs)

    async def fail_task(
        self, task_id: str, error: str, jobs: Jobs, *, keep: int | None
    ) -> Task | None:
        """End a task whose runs are out ``error`` now (a run could not be trained, for good):
        its other jobs are canceled (running ones stop at their next safe point, their runs
        left resumable) and no completion runs. ``keep``: the caller's own job."""
        async with self._table.transaction() as (conn, cur):
            task = await self._table.lock(cur, task_id)
            if task is None or task.status.is_terminal:
                return None
            await cur.execute(
                f"UPDATE {_T} SET status = 'error', error = %s, execution_id = NULL, "  # type: ignore[arg-type]
                "updated_at = clock_timestamp() WHERE id = %s RETURNING *",
                (error, task_id),
            )
            row = await cur.fetchone()
            assert row is not None
            await jobs.cancel(conn, await self._table.job_ids(cur, task), keep=keep)
            return Task.from_row(row)

    async def start_completion(
        self, task_id: str, execution_id: str, worker: str, jobs: Jobs
    ) -> Task | None:
        """Let this execution of the completion job hold the task; None when it must not
        complete: the task ended, a cancel was requested, or (never expected) a run is not
        ended."""
        async with self._table.transaction() as (conn, cur):
            task = await self._live_fanned_out(conn, cur, task_id, jobs)
            if task is None:
                return None
            await cur.execute(
                f"SELECT count(*) AS n FROM {_R} WHERE task_id = %s "  # type: ignore[arg-type]
                "AND status IN ('queued', 'running')",
                (task_id,),
            )
            open_runs = await cur.fetchone()
            if open_runs is not None and open_runs["n"]:
                log.error(
                    "task %s: completion refused, %d run(s) not ended", task_id, open_runs["n"]
                )
                return None
            await cur.execute(
                f"UPDATE {_T} SET execution_id = %s, worker = %s, "  # type: ignore[arg-type]
                "updated_at = clock_timestamp() WHERE id = %s RETURNING *",
                (execution_id, worker, task_id),
            )
            row = await cur.fetchone()
            assert row is not None
            return Task.from_row(row)

    async def release(
        self, task_id: str, execution_id: str | None, note: str | None, *, failed: bool = False
    ) -> Task | None:
        """A completion that stopped (its worker stopped or died, or the stores failed): the
        task stays ``processing``, held by no execution, until its job runs again.
        ``execution_id`` None: whoever held it."""
        return await self._table.write(
            f"""
            UPDATE {_T} SET updated_at = clock_timestamp(), execution_id = NULL,
                   worker = NULL, error = %s, failures = failures + %s
             WHERE id = %s AND status = 'processing' AND plan IS NOT NULL
               AND (%s::text IS NULL OR execution_id = %s)
            RETURNING *
            """,
            (note, 1 if failed else 0, task_id, execution_id, execution_id),
        )

    async def advance(self, task_id: str, jobs: Jobs) -> Task | None:
        """:meth:`advance_locked` in a transaction of its own (after a stalled job was put back)."""
        async with self._table.transaction() as (conn, cur):
            task = await self._table.lock(cur, task_id)
            if task is None:
                return None
            return await self.advance_locked(conn, cur, task, jobs)

    async def runs(self, task_id: str) -> builtins.list[RunRow]:
        """The run rows of a task, in plan order."""
        async with self._table.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"SELECT * FROM {_R} WHERE task_id = %s ORDER BY position",  # type: ignore[arg-type]
                (task_id,),
            )
            return [RunRow.from_row(r) for r in await cur.fetchall()]

    async def advance_locked(self, conn: Any, cur: Any, task: Task, jobs: Jobs) -> Task:
        """Under the task's row lock (the caller holds it): count the runs; a canceled task
        ends once none is running; otherwise defer queued runs up to ``parallel_runs`` and,
        when every run has ended, the completion job (once). Writes ``progress``."""
        if task.status.is_terminal or not task.fanned_out:
            return task
        await cur.execute(
            f"SELECT params_id, status, mlflow_status, job_id, worker FROM {_R} "
            "WHERE task_id = %s ORDER BY position",
            (task.id,),
        )
        rows = await cur.fetchall()
        states = [RunState(r["status"]) for r in rows]
        counts = {state: states.count(state) for state in RunState}
        # failed rows whose run the search's pruner stopped (KILLED): counted apart
        pruned = sum(
            1
            for r, state in zip(rows, states, strict=True)
            if state == RunState.FAILED and r["mlflow_status"] == RunStatus.KILLED.value
        )
        status = task.status
        completion = task.completion_job_id
        if task.cancel_requested_at is not None:
            if counts[RunState.RUNNING] == 0 and task.execution_id is None:
                status = TaskStatus.CANCELED
                log.info("task %s: canceled; no run is running", task.id)
        else:
            queued = [r for r, state in zip(rows, states, strict=True) if state == RunState.QUEUED]
            waiting = [r for r in queued if r["job_id"] is None]
            out = counts[RunState.RUNNING] + len(queued) - len(waiting)
            free = len(waiting) if task.parallel_runs is None else task.parallel_runs - out
            experiment_id = str((task.plan or {})["experiment_id"])
            for r in waiting[: max(0, free)]:
                job_id = await jobs.defer_run(
                    conn, task_id=task.id, experiment_id=experiment_id, params_id=r["params_id"]
                )
                await cur.execute(
                    f"UPDATE {_R} SET job_id = %s, updated_at = clock_timestamp() "
                    "WHERE task_id = %s AND params_id = %s",
                    (job_id, task.id, r["params_id"]),
                )
            if (
                counts[RunState.QUEUED] == 0
                and counts[RunState.RUNNING] == 0
                and completion is None
                and task.execution_id is None
            ):
                completion = await jobs.defer_completion(conn, task_id=task.id)
                log.info(
                    "task %s: every run ended; completion job %s deferred", task.id, completion
                )
        progress = {"planned": len(rows), **{state.value: n for state, n in counts.items()}}
        progress[RunState.FAILED.value] -= pruned
        progress["pruned"] = pruned
        workers = sorted(
            {
                r["worker"]
                for r, state in zip(rows, states, strict=True)
                if state == RunState.RUNNING and r["worker"]
            }
        )
        await cur.execute(
            f"""
            UPDATE {_T} SET status = %s, progress = %s, completion_job_id = %s,
                   worker = CASE WHEN execution_id IS NULL THEN %s ELSE worker END,
                   updated_at = clock_timestamp()
             WHERE id = %s
            RETURNING *
            """,
            (status.value, Jsonb(progress), completion, ", ".join(workers) or None, task.id),
        )
        row = await cur.fetchone()
        assert row is not None
        return Task.from_row(row)
