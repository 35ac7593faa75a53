"""The task table, in the same PostgreSQL database as Procrastinate's job tables.

:func:`ensure_schema` creates both on first start (Procrastinate's schema, then ours), under
a PostgreSQL advisory lock so that an API and workers starting at the same moment do it once.
Our schema carries a version number; a later version adds its changes as further steps of
``_MIGRATIONS``:

1. the task table;
2. parallel runs: a task's requested ``max_parallel_runs``, the effective cap, its
   iteration's plan and completion job, and the run table (one row per params set of a task
   whose runs are trained by separate jobs: queued, running, finished or failed);
3. who did what: the API token table (a name, a scope and the SHA-256 of each token, never
   the token), and each task's ``created_by`` / ``canceled_by`` (token names);
4. the search: a task's ``proposal`` policy (``top_n`` / ``search``) and ``max_runs`` budget.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import procrastinate

__all__ = ["RUN_TABLE", "SCHEMA_VERSION", "TASK_TABLE", "TOKEN_TABLE", "ensure_schema"]

log = logging.getLogger(__name__)

TASK_TABLE = "tracker_core_tasks"
RUN_TABLE = "tracker_core_runs"
TOKEN_TABLE = "tracker_core_tokens"
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
    # 2: parallel runs
    f"""
    ALTER TABLE {TASK_TABLE}
        ADD COLUMN max_parallel_runs integer
            CHECK (max_parallel_runs IS NULL OR max_parallel_runs >= 1),
        ADD COLUMN parallel_runs     integer,
        ADD COLUMN plan              jsonb,
        ADD COLUMN completion_job_id bigint;
    CREATE INDEX {TASK_TABLE}_iteration_idx
        ON {TASK_TABLE} (fine_tuning_method, batch_id) WHERE status = 'processing';
    CREATE TABLE {RUN_TABLE} (
        task_id      text NOT NULL REFERENCES {TASK_TABLE} (id) ON DELETE CASCADE,
        params_id    text NOT NULL,
        position     integer NOT NULL,
        status       text NOT NULL DEFAULT 'queued' CHECK (status IN
                         ('queued', 'running', 'finished', 'failed')),
        mlflow_status text,
        run_id       text,
        metric       double precision,
        error        text,
        trained      boolean NOT NULL DEFAULT false,
        attempts     integer NOT NULL DEFAULT 0,
        failures     integer NOT NULL DEFAULT 0,
        worker       text,
        execution_id text,
        job_id       bigint,
        started_at   timestamptz,
        ended_at     timestamptz,
        updated_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (task_id, params_id)
    );
    """,
    # 3: API tokens, and who created and canceled each task
    f"""
    CREATE TABLE {TOKEN_TABLE} (
        id          text PRIMARY KEY,
        name        text NOT NULL,
        scope       text NOT NULL CHECK (scope IN ('tasks:read', 'tasks:write', 'admin')),
        hash        bytea NOT NULL UNIQUE,
        created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
        expires_at  timestamptz,
        revoked_at  timestamptz
    );
    CREATE UNIQUE INDEX {TOKEN_TABLE}_name_idx ON {TOKEN_TABLE} (name) WHERE revoked_at IS NULL;
    ALTER TABLE {TASK_TABLE}
        ADD COLUMN created_by  text,
        ADD COLUMN canceled_by text;
    """,
    # 4: the search: how a task's params sets are chosen, and how many
    f"""
    ALTER TABLE {TASK_TABLE}
        ADD COLUMN proposal text CHECK (proposal IS NULL OR proposal IN ('top_n', 'search')),
        ADD COLUMN max_runs integer CHECK (max_runs IS NULL OR max_runs >= 1);
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
