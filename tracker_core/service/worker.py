"""A worker process: takes tasks from the queue and runs each in a child process.

One worker process runs two Procrastinate workers on one event loop:

- the *task* worker (``concurrency`` slots) serves :data:`~tracker_core.service.queue.TASK_QUEUE`:
  for each job it moves the task to ``processing``, runs the iteration in a child process
  (:mod:`tracker_core.service.supervisor`), records progress after each run, and ends the task
  ``done``, ``error`` or ``canceled``;
- the *maintenance* worker (one slot, never busy training) serves
  :data:`~tracker_core.service.queue.MAINTENANCE_QUEUE`: every ``stall_check_seconds`` it puts
  the jobs of dead workers back in the queue (:meth:`WorkerRuntime.retry_stalled_jobs`).

How a task ends, by what its child reports:

- ``done`` -> ``done`` with the result; ``failed`` (every run failed) or ``error`` -> ``error``
  with the message;
- ``retry`` (a store failure after the stores' own retries) or a child that died -> back to
  ``pending`` and retried after ``retry_wait_seconds * 2**(n-1)``, ``error`` after
  ``max_attempts`` such failures;
- a cancel -> the child is asked to stop at its next safe point, terminated after
  ``cancel_grace_seconds``; -> ``canceled`` (the unfinished run is left as a crash leaves it);
- the worker stopping (Ctrl-C, SIGTERM) -> the same stop, within ``shutdown_grace_seconds``;
  the task goes back to ``pending`` and its job to the queue, to resume on any worker;
- the worker killed (``kill -9``): its children exit (their control pipe closes), its heartbeat
  stops, and after ``stall_seconds`` another worker's maintenance puts the job back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from typing import Any

from procrastinate import App, JobContext
from procrastinate.job_context import AbortReason
from procrastinate.jobs import Status

from tracker_core.errors import ConfigurationError
from tracker_core.service.child import ChildSpec
from tracker_core.service.models import Task, TaskStatus
from tracker_core.service.queue import (
    MAINTENANCE_QUEUE,
    RUNTIME_KEY,
    TASK_QUEUE,
    RetryTask,
    build_app,
    notify_retried,
)
from tracker_core.service.registry import MethodRegistry
from tracker_core.service.repository import TaskRepository
from tracker_core.service.schema import ensure_schema
from tracker_core.service.settings import ServiceSettings
from tracker_core.service.supervisor import ChildProcess, Outcome, warm_up

__all__ = ["WorkerRuntime", "run_worker"]

log = logging.getLogger(__name__)


class _Stop:
    """A stop request for one job, forwarded to its child once the child exists.

    Reasons: ``shutdown`` (this worker stops: the task goes back to the queue), ``cancel``
    (the task ends canceled; it wins over a shutdown), ``lost`` (another execution holds the
    task: write nothing; it wins over both).
    """

    _RANK = {"shutdown": 0, "cancel": 1, "lost": 2}

    def __init__(self) -> None:
        self.reason: str | None = None
        self.grace: float | None = None
        self.child: ChildProcess | None = None

    def request(self, reason: str, grace: float) -> None:
        if self.reason is None or self._RANK[reason] > self._RANK[self.reason]:
            self.reason = reason
        self.grace = grace if self.grace is None else min(self.grace, grace)
        if self.child is not None:
            self.child.request_stop(self.reason, self.grace)

    def attach(self, child: ChildProcess) -> None:
        self.child = child
        if self.reason is not None and self.grace is not None:
            child.request_stop(self.reason, self.grace)


class WorkerRuntime:
    """What the jobs of one worker process share: settings, the task table, the methods."""

    def __init__(
        self, settings: ServiceSettings, repo: TaskRepository, registry: MethodRegistry
    ) -> None:
        self.settings, self.repo, self.registry = settings, repo, registry
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    # ------------------------------------------------------------------ the task job
    async def run_task_job(self, context: JobContext, task_id: str) -> None:
        """The body of a task's job. A Procrastinate abort (a cancel, or this worker
        stopping) arrives as a cancellation: it becomes a stop request to the child, and
        the job ends once the child has stopped."""
        stop = _Stop()
        inner = asyncio.create_task(self._execute(context, task_id, stop))
        while True:
            try:
                await asyncio.shield(inner)
                return
            except asyncio.CancelledError:
                if inner.done():
                    raise
                if context.abort_reason() == AbortReason.USER_REQUEST:
                    log.info("task %s: cancel requested", task_id)
                    stop.request("cancel", self.settings.cancel_grace_seconds)
                else:
                    log.info("task %s: worker stopping", task_id)
                    stop.request("shutdown", self.settings.shutdown_grace_seconds)

    def _spec(self, task: Task) -> ChildSpec:
        return ChildSpec(
            task_id=task.id,
            method=task.fine_tuning_method,
            method_spec=self.registry.spec(task.fine_tuning_method),
            batch_id=task.batch_id,
            tracking_uri=self.settings.resolved_tracking_uri,
            artifact_uri=self.settings.resolved_artifact_uri,
            seed=self.settings.seed,
            work_dir=None if self.settings.work_dir is None else str(self.settings.work_dir),
            log_level=logging.getLogger("tracker_core").getEffectiveLevel(),
            lease_seconds=self.settings.lease_seconds,
        )

    async def _execute(self, context: JobContext, task_id: str, stop: _Stop) -> None:
        execution = uuid.uuid4().hex
        task = await self.repo.start(task_id, execution, self.name)
        if task is None:
            current = await self.repo.get(task_id)
            if current is None:
                log.warning("job %s names an unknown task %s; dropped", context.job.id, task_id)
            elif current.cancel_requested_at is not None and not current.status.is_terminal:
                await self.repo.cancel_unstarted(task_id)
                log.info("task %s canceled before it started", task_id)
            else:
                log.info("task %s is %s; nothing to run", task_id, current.status.value)
            return
        log.info(
            "task %s (%s, batch %s) processing, attempt %d",
            task.id,
            task.fine_tuning_method,
            task.batch_id,
            task.attempts,
        )
        if stop.reason is not None:
            await self._conclude(task, execution, Outcome("stopped", "before it started"), stop)
            return
        try:
            spec = self._spec(task)
        except ConfigurationError as exc:
            await self.repo.finish(task.id, execution, TaskStatus.ERROR, error=str(exc))
            return
        child = ChildProcess(spec)
        await asyncio.to_thread(child.start)
        stop.attach(child)

        async def on_progress(progress: dict[str, Any]) -> None:
            if not await self.repo.progress(task.id, execution, progress):
                # another execution holds the task now: stop, and write nothing more
                log.warning("task %s was taken over; stopping this execution", task.id)
                stop.request("lost", self.settings.shutdown_grace_seconds)

        outcome = await child.wait(on_progress)
        await self._conclude(task, execution, outcome, stop)

    async def _conclude(self, task: Task, execution: str, outcome: Outcome, stop: _Stop) -> None:
        repo, settings = self.repo, self.settings
        log.info("task %s: child ended %s (%s)", task.id, outcome.kind, outcome.payload)
        if stop.reason == "lost":
            return
        if outcome.kind == "done":
            await repo.finish(task.id, execution, TaskStatus.DONE, result=outcome.payload)
            return
        if outcome.kind in ("failed", "error"):
            await repo.finish(task.id, execution, TaskStatus.ERROR, error=str(outcome.payload))
            return
        if stop.reason == "cancel":
            await repo.finish(task.id, execution, TaskStatus.CANCELED)
            return
        if stop.reason == "shutdown":
            await repo.requeue(task.id, execution, None)
            raise RetryTask(f"task {task.id}: the worker stopped; back in the queue")
        # "retry", "crashed", or a child stopped from outside: another attempt, with backoff
        failures = await repo.failures(task.id) + 1
        message = str(outcome.payload)
        if failures >= settings.max_attempts:
            await repo.finish(
                task.id,
                execution,
                TaskStatus.ERROR,
                error=f"{message} (gave up after {failures} attempts)",
            )
            return
        delay = settings.retry_wait_seconds * 2 ** (failures - 1)
        await repo.requeue(task.id, execution, message, failed=True)
        raise RetryTask(f"task {task.id}: {message}; retrying in {delay:.0f}s", delay=delay)

    # ------------------------------------------------------------------ maintenance
    async def retry_stalled_jobs(self, app: App) -> None:
        """Put the jobs of dead workers back in the queue, their tasks back to ``pending``
        (or ``canceled`` when a cancel was waiting for them)."""
        stalled = await app.job_manager.get_stalled_jobs(
            queue=TASK_QUEUE, seconds_since_heartbeat=self.settings.stall_seconds
        )
        for job in stalled:
            assert job.id is not None
            task_id = str(job.task_kwargs.get("task_id", ""))
            before = await self.repo.get(task_id) if task_id else None
            try:
                await app.job_manager.retry_job(job)
            except Exception as exc:  # it ended or was retried meanwhile
                log.info("stalled job %s not retried: %s", job.id, exc)
                continue
            status = await app.job_manager.get_job_status_async(job.id)
            if before is None:
                continue
            if status == Status.FAILED:  # a cancel was pending: Procrastinate failed it
                await self.repo.cancel_abandoned(task_id, "canceled; its worker had died")
                log.warning("task %s: its worker died while it was being canceled", task_id)
                continue
            if before.status == TaskStatus.PROCESSING:
                await self.repo.requeue(task_id, before.execution_id, None)
            log.warning(
                "task %s: worker %s stopped heartbeating; its job %s is back in the queue",
                task_id,
                before.worker,
                job.id,
            )
            async with app.connector.pool.connection() as conn:  # type: ignore[attr-defined]
                await notify_retried(conn, job.id)


async def run_worker(
    settings: ServiceSettings,
    conninfo: str,
    stop: asyncio.Event,
    *,
    registry: MethodRegistry | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run a worker process's two Procrastinate workers until ``stop`` is set."""
    registry = registry or MethodRegistry(settings.methods)
    app = build_app(settings, conninfo, max_pool=settings.concurrency + 4)
    warming = asyncio.create_task(asyncio.to_thread(warm_up), name="forkserver warm-up")
    async with app.open_async():
        await ensure_schema(app)
        runtime = WorkerRuntime(settings, TaskRepository(app.connector.pool), registry)  # type: ignore[attr-defined]
        common: dict[str, Any] = {
            "install_signal_handlers": False,
            "update_heartbeat_interval": settings.heartbeat_seconds,
            "stalled_worker_timeout": settings.stall_seconds,
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
        log.info("worker %s: %d task slot(s) on %s", runtime.name, settings.concurrency, TASK_QUEUE)
        if ready is not None:
            ready.set()
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *workers], return_when=asyncio.FIRST_COMPLETED)
        for task in workers:
            task.cancel()
        stopper.cancel()
        results = await asyncio.gather(*workers, return_exceptions=True)
        with contextlib.suppress(Exception):
            await warming
        for task, result in zip(workers, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("%s failed: %s", task.get_name(), result, exc_info=result)
        if not stop.is_set():  # a worker ended by itself (its database went away)
            raise RuntimeError(f"worker stopped unexpectedly: {done}")
