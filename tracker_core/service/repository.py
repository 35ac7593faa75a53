"""Reads and state transitions of task rows (PostgreSQL, psycopg 3, async).

Every transition is one conditional UPDATE, so two processes never both win one: the API
cancels only a ``pending`` task; a worker starts only a task that is not finished and not
canceled, and stamps it with its own ``execution_id``; progress and the final status are
written only by the execution that holds the task. ``updated_at`` moves on every write.

A task is created together with its job in one transaction (:meth:`TaskRepository.create`):
the ``UNIQUE`` idempotency key makes N concurrent requests with one key create one row and
one job, and the others read that row.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from tracker_core.service.models import Task, TaskStatus
from tracker_core.service.schema import TASK_TABLE

__all__ = ["CancelOutcome", "NewTask", "TaskRepository"]

log = logging.getLogger(__name__)

_T = TASK_TABLE
#: defers the task's job on the given connection (inside the transaction); the job id
Deferrer = Callable[[AsyncConnection[Any], Task], Awaitable[int]]
#: cancels (or flags for abort) a job on the given connection
JobCanceller = Callable[[AsyncConnection[Any], int], Awaitable[None]]


@attrs.frozen
class NewTask:
    """What a create request asks for, once validated."""

    id: str
    fine_tuning_method: str
    batch_id: str
    requested_batch_id: str | None
    metadata: dict[str, Any]
    idempotency_key: str | None


@attrs.frozen
class CancelOutcome:
    """``task`` after a cancel request; ``action`` is ``canceled`` (it was pending),
    ``requested`` (it is processing: it stops at its next safe point) or ``finished``
    (nothing to cancel)."""

    task: Task
    action: str


class TaskRepository:
    """The task table, over a psycopg async connection pool (Procrastinate's own)."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    # ------------------------------------------------------------------ reads
    async def _one(self, query: str, params: tuple[Any, ...]) -> Task | None:
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, params)  # type: ignore[arg-type]
            row = await cur.fetchone()
        return None if row is None else Task.from_row(row)

    async def get(self, task_id: str) -> Task | None:
        return await self._one(f"SELECT * FROM {_T} WHERE id = %s", (task_id,))

    async def get_by_key(self, key: str) -> Task | None:
        return await self._one(f"SELECT * FROM {_T} WHERE idempotency_key = %s", (key,))

    async def list(
        self,
        *,
        status: TaskStatus | None = None,
        method: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Task], int]:
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
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
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
        async with self._pool.connection() as conn:
            async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(
                    f"""
                    INSERT INTO {_T} (id, fine_tuning_method, batch_id, requested_batch_id,
                                      metadata, idempotency_key)
                    VALUES (%s, %s, %s, %s, %s, %s)
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
                    ),
                )
                row = await cur.fetchone()
                if row is not None:
                    task = Task.from_row(row)
                    job_id = await defer(conn, task)
                    await cur.execute(
                        f"UPDATE {_T} SET job_id = %s WHERE id = %s RETURNING *",  # type: ignore[arg-type]
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

    async def cancel(self, task_id: str, cancel_job: JobCanceller) -> CancelOutcome | None:
        """Cancel a pending task (it never starts), or ask a processing one to stop. None if
        there is no such task."""
        async with (
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            await cur.execute(f"SELECT * FROM {_T} WHERE id = %s FOR UPDATE", (task_id,))  # type: ignore[arg-type]
            row = await cur.fetchone()
            if row is None:
                return None
            task = Task.from_row(row)
            if task.status.is_terminal:
                return CancelOutcome(task, "finished")
            if task.status == TaskStatus.PENDING:
                query = (
                    f"UPDATE {_T} SET status = 'canceled', updated_at = clock_timestamp(), "
                    "cancel_requested_at = coalesce(cancel_requested_at, clock_timestamp()), "
                    "error = NULL WHERE id = %s RETURNING *"
                )
                action = "canceled"
            else:
                query = (
                    f"UPDATE {_T} SET updated_at = clock_timestamp(), "
                    "cancel_requested_at = coalesce(cancel_requested_at, clock_timestamp()) "
                    "WHERE id = %s RETURNING *"
                )
                action = "requested"
            await cur.execute(query, (task_id,))  # type: ignore[arg-type]
            updated = await cur.fetchone()
            assert updated is not None
            if task.job_id is not None:
                await cancel_job(conn, task.job_id)
            return CancelOutcome(Task.from_row(updated), action)

    # ------------------------------------------------------------------ worker writes
    async def _write(self, query: str, params: tuple[Any, ...]) -> Task | None:
        async with (
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            await cur.execute(query, params)  # type: ignore[arg-type]
            row = await cur.fetchone()
        return None if row is None else Task.from_row(row)

    async def start(self, task_id: str, execution_id: str, worker: str) -> Task | None:
        """Move the task to ``processing`` for this execution; None if it must not run
        (finished, canceled, a cancel was requested, or unknown)."""
        return await self._write(
            f"""
            UPDATE {_T} SET status = 'processing', updated_at = clock_timestamp(),
                   attempts = attempts + 1, worker = %s, execution_id = %s, error = NULL
             WHERE id = %s AND status IN ('pending', 'processing')
               AND cancel_requested_at IS NULL
            RETURNING *
            """,
            (worker, execution_id, task_id),
        )

    async def cancel_unstarted(self, task_id: str) -> Task | None:
        """A task whose cancel arrived while its job was being fetched: canceled."""
        return await self._write(
            f"UPDATE {_T} SET status = 'canceled', updated_at = clock_timestamp() "
            "WHERE id = %s AND status IN ('pending', 'processing') "
            "AND cancel_requested_at IS NOT NULL RETURNING *",
            (task_id,),
        )

    async def progress(self, task_id: str, execution_id: str, progress: dict[str, Any]) -> bool:
        task = await self._write(
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
        return await self._write(
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
        return await self._write(
            f"""
            UPDATE {_T} SET status = 'pending', updated_at = clock_timestamp(),
                   execution_id = NULL, worker = NULL, error = %s,
                   failures = failures + %s
             WHERE id = %s AND status = 'processing'
               AND (%s::text IS NULL OR execution_id = %s)
            RETURNING *
            """,
            (note, 1 if failed else 0, task_id, execution_id, execution_id),
        )

    async def failures(self, task_id: str) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(f"SELECT failures FROM {_T} WHERE id = %s", (task_id,))  # type: ignore[arg-type]
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def cancel_abandoned(self, task_id: str, note: str) -> Task | None:
        """A task whose cancel was requested and whose worker died: canceled."""
        return await self._write(
            f"UPDATE {_T} SET status = 'canceled', updated_at = clock_timestamp(), "
            "execution_id = NULL, error = %s WHERE id = %s "
            "AND status IN ('pending', 'processing') RETURNING *",
            (note, task_id),
        )
