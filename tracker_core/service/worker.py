"""A worker process: takes jobs from the queue and runs each in a child process.

One worker process runs two Procrastinate workers on one event loop:

- the *task* worker (``concurrency`` slots) serves :data:`~tracker_core.service.queue.TASK_QUEUE`:
  a task's own job, its run jobs and its completion job, each in a child process (what each
  does and how it ends: :mod:`tracker_core.service.executions`);
- the *maintenance* worker (one slot, never busy training) serves
  :data:`~tracker_core.service.queue.MAINTENANCE_QUEUE`: every ``stall_check_seconds`` it puts
  the jobs of dead workers back in the queue (:meth:`WorkerRuntime.retry_stalled_jobs`).

A Procrastinate abort (a cancel, or this worker stopping) reaches a job as a cancellation of
its coroutine; :meth:`WorkerRuntime._guard` turns it into a stop request to the job's child.

When the task database does not answer (stopped, restarted, unreachable), every database call
of the worker (Procrastinate's and the task table's) waits for it with backoff
(:mod:`tracker_core.service.outage`) while the children keep training; a job that ended
meanwhile is written when the database answers again. Dead workers are judged only once the
database has been up for ``stall_seconds`` (as this worker saw it, and as the server's start
time says), so no live worker's job is taken for a stalled one because the outage kept its
heartbeat from landing. An outage longer than ``database_outage_seconds`` ends the process
(:class:`~tracker_core.service.errors.DatabaseOutageError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from procrastinate import App, JobContext
from procrastinate.job_context import AbortReason
from procrastinate.jobs import Status

from tracker_core.service.errors import ServiceError
from tracker_core.service.executions import JobExecutions, JobStop
from tracker_core.service.models import TaskStatus
from tracker_core.service.outage import (
    Backoff,
    Outage,
    OutageRider,
    database_age,
    describe,
    is_outage,
    probe,
)
from tracker_core.service.protocol import StopReason
from tracker_core.service.queue import (
    COMPLETE,
    MAINTENANCE_QUEUE,
    RUN_PARAMS,
    RUNTIME_KEY,
    TASK_QUEUE,
    QueueJobs,
    build_app,
    notify_retried,
)
from tracker_core.service.registry import MethodRegistry
from tracker_core.service.repository import TaskRepository
from tracker_core.service.schema import ensure_schema
from tracker_core.service.settings import ServiceSettings
from tracker_core.service.supervisor import (
    WarmChildren,
    preload,
    stop_forkserver,
    stores_to_preload,
    warm_up,
)

__all__ = ["WorkerRuntime", "run_worker"]

log = logging.getLogger(__name__)


class WorkerRuntime:
    """What the jobs of one worker process share: settings, the task table, the queue (to
    defer and cancel jobs inside the task table's transactions), how each kind of job runs
    (``executions``, with this process's warm children), and how it rides out an outage of
    its database (``rider``, whose ``outage`` is the database as this worker sees it)."""

    def __init__(
        self,
        settings: ServiceSettings,
        repo: TaskRepository,
        registry: MethodRegistry,
        jobs: QueueJobs,
        *,
        rider: OutageRider | None = None,
    ) -> None:
        self.settings, self.repo, self.jobs = settings, repo, jobs
        self.children = WarmChildren(settings.warm_child_seconds)
        self.executions = JobExecutions(settings, repo, registry, jobs, self.children)
        self.rider = rider or OutageRider(Outage(settings.database_outage_seconds), Backoff())
        self.outage = self.rider.outage

    # ------------------------------------------------------------------ job bodies
    async def _guard(
        self,
        context: JobContext,
        what: str,
        body: Callable[[JobStop], Coroutine[Any, Any, None]],
    ) -> None:
        """Run a job's body. A Procrastinate abort (a cancel, or this worker stopping)
        arrives as a cancellation: it becomes a stop request to the child, and the job ends
        once the child has stopped."""
        stop = JobStop()
        inner = asyncio.create_task(body(stop))
        while True:
            try:
                await asyncio.shield(inner)
                return
            except asyncio.CancelledError:
                if inner.done():
                    raise
                if context.abort_reason() == AbortReason.USER_REQUEST:
                    log.info("%s: cancel requested", what)
                    stop.request(StopReason.CANCEL, self.settings.cancel_grace_seconds)
                else:
                    log.info("%s: worker stopping", what)
                    stop.request(StopReason.SHUTDOWN, self.settings.shutdown_grace_seconds)

    async def run_task_job(self, context: JobContext, task_id: str) -> None:
        """The task's own job: plan the iteration, then run it here or fan it out."""
        await self._guard(
            context, f"task {task_id}", lambda stop: self.executions.task(context, task_id, stop)
        )

    async def run_params_job(self, context: JobContext, task_id: str, params_id: str) -> None:
        """One run job of a fanned-out task."""
        await self._guard(
            context,
            f"task {task_id} run {params_id}",
            lambda stop: self.executions.run(context, task_id, params_id, stop),
        )

    async def complete_job(self, context: JobContext, task_id: str) -> None:
        """The completion job of a fanned-out task."""
        await self._guard(
            context,
            f"task {task_id} completion",
            lambda stop: self.executions.completion(context, task_id, stop),
        )

    # ------------------------------------------------------------------ maintenance
    async def retry_stalled_jobs(self, app: App) -> None:
        """Put the jobs of dead workers back in the queue: a task's own job (its task back
        to ``pending``), a run job (its run back to ``queued``) or a completion job (its task
        held by no execution); a task whose cancel was waiting for them is canceled. Not
        until the database has been up for ``stall_seconds``: a silent heartbeat is no
        evidence of death before that."""
        if not await self._heartbeats_are_evidence(app):
            log.debug("stalled jobs not looked for: the task database came back recently")
            return
        stalled = await app.job_manager.get_stalled_jobs(
            queue=TASK_QUEUE, seconds_since_heartbeat=self.settings.stall_seconds
        )
        for job in stalled:
            assert job.id is not None
            task_id = str(job.task_kwargs.get("task_id", ""))
            before = await self.repo.tasks.get(task_id) if task_id else None
            try:
                await app.job_manager.retry_job(job)
            except Exception as exc:  # it ended or was retried meanwhile
                log.info("stalled job %s not retried: %s", job.id, exc)
                continue
            status = await app.job_manager.get_job_status_async(job.id)
            if before is None:
                continue
            if job.task_name == RUN_PARAMS:
                params_id = str(job.task_kwargs.get("params_id", ""))
                await self.repo.runs.requeue_run(task_id, params_id, self.jobs)
                log.warning(
                    "task %s run %s: its worker stopped heartbeating; job %s is back in the "
                    "queue (the run resumes once the dead worker's lease expired)",
                    task_id,
                    params_id,
                    job.id,
                )
            elif job.task_name == COMPLETE:
                await self.repo.runs.release(task_id, None, None)
                await self.repo.runs.advance(task_id, self.jobs)
                log.warning(
                    "task %s: its completion's worker died; job %s requeued", task_id, job.id
                )
            else:
                if status == Status.FAILED:  # a cancel was pending: Procrastinate failed it
                    await self.repo.tasks.cancel_abandoned(task_id, "canceled; its worker had died")
                    log.warning("task %s: its worker died while it was being canceled", task_id)
                    continue
                if before.status == TaskStatus.PROCESSING:
                    await self.repo.tasks.requeue(task_id, before.execution_id, None)
                log.warning(
                    "task %s: worker %s stopped heartbeating; its job %s is back in the queue",
                    task_id,
                    before.worker,
                    job.id,
                )
            if status == Status.TODO:
                await self.rider.run(functools.partial(self._notify, app, job.id))

    async def _notify(self, app: App, job_id: int) -> None:
        async with app.connector.pool.connection() as conn:  # type: ignore[attr-defined]
            await notify_retried(conn, job_id)

    async def _heartbeats_are_evidence(self, app: App) -> bool:
        """Whether every live worker has had ``stall_seconds`` of database to beat in: the
        server has been up that long (a restarted one lost nothing, but has seen no
        heartbeat yet), and this worker has not seen it down for that long (asked after
        the query, which waits through an outage)."""

        async def uptime() -> float:
            async with app.connector.pool.connection() as conn:  # type: ignore[attr-defined]
                return await database_age(conn)

        window = self.settings.stall_seconds
        up_for = await self.rider.run(uptime)
        return up_for >= window and self.outage.settled(window)


def _quiet_procrastinate() -> None:
    """Once this worker gives up on its database, what Procrastinate says as its workers
    fail (a traceback per query) is the consequence, said once by the caller instead."""
    logging.getLogger("procrastinate").setLevel(logging.CRITICAL)


async def run_worker(
    settings: ServiceSettings,
    conninfo: str,
    stop: asyncio.Event,
    *,
    registry: MethodRegistry | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run a worker process's two Procrastinate workers until ``stop`` is set; raises
    :class:`~tracker_core.service.errors.DatabaseOutageError` if the task database does not
    answer for ``database_outage_seconds``."""
    registry = registry or MethodRegistry(settings.methods)
    # a call waits at most a heartbeat for a connection, and retries at least every half
    # heartbeat: once the database is back, every heartbeat lands well within stall_seconds
    rider = OutageRider(
        Outage(settings.database_outage_seconds),
        Backoff(first=min(0.1, settings.heartbeat_seconds / 2), cap=settings.heartbeat_seconds / 2),
        on_give_up=_quiet_procrastinate,
    )
    app = build_app(
        settings,
        conninfo,
        max_pool=settings.concurrency + 4,
        timeout=settings.heartbeat_seconds,
        rider=rider,
    )
    preload(stores_to_preload(settings.resolved_tracking_uri, settings.resolved_artifact_uri))
    warming = asyncio.create_task(asyncio.to_thread(warm_up), name="forkserver warm-up")
    await rider.run(lambda: probe(conninfo, settings.heartbeat_seconds + 5))
    async with app.open_async():
        await rider.run(lambda: ensure_schema(app))
        repo = TaskRepository(app.connector.pool, rider=rider)  # type: ignore[attr-defined]
        runtime = WorkerRuntime(settings, repo, registry, QueueJobs(app), rider=rider)
        common: dict[str, Any] = {
            "install_signal_handlers": False,
            "update_heartbeat_interval": settings.heartbeat_seconds,
            # only when a worker starts: forget worker rows silent for longer than any live
            # worker can be (a worker riding out an outage is alive)
            "stalled_worker_timeout": settings.stall_seconds + settings.database_outage_seconds,
            "fetch_job_polling_interval": settings.poll_seconds,
            "abort_job_polling_interval": settings.poll_seconds,
            "shutdown_graceful_timeout": 0.0,
            "additional_context": {RUNTIME_KEY: runtime},
        }
        workers = [
            asyncio.create_task(
                app.run_worker_async(
                    queues=[TASK_QUEUE],
                    concurrency=settings.concurrency,
                    name="tracker-core-tasks",
                    **common,
                ),
                name="tracker-core task worker",
            ),
            asyncio.create_task(
                app.run_worker_async(
                    queues=[MAINTENANCE_QUEUE],
                    concurrency=1,
                    name="tracker-core-maintenance",
                    delete_jobs="successful",
                    **common,
                ),
                name="tracker-core maintenance worker",
            ),
        ]
        log.info(
            "worker %s: %d task slot(s) on %s",
            runtime.executions.name,
            settings.concurrency,
            TASK_QUEUE,
        )
        if ready is not None:
            ready.set()
        stopper = asyncio.create_task(stop.wait())
        given_up = asyncio.create_task(rider.given_up.wait())
        done, _ = await asyncio.wait(
            [stopper, given_up, *workers], return_when=asyncio.FIRST_COMPLETED
        )
        # stopping while the database does not answer: wait for it a grace period at most
        rider.outage.stopping(settings.shutdown_grace_seconds)
        for task in workers:
            task.cancel()
        stopper.cancel()
        given_up.cancel()
        results = await asyncio.gather(*workers, return_exceptions=True)
        await runtime.children.close()
        with contextlib.suppress(Exception):
            await warming
        await asyncio.to_thread(stop_forkserver)
        stopped_first = stopper in done  # errors while stopping are said in a line each
        for task, result in zip(workers, results, strict=True):
            if not isinstance(result, BaseException) or isinstance(result, asyncio.CancelledError):
                continue
            if rider.given_up.is_set():  # said once, by the caller
                continue
            if stopped_first or is_outage(result):
                log.warning("%s stopped: %s", task.get_name(), describe(result))
            else:
                log.error("%s failed: %s", task.get_name(), result, exc_info=result)
        if rider.given_up.is_set() and not stop.is_set():
            raise rider.outage.error()
        if rider.given_up.is_set():
            log.warning(
                "%s; the jobs this worker was running go back to the queue once the database "
                "answers (as a dead worker's)",
                rider.outage.error(),
            )
        if not stop.is_set():  # a worker ended by itself (its error is logged above)
            ended = next(t for t in workers if t in done)
            result = results[workers.index(ended)]
            why = describe(result) if isinstance(result, BaseException) else "no error"
            raise ServiceError(f"the {ended.get_name()} stopped unexpectedly: {why}")
