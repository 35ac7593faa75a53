"""The task table's rows: reads, creation, the transitions of a task's own job, and cancels.

:class:`TaskRows`, over the one database seam (:class:`~.task_table.TaskTable`), holds the
API's reads and
:meth:`TaskRows.create`, what the worker of a task's own job writes before its runs are out
(start, progress, finish, requeue, failures) and :meth:`TaskRows.cancel`. See
:mod:`tracker_core.service.repository` for the locking rules.
"""

from __future__ import annotations

import builtins
import enum
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tracker_core.service.models import Task, TaskStatus
from tracker_core.service.schema import TASK_TABLE
from tracker_core.service.task_table import TaskTable

if TYPE_CHECKING:
    from tracker_core.service.run_rows import Jobs, RunRows

_T = TASK_TABLE
#: defers the task's job on the given connection (inside the transaction); the job id
Deferrer = Callable[[AsyncConnection[Any], Task], Awaitable[int]]


@attrs.frozen
class NewTask:
    """What a create request asks for, once validated."""

    id: str
    fine_tuning_method: str
    batch_id: str
    requested_batch_id: str | None
    metadata: dict[str, Any]
    idempotency_key: str | None
    max_parallel_runs: int | None = None
    proposal: str | None = None
    max_runs: int | None = None
    #: the name of the API token that asked for it (None: the API runs without auth)
    created_by: str | None = None


class StartReason(enum.Enum):
    """Why :meth:`TaskRows.start` started a task's own job, or did not."""

    #: the task is now processing for this execution
    STARTED = "started"
    #: no such task
    UNKNOWN = "unknown"
    #: it is done, error or canceled
    ENDED = "ended"
    #: a cancel was waiting for it
    CANCELED = "canceled"
    #: its runs are out already (a redelivered job)
    FANNED_OUT = "fanned_out"
    #: another task of the same iteration (``holder``) is executing its runs
    WAITING = "waiting"


@attrs.frozen
class StartOutcome:
    """What :meth:`TaskRows.start` found (see :class:`StartReason`)."""

    reason: StartReason
    task: Task | None = None
    holder: str | None = None


class CancelAction(enum.Enum):
    """What a cancel request did."""

    #: the task was pending: it never starts
    CANCELED = "canceled"
    #: it is processing: it stops at its next safe point
    REQUESTED = "requested"
    #: it had ended: nothing to cancel
    FINISHED = "finished"


@attrs.frozen
class CancelOutcome:
    """``task`` after a cancel request, and what the request did."""

    task: Task
    action: CancelAction


