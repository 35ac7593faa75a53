"""The task table, in the same PostgreSQL database as Procrastinate's job tables.

:func:`ensure_schema` creates both on first start (Procrastinate's schema, then ours), under
a PostgreSQL advisory lock so that an API and workers starting at the same moment do it once.
Our schema carries a version number; a later version adds its changes as further steps of
``_MIGRATIONS`` (the per-run jobs of parallel iterations will add a table of their own).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import procrastinate

__all__ = ["SCHEMA_VERSION", "TASK_TABLE", "ensure_schema"]

log = logging.getLogger(__name__)

TASK_TABLE = "tracker_core_tasks"
_VERSION_TABLE = "tracker_core_schema"
#: an arbitrary 64-bit key for pg_advisory_lock: "tracker-core schema"
_LOCK_KEY = 0x7472_6B63_7363_6D61

_MIGRATIONS: list[str] = [
    # 1: the task table
    f"""
    CREATE TABLE {TASK_TABLE} (
        id                  text PRIMARY KEY,
        fine_tuning_method  text NOT NULL,
        batch_id            text NOT NULL,
        requested_batch_id  text,
        metadata            jsonb NOT NULL DEFAULT '{{}}'::jsonb,
        idempotency_key     text UNIQUE,
        status              text NOT NULL DEFAULT 'pending' CHECK (status IN
                                ('pending', 'processing', 'done', 'error', 'canceled')),
        created_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
        updated_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
        progress            jsonb,
        result              jsonb,
        error               text,
        cancel_requested_at timestamptz,
        attempts            integer NOT NULL DEFAULT 0,
        failures            integer NOT NULL DEFAULT 0,
        worker              text,
        execution_id        text,
        job_id              bigint
    );
    CREATE INDEX {TASK_TABLE}_created_idx ON {TASK_TABLE} (created_at DESC, id DESC);
    CREATE INDEX {TASK_TABLE}_status_idx ON {TASK_TABLE} (status, created_at DESC);
    CREATE INDEX {TASK_TABLE}_method_idx
        ON {TASK_TABLE} (fine_tuning_method, created_at DESC);
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)


async def ensure_schema(app: procrastinate.App) -> None:
    """Create Procrastinate's schema and the task table if missing; idempotent, and safe when
    several processes start at once. Refuses a database made by a newer version."""
    from tracker_core.service.errors import ServiceConfigurationError

    pool = app.connector.pool  # type: ignore[attr-defined]
    async with pool.connection() as conn:
        await conn.set_autocommit(True)
        try:
            await conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
            try:
                if not await app.check_connection_async():
                    log.info("creating Procrastinate's schema")
                    await app.schema_manager.apply_schema_async()
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {_VERSION_TABLE} (version integer NOT NULL)"
                )
                cur = await conn.execute(f"SELECT max(version) FROM {_VERSION_TABLE}")
                row = await cur.fetchone()
                current = (row[0] if row else None) or 0
                if current > SCHEMA_VERSION:
                    raise ServiceConfigurationError(
                        f"the task database has schema version {current}, newer than this "
                        f"tracker-core's {SCHEMA_VERSION}: upgrade tracker-core"
                    )
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    log.info("applying task schema version %d", version)
                    async with conn.transaction():
                        await conn.execute(_MIGRATIONS[version - 1])  # type: ignore[arg-type]
                        await conn.execute(
                            f"INSERT INTO {_VERSION_TABLE} (version) VALUES (%s)", (version,)
                        )
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
        finally:
            await conn.set_autocommit(False)
