"""The queue: one Procrastinate app, its queues, its jobs, and how they are retried.

Job layout (what a task becomes in Procrastinate's ``procrastinate_jobs`` table):

- queue :data:`TASK_QUEUE`, task :data:`RUN_TASK` (``{"task_id": ...}``): a task's whole
  iteration (seed steps 1-8, :func:`tracker_core.finetune.run_iteration` in a child
  process). Its Procrastinate ``lock`` is :func:`iteration_lock` (method + batch), so two
  tasks of one iteration never run at once: the second waits, then finds the iteration done.
- queue :data:`MAINTENANCE_QUEUE`, periodic task :data:`RETRY_STALLED`: puts the jobs of dead
  workers (no heartbeat for ``stall_seconds``) back in the queue, and their tasks back to
  ``pending``. It runs on its own queue, served by a worker slot that never trains, so it
  runs however busy the training slots are.

Parallel iterations (one job per params set) fit in this layout without changing it: a task
then defers a setup job (steps 1-3) under the iteration lock, the setup job defers one job
per run on :data:`TASK_QUEUE` with the run's own lock, and the last run to end defers the
completion job (step 7). Every job carries ``task_id``, so the task table stays the one place
that tells a task's status.

Retries: a job is retried only when it raises :class:`RetryTask`, after the delay it names
(the worker decides: store failures with backoff up to ``max_attempts``, a stopped worker at
once). Anything else ends the job.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

from procrastinate import App, JobContext, PsycopgConnector
from procrastinate import jobs as jobs_module
from procrastinate.retry import BaseRetryStrategy, RetryDecision

if TYPE_CHECKING:
    from tracker_core.service.settings import ServiceSettings

__all__ = [
    "MAINTENANCE_QUEUE",
    "RETRY_STALLED",
    "RUN_TASK",
    "TASK_QUEUE",
    "RetryTask",
    "build_app",
    "iteration_lock",
]

log = logging.getLogger(__name__)

TASK_QUEUE = "tracker-core-tasks"
MAINTENANCE_QUEUE = "tracker-core-maintenance"
RUN_TASK = "tracker_core.run_task"
RETRY_STALLED = "tracker_core.retry_stalled_jobs"
#: the key the worker's runtime is passed to jobs under (``context.additional_context``)
RUNTIME_KEY = "tracker_core_runtime"


def iteration_lock(method: str, batch_id: str) -> str:
    """The Procrastinate lock of an iteration: its jobs run one at a time."""
    return f"tracker-core:iteration:{method}:{batch_id}"


class RetryTask(Exception):
    """Raised by a job to be run again after ``delay`` seconds (see the module docstring)."""

    def __init__(self, message: str, *, delay: float = 0.0) -> None:
        super().__init__(message)
        self.delay = max(0.0, delay)


class _RetryOnRequest(BaseRetryStrategy):
    """Retry exactly the jobs that raise :class:`RetryTask`, after the delay they name."""

    def get_retry_decision(
        self, *, exception: BaseException, job: jobs_module.Job
    ) -> RetryDecision | None:
        if isinstance(exception, RetryTask):
            return RetryDecision(retry_in={"seconds": round(exception.delay)})
        return None


def build_app(settings: ServiceSettings, conninfo: str, *, max_pool: int = 10) -> App:
    """The Procrastinate app of a service process (not opened yet)."""
    connector = PsycopgConnector(
        conninfo=conninfo,
        min_size=1,
        max_size=max_pool,
        kwargs={"application_name": "tracker-core-service"},
    )
    app = App(connector=connector)

    @app.task(
        name=RUN_TASK,
        queue=TASK_QUEUE,
        pass_context=True,
        retry=_RetryOnRequest(),
    )
    async def run_task(context: JobContext, task_id: str) -> None:
        runtime = context.additional_context.get(RUNTIME_KEY)
        if runtime is None:  # a worker of another program took the job: give it back
            raise RetryTask("no tracker-core runtime in this worker", delay=settings.poll_seconds)
        await runtime.run_task_job(context, task_id)

    every = max(1, int(settings.stall_check_seconds))

    @app.periodic(cron=f"* * * * * */{every}", periodic_id="stalled")
    @app.task(
        name=RETRY_STALLED,
        queue=MAINTENANCE_QUEUE,
        pass_context=True,
        queueing_lock=RETRY_STALLED,
    )
    async def retry_stalled_jobs(context: JobContext, timestamp: int) -> None:
        runtime = context.additional_context.get(RUNTIME_KEY)
        if runtime is not None:
            await runtime.retry_stalled_jobs(context.app)

    return app


async def defer_run_task(
    app: App, connection: Any, *, task_id: str, method: str, batch_id: str
) -> int:
    """Defer a task's job on ``connection``, inside the caller's transaction; its id."""
    task = app.tasks[RUN_TASK]
    job_id = await task.configure(
        lock=iteration_lock(method, batch_id), connection=connection
    ).defer_async(task_id=task_id)
    return int(job_id)


async def notify_retried(connection: Any, job_id: int, queue: str = TASK_QUEUE) -> None:
    """Wake idle workers for a job put back by ``retry_job`` (an UPDATE: Procrastinate's
    NOTIFY trigger fires on INSERT only, so without this it waits for the next poll)."""
    await connection.execute(
        "SELECT pg_notify(%s, json_build_object('type', 'job_inserted', 'job_id', %s)::text)",
        (f"procrastinate_queue_v1#{queue}", job_id),
    )


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
