"""The task table's rows: reads, creation, and the transitions of a task's own job.

:class:`TaskRows` is the part of :class:`~tracker_core.service.repository.TaskRepository` that
touches one task row at a time: the connection, transaction and row-lock helpers every
transition uses, the API's reads and :meth:`TaskRows.create`, and what the worker of a task's
own job writes before its runs are out (start, progress, finish, requeue, failures). See
:mod:`tracker_core.service.repository` for the locking rules.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from tracker_core.service.models import Task, TaskStatus
from tracker_core.service.schema import RUN_TABLE, TASK_TABLE

_T = TASK_TABLE
_R = RUN_TABLE
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


@attrs.frozen
class StartOutcome:
    """What :meth:`TaskRepository.start` found. ``reason``: ``started`` (``task`` is now
    processing for this execution), ``unknown``, ``ended`` (done, error or canceled),
    ``canceled`` (a cancel was waiting for it), ``fanned_out`` (its runs are out already: a
    redelivered job) or ``waiting`` (another task of the same iteration, ``holder``, is
    executing its runs)."""

    reason: str
    task: Task | None = None
    holder: str | None = None


class TaskRows:
    """The task table, over a psycopg async connection pool (Procrastinate's own): its
    reads and single-row transitions (the base of
    :class:`~tracker_core.service.repository.TaskRepository`)."""

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
    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[tuple[AsyncConnection[Any], Any]]:
        """A connection from the pool, in a transaction, with a cursor of dict rows."""
        async with (
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            yield conn, cur

    async def _lock(self, cur: Any, task_id: str) -> Task | None:
        """The task's row, locked until the transaction ends (every transition takes it)."""
        await cur.execute(f"SELECT * FROM {_T} WHERE id = %s FOR UPDATE", (task_id,))
        row = await cur.fetchone()
        return None if row is None else Task.from_row(row)

    async def _mark_canceled(self, cur: Any, task_id: str) -> Task:
        """End the locked task ``canceled``; no execution holds it any more."""
        await cur.execute(
            f"UPDATE {_T} SET status = 'canceled', updated_at = clock_timestamp(), "
            "execution_id = NULL WHERE id = %s RETURNING *",
            (task_id,),
        )
        row = await cur.fetchone()
        assert row is not None
        return Task.from_row(row)

    async def _job_ids(self, cur: Any, task: Task) -> builtins.list[int]:
        """Every job of the task that may still be queued or running."""
        await cur.execute(
            f"SELECT job_id FROM {_R} WHERE task_id = %s AND job_id IS NOT NULL "
            "AND status IN ('queued', 'running')",
            (task.id,),
        )
        ids = [int(r["job_id"]) for r in await cur.fetchall()]
        return [j for j in (task.job_id, task.completion_job_id) if j is not None] + ids

    async def _write(self, query: str, params: tuple[Any, ...]) -> Task | None:
        async with self._transaction() as (_conn, cur):
            await cur.execute(query, params)  # type: ignore[arg-type]
            row = await cur.fetchone()
        return None if row is None else Task.from_row(row)

    async def start(self, task_id: str, execution_id: str, worker: str) -> StartOutcome:
        """Move the task to ``processing`` for this execution of its own job, unless it must
        not run (see :class:`StartOutcome`)."""
        async with self._transaction() as (_conn, cur):
            task = await self._lock(cur, task_id)
            if task is None:
                return StartOutcome("unknown")
            if task.status.is_terminal:
                return StartOutcome("ended", task)
            if task.cancel_requested_at is not None:
                if not task.fanned_out:  # the cancel arrived while its job was being fetched
                    task = await self._mark_canceled(cur, task_id)
                return StartOutcome("canceled", task)
            if task.fanned_out:
                return StartOutcome("fanned_out", task)
            # a task of the same iteration whose runs are out holds the iteration (its own
            # job, which would hold the iteration's Procrastinate lock, has ended)
            await cur.execute(
                f"SELECT id FROM {_T} WHERE fine_tuning_method = %s AND batch_id = %s "  # type: ignore[arg-type]
                "AND id <> %s AND status = 'processing' AND plan IS NOT NULL LIMIT 1",
                (task.fine_tuning_method, task.batch_id, task_id),
            )
            holder = await cur.fetchone()
            if holder is not None:
                return StartOutcome("waiting", task, holder=str(holder["id"]))
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
            return StartOutcome("started", Task.from_row(row))

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
             WHERE id = %s AND status = 'processing' AND plan IS NULL
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
