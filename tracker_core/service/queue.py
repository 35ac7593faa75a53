"""The queue: one Procrastinate app, its queues, its jobs, and how they are retried.

What a task becomes in Procrastinate's ``procrastinate_jobs`` table (what each job does and how
it ends is told in :mod:`tracker_core.service.executions`); every job carries ``task_id``, and
the task table stays the one place that tells a task's status:

- queue :data:`TASK_QUEUE`, task :data:`RUN_TASK` (``{"task_id"}``): the task's own job. Its
  ``lock`` is :func:`iteration_lock` (method + batch). Two tasks of one iteration never execute
  at once: while the first one's run jobs are out, the second's job finds the iteration taken
  (the task table says so) and waits in the queue.
- queue :data:`TASK_QUEUE`, task :data:`RUN_PARAMS` (``{"task_id", "params_id"}``): one run
  job. Its ``lock`` and ``queueing_lock`` are :func:`run_lock` (the iteration's experiment +
  params id): a run is queued at most once at a time and never trained by two jobs at once.
- queue :data:`TASK_QUEUE`, task :data:`COMPLETE` (``{"task_id"}``): the completion job,
  deferred exactly once, by the transaction that records the end of the iteration's last
  unfinished run (see :mod:`tracker_core.service.repository`).
- queue :data:`MAINTENANCE_QUEUE`, periodic task :data:`RETRY_STALLED`: puts the jobs of dead
  workers (no heartbeat for ``stall_seconds``) back in the queue, their tasks or runs back to
  waiting. It runs on its own queue, served by a worker slot that never trains, so it runs
  however busy the training slots are.
- queue :data:`MAINTENANCE_QUEUE`, periodic task :data:`REMOVE_OLD_JOBS` (hourly): deletes the
  jobs, and their events, that ended over ``keep_jobs_hours`` ago (:func:`remove_old_jobs`).
  Procrastinate keeps every job forever, and the stalled-jobs check alone makes one every
  ``stall_check_seconds`` (17,280 a day at the default); a task's status, result and error
  live in the task table, which is never pruned.

Retries: a job is retried only when it raises :class:`RetryTask`, after the delay it names
(the worker decides: store failures with backoff up to ``max_attempts``, a stopped worker at
once). Anything else ends the job.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from procrastinate import App, JobContext, PsycopgConnector
from procrastinate import exceptions as procrastinate_exceptions
from procrastinate import jobs as jobs_module
from procrastinate.retry import BaseRetryStrategy, RetryDecision

if TYPE_CHECKING:
    from tracker_core.service.outage import OutageRider
    from tracker_core.service.settings import ServiceSettings

__all__ = [
    "COMPLETE",
    "MAINTENANCE_QUEUE",
    "REMOVE_OLD_JOBS",
    "RETRY_STALLED",
    "RUN_PARAMS",
    "RUN_TASK",
    "TASK_QUEUE",
    "QueueJobs",
    "RetryTask",
    "build_app",
    "iteration_lock",
    "remove_old_jobs",
    "run_lock",
]

log = logging.getLogger(__name__)

_Job = Callable[[JobContext, int], Awaitable[None]]

TASK_QUEUE = "tracker-core-tasks"
MAINTENANCE_QUEUE = "tracker-core-maintenance"
RUN_TASK = "tracker_core.run_task"
RUN_PARAMS = "tracker_core.run_params"
COMPLETE = "tracker_core.complete_iteration"
RETRY_STALLED = "tracker_core.retry_stalled_jobs"
REMOVE_OLD_JOBS = "tracker_core.remove_old_jobs"
#: how often (cron) a worker's maintenance deletes the jobs that ended over
#: ``keep_jobs_hours`` ago
REMOVE_OLD_JOBS_CRON = "23 * * * *"
#: the key the worker's runtime is passed to jobs under (``context.additional_context``)
RUNTIME_KEY = "tracker_core_runtime"


def iteration_lock(method: str, batch_id: str) -> str:
    """The Procrastinate lock of an iteration: its jobs run one at a time."""
    return f"tracker-core:iteration:{method}:{batch_id}"


def run_lock(experiment_id: str, params_id: str) -> str:
    """The Procrastinate lock and queueing lock of one run's job: one at a time, queued once."""
    return f"tracker-core:run:{experiment_id}:{params_id}"


def completion_lock(task_id: str) -> str:
    return f"tracker-core:complete:{task_id}"


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
            return RetryDecision(retry_in={"milliseconds": round(exception.delay * 1000)})
        return None