class TaskRows:
    """The reads and single-row transitions of the task table; the cancel carries on with
    the task's runs (``runs``)."""

    def __init__(self, table: TaskTable, runs: RunRows) -> None:
        self._table, self._runs = table, runs

    # ------------------------------------------------------------------ reads
    async def get(self, task_id: str) -> Task | None:
        return await self._table.one(f"SELECT * FROM {_T} WHERE id = %s", (task_id,))

    async def get_by_key(self, key: str) -> Task | None:
        return await self._table.one(f"SELECT * FROM {_T} WHERE idempotency_key = %s", (key,))

    async def list(
        self,
        *,
        status: TaskStatus | None = None,
        method: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[builtins.list[Task], int]:
        """Tasks newest first, filtered; and how many match in all."""
        where = "WHERE (%(status)s::text IS NULL OR status = %(status)s) AND " + (
            "(%(method)s::text IS NULL OR fine_tuning_method = %(method)s)"
        )
        params = {
            "status": None if status is None else status.value,
            "method": method,
            "limit": limit,
            "offset": offset,
        }
        async with self._table.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(f"SELECT count(*) AS n FROM {_T} {where}", params)  # type: ignore[arg-type]
            total_row = await cur.fetchone()
            await cur.execute(
                f"SELECT * FROM {_T} {where} ORDER BY created_at DESC, id DESC "  # type: ignore[arg-type]
                "LIMIT %(limit)s OFFSET %(offset)s",
                params,
            )
            rows = await cur.fetchall()
        return [Task.from_row(r) for r in rows], int(total_row["n"] if total_row else 0)

    # ------------------------------------------------------------------ API writes
    async def create(self, new: NewTask, defer: Deferrer) -> tuple[Task, bool]:
        """Insert the task and defer its job in one transaction; ``(task, created)``.

        With an idempotency key already used, nothing is written and the existing task is
        returned with ``created`` False (the caller compares the requests).
        """
        async with self._table.pool.connection() as conn:
            async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(
                    f"""
                    INSERT INTO {_T} (id, fine_tuning_method, batch_id, requested_batch_id,
                                      metadata, idempotency_key, max_parallel_runs,
                                      created_by, proposal, max_runs)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                    ON CONFLICT (idempotency_key) DO NOTHING
                    RETURNING *
                    """,  # type: ignore[arg-type]
                    (
                        new.id,
                        new.fine_tuning_method,
                        new.batch_id,
                        new.requested_batch_id,
                        Jsonb(new.metadata),
                        new.idempotency_key,
                        new.max_parallel_runs,
                        new.created_by,
                        new.proposal,
                        new.max_runs,
                    ),
                )
                row = await cur.fetchone()
                if row is not None:
                    task = Task.from_row(row)
                    job_id = await defer(conn, task)
                    # one instant for both: their defaults read the clock one after the other
                    await cur.execute(
                        f"UPDATE {_T} SET job_id = %s, updated_at = created_at WHERE id = %s "  # type: ignore[arg-type]
                        "RETURNING *",
                        (job_id, task.id),
                    )
                    created = await cur.fetchone()
                    assert created is not None
                    return Task.from_row(created), True
            # the key exists: its transaction has committed (ON CONFLICT waited for it)
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(
                    f"SELECT * FROM {_T} WHERE idempotency_key = %s",  # type: ignore[arg-type]
                    (new.idempotency_key,),
                )
                existing = await cur.fetchone()
        if existing is None:  # cannot happen: a key once inserted is never deleted
            raise RuntimeError(f"idempotency key {new.idempotency_key!r} vanished")
        return Task.from_row(existing), False

    # ------------------------------------------------------------------ worker writes
    async def start(self, task_id: str, execution_id: str, worker: str) -> StartOutcome:
        """Move the task to ``processing`` for this execution of its own job, unless it must
        not run (see :class:`StartOutcome`)."""
        async with self._table.transaction() as (_conn, cur):
            task = await self._table.lock(cur, task_id)
            if task is None:
                return StartOutcome(StartReason.UNKNOWN)
            if task.status.is_terminal:
                return StartOutcome(StartReason.ENDED, task)
            if task.cancel_requested_at is not None:
                if not task.fanned_out:  # the cancel arrived while its job was being fetched
                    task = await self._table.mark_canceled(cur, task_id)
                return StartOutcome(StartReason.CANCELED, task)
            if task.fanned_out:
                return StartOutcome(StartReason.FANNED_OUT, task)
            # a task of the same iteration whose runs are out holds the iteration (its own
            # job, which would hold the iteration's Procrastinate lock, has ended)
            await cur.execute(
                f"SELECT id FROM {_T} WHERE fine_tuning_method = %s AND batch_id = %s "  # type: ignore[arg-type]
                "AND id <> %s AND status = 'processing' AND plan IS NOT NULL LIMIT 1",
                (task.fine_tuning_method, task.batch_id, task_id),
            )
            holder = await cur.fetchone()
            if holder is not None:
                return StartOutcome(StartReason.WAITING, task, holder=str(holder["id"]))
            await cur.execute(
                f"""
                UPDATE {_T} SET status = 'processing', updated_at = clock_timestamp(),
                       attempts = attempts + 1, worker = %s, execution_id = %s, error = NULL
                 WHERE id = %s
                RETURNING *
                """,  # type: ignore[arg-type]
                (worker, execution_id, task_id),
            )
            row = await cur.fetchone()
            assert row is not None
            return StartOutcome(StartReason.STARTED, Task.from_row(row))

    async def progress(self, task_id: str, execution_id: str, progress: dict[str, Any]) -> bool:
        task = await self._table.write(
            f"UPDATE {_T} SET progress = %s, updated_at = clock_timestamp() "
            "WHERE id = %s AND execution_id = %s AND status = 'processing' RETURNING *",
            (Jsonb(progress), task_id, execution_id),
        )
        return task is not None

    async def finish(
        self,
        task_id: str,
        execution_id: str,
        status: TaskStatus,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> Task | None:
        """End the task (done, error or canceled) if this execution still holds it."""
        assert status.is_terminal
        return await self._table.write(
            f"""
            UPDATE {_T} SET status = %s, updated_at = clock_timestamp(), result = %s,
                   error = %s, execution_id = NULL
             WHERE id = %s AND execution_id = %s AND status = 'processing'
            RETURNING *
            """,
            (
                status.value,
                None if result is None else Jsonb(result),
                error,
                task_id,
                execution_id,
            ),
        )

    async def requeue(
        self, task_id: str, execution_id: str | None, note: str | None, *, failed: bool = False
    ) -> Task | None:
        """Back to ``pending`` (a worker stopped, or a retry after a store failure); with
        ``failed`` the task's failure count goes up. ``execution_id`` None: whoever held it
        (a dead worker)."""
        return await self._table.write(
            f"""
            UPDATE {_T} SET status = 'pending', updated_at = clock_timestamp(),
                   execution_id = NULL, worker = NULL, error = %s,
                   failures = failures + %s
             WHERE id = %s AND status = 'processing' AND plan IS NULL
               AND (%s::text IS NULL OR execution_id = %s)
            RETURNING *
            """,
            (note, 1 if failed else 0, task_id, execution_id, execution_id),
        )

    async def failures(self, task_id: str) -> int:
        async with self._table.pool.connection() as conn:
            cur = await conn.execute(f"SELECT failures FROM {_T} WHERE id = %s", (task_id,))  # type: ignore[arg-type]
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def cancel_abandoned(self, task_id: str, note: str) -> Task | None:
        """A task whose cancel was requested and whose worker died: canceled."""
        return await self._table.write(
            f"UPDATE {_T} SET status = 'canceled', updated_at = clock_timestamp(), "
            "execution_id = NULL, error = %s WHERE id = %s "
            "AND status IN ('pending', 'processing') RETURNING *",
            (note, task_id),
        )

    # ------------------------------------------------------------------ API: cancel
    async def cancel(
        self, task_id: str, jobs: Jobs, *, by: str | None = None
    ) -> CancelOutcome | None:
        """Cancel a pending task (it never starts), or ask a processing one to stop: its
        queued jobs are canceled, its running ones asked to stop at their next safe point,
        and a task whose runs are out ends ``canceled`` once none is running (no completion).
        ``by``: who asks (an API token's name; the first one who asked is kept). None if
        there is no such task."""
        async with self._table.transaction() as (conn, cur):
            task = await self._table.lock(cur, task_id)
            if task is None:
                return None
            if task.status.is_terminal:
                return CancelOutcome(task, CancelAction.FINISHED)
            requested = (
                "updated_at = clock_timestamp(), "
                "cancel_requested_at = coalesce(cancel_requested_at, clock_timestamp()), "
                "canceled_by = CASE WHEN cancel_requested_at IS NULL THEN %s "
                "ELSE canceled_by END"
            )
            if task.status == TaskStatus.PENDING:
                query = f"UPDATE {_T} SET status = 'canceled', {requested}, error = NULL"
                action = CancelAction.CANCELED
            else:
                query = f"UPDATE {_T} SET {requested}"
                action = CancelAction.REQUESTED
            await cur.execute(f"{query} WHERE id = %s RETURNING *", (by, task_id))  # type: ignore[arg-type]
            updated = await cur.fetchone()
            assert updated is not None
            task = Task.from_row(updated)
            await jobs.cancel(conn, await self._table.job_ids(cur, task))
            if task.fanned_out:
                task = await self._runs.advance_locked(conn, cur, task, jobs)
            return CancelOutcome(task, action)
