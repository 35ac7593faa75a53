"""The task table's database seam, shared by every part of the repository
(:mod:`~tracker_core.service.task_rows`, :mod:`~tracker_core.service.run_rows`): a transaction,
the task's row lock, and the small reads and writes they all use."""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from tracker_core.service.models import RunState, Task
from tracker_core.service.schema import RUN_TABLE, TASK_TABLE

__all__ = ["TaskTable"]

_T = TASK_TABLE
_R = RUN_TABLE


class TaskTable:
    """The task table's database seam, over a psycopg async connection pool (Procrastinate's
    own): a transaction, the task's row lock, and the small reads and writes every part of the
    repository shares."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool

    async def one(self, query: str, params: tuple[Any, ...]) -> Task | None:
        """The task a read returns, if any (no transaction)."""
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, params)  # type: ignore[arg-type]
            row = await cur.fetchone()
        return None if row is None else Task.from_row(row)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[tuple[AsyncConnection[Any], Any]]:
        """A connection from the pool, in a transaction, with a cursor of dict rows."""
        async with (
            self.pool.connection() as conn,
            conn.transaction(),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            yield conn, cur

    async def lock(self, cur: Any, task_id: str) -> Task | None:
        """The task's row, locked until the transaction ends (every transition takes it)."""
        await cur.execute(f"SELECT * FROM {_T} WHERE id = %s FOR UPDATE", (task_id,))
        row = await cur.fetchone()
        return None if row is None else Task.from_row(row)

    async def write(self, query: str, params: tuple[Any, ...]) -> Task | None:
        """One statement in a transaction of its own; the task it returns, if any."""
        async with self.transaction() as (_conn, cur):
            await cur.execute(query, params)  # type: ignore[arg-type]
            row = await cur.fetchone()
        return None if row is None else Task.from_row(row)

    async def mark_canceled(self, cur: Any, task_id: str) -> Task:
        """End the locked task ``canceled``; no execution holds it any more."""
        await cur.execute(
            f"UPDATE {_T} SET status = 'canceled', updated_at = clock_timestamp(), "
            "execution_id = NULL WHERE id = %s RETURNING *",
            (task_id,),
        )
        row = await cur.fetchone()
        assert row is not None
        return Task.from_row(row)

    async def job_ids(self, cur: Any, task: Task) -> builtins.list[int]:
        """Every job of the task that may still be queued or running."""
        await cur.execute(
            f"SELECT job_id FROM {_R} WHERE task_id = %s AND job_id IS NOT NULL "
            "AND status IN (%s, %s)",
            (task.id, RunState.QUEUED.value, RunState.RUNNING.value),
        )
        ids = [int(r["job_id"]) for r in await cur.fetchall()]
        return [j for j in (task.job_id, task.completion_job_id) if j is not None] + ids