def build_app(
    settings: ServiceSettings,
    conninfo: str,
    *,
    max_pool: int = 10,
    timeout: float = 30.0,
    rider: OutageRider | None = None,
) -> App:
    """The Procrastinate app of a service process (not opened yet). ``timeout``: how long
    its pool waits for a connection, and keeps trying to open one; ``rider``: ride out
    database outages (:class:`~tracker_core.service.outage.RidingConnector`)."""
    options: dict[str, Any] = {
        "conninfo": conninfo,
        "min_size": 1,
        "max_size": max_pool,
        "timeout": timeout,
        "reconnect_timeout": timeout,
        "kwargs": {"application_name": "tracker-core-service"},
    }
    if rider is None:
        connector = PsycopgConnector(**options)
    else:
        from tracker_core.service.outage import RidingConnector

        connector = RidingConnector(rider=rider, **options)
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

    @app.task(name=RUN_PARAMS, queue=TASK_QUEUE, pass_context=True, retry=_RetryOnRequest())
    async def run_params(context: JobContext, task_id: str, params_id: str) -> None:
        runtime = context.additional_context.get(RUNTIME_KEY)
        if runtime is None:
            raise RetryTask("no tracker-core runtime in this worker", delay=settings.poll_seconds)
        await runtime.run_params_job(context, task_id, params_id)

    @app.task(name=COMPLETE, queue=TASK_QUEUE, pass_context=True, retry=_RetryOnRequest())
    async def complete_iteration(context: JobContext, task_id: str) -> None:
        runtime = context.additional_context.get(RUNTIME_KEY)
        if runtime is None:
            raise RetryTask("no tracker-core runtime in this worker", delay=settings.poll_seconds)
        await runtime.complete_job(context, task_id)

    every = max(1, int(settings.stall_check_seconds))

    def maintenance(name: str, cron: str, periodic_id: str) -> Callable[[_Job], _Job]:
        """A periodic job on the maintenance queue, deferred once per tick by all workers."""

        def register(fn: _Job) -> _Job:
            task = app.task(
                name=name, queue=MAINTENANCE_QUEUE, pass_context=True, queueing_lock=name
            )(fn)
            app.periodic(cron=cron, periodic_id=periodic_id)(task)
            return fn

        return register

    @maintenance(RETRY_STALLED, f"* * * * * */{every}", "stalled")
    async def retry_stalled_jobs(context: JobContext, timestamp: int) -> None:
        runtime = context.additional_context.get(RUNTIME_KEY)
        if runtime is not None:
            await runtime.retry_stalled_jobs(context.app)

    @maintenance(REMOVE_OLD_JOBS, REMOVE_OLD_JOBS_CRON, "old-jobs")
    async def remove_old_jobs_job(context: JobContext, timestamp: int) -> None:
        await remove_old_jobs(context.app, settings.keep_jobs_hours)

    return app


async def remove_old_jobs(app: App, keep_hours: int) -> None:
    """Delete the jobs that ended (succeeded, failed, cancelled, aborted) over ``keep_hours``
    ago, with their events; a job still queued or running is never touched."""
    await app.job_manager.delete_old_jobs(
        nb_hours=keep_hours, include_failed=True, include_cancelled=True, include_aborted=True
    )
    log.debug("deleted the jobs that ended over %d hour(s) ago", keep_hours)


async def defer_run_task(
    app: App, connection: Any, *, task_id: str, method: str, batch_id: str
) -> int:
    """Defer a task's job on ``connection``, inside the caller's transaction; its id."""
    task = app.tasks[RUN_TASK]
    job_id = await task.configure(
        lock=iteration_lock(method, batch_id), connection=connection
    ).defer_async(task_id=task_id)
    return int(job_id)


class QueueJobs:
    """Defers and cancels a task's jobs on the caller's connection, inside its transaction
    (so a job exists exactly when the transaction that decided it commits)."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def _defer(self, connection: Any, name: str, lock: str, **kwargs: str) -> int:
        task = self.app.tasks[name]
        try:
            async with connection.transaction():  # a savepoint: a refusal leaves ours usable
                job_id = await task.configure(
                    lock=lock, queueing_lock=lock, connection=connection
                ).defer_async(**kwargs)
            return int(job_id)
        except procrastinate_exceptions.AlreadyEnqueued:
            # already waiting in the queue (a redelivered decision): that job is the one
            cur = await connection.execute(
                "SELECT id FROM procrastinate_jobs WHERE queueing_lock = %s AND status = 'todo'",
                (lock,),
            )
            row = await cur.fetchone()
            if row is None:  # it started meanwhile; cannot happen under the task's row lock
                raise
            log.info("job %s (%s) was already queued", row[0], lock)
            return int(row[0])

    async def defer_run(
        self, connection: Any, *, task_id: str, experiment_id: str, params_id: str
    ) -> int:
        """Defer one run's job; its id."""
        return await self._defer(
            connection,
            RUN_PARAMS,
            run_lock(experiment_id, params_id),
            task_id=task_id,
            params_id=params_id,
        )

    async def defer_completion(self, connection: Any, *, task_id: str) -> int:
        """Defer the completion job of a task; its id."""
        return await self._defer(connection, COMPLETE, completion_lock(task_id), task_id=task_id)

    async def cancel(self, connection: Any, job_ids: list[int], *, keep: int | None = None) -> None:
        """Cancel these jobs: a queued one never starts, a running one is asked to abort (its
        worker stops it at its next safe point). ``keep``: a job not to touch (the caller's)."""
        for job_id in job_ids:
            if job_id != keep:
                await self.app.job_manager.cancel_job_by_id_async(
                    job_id, abort=True, connection=connection
                )


async def notify_retried(connection: Any, job_id: int, queue: str = TASK_QUEUE) -> None:
    """Wake idle workers for a job put back by ``retry_job`` (an UPDATE: Procrastinate's
    NOTIFY trigger fires on INSERT only, so without this it waits for the next poll)."""
    await connection.execute(
        "SELECT pg_notify(%s, json_build_object('type', 'job_inserted', 'job_id', %s)::text)",
        (f"procrastinate_queue_v1#{queue}", job_id),
    )


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
