"""A worker process: takes jobs from the queue and runs each in a child process.

One worker process runs two Procrastinate workers on one event loop:

- the *task* worker (``concurrency`` slots) serves :data:`~tracker_core.service.queue.TASK_QUEUE`,
  whose three kinds of jobs (see :mod:`tracker_core.service.queue`) each run in a child
  process (:mod:`tracker_core.service.supervisor`):

  - a task's own job moves the task to ``processing`` and plans its iteration (seed steps
    1-3). Run one at a time (the task's or the method's ``max_parallel_runs`` is 1, or one
    run is left), the same child trains the runs in order and completes the iteration, and
    the job ends the task as before. Otherwise it fans out: one run job per params set (at
    most ``parallel_runs`` out at a time), recorded with the task in one transaction;
  - a run job trains one params set; its end is recorded in the transaction that defers the
    next queued run, or the completion job once every run has ended;
  - the completion job finishes the iteration (step 7) and ends the task ``done`` (with the
    result; runs that failed are listed in it) or ``error`` (every run failed).

- the *maintenance* worker (one slot, never busy training) serves
  :data:`~tracker_core.service.queue.MAINTENANCE_QUEUE`: every ``stall_check_seconds`` it puts
  the jobs of dead workers back in the queue (:meth:`WorkerRuntime.retry_stalled_jobs`).

How a job ends, by what its child reports:

- ``done`` -> ``done`` with the result; ``failed`` (every run failed) or ``error`` -> ``error``
  with the message; a run job's ``ran`` -> the run ``finished`` or ``failed``;
- ``retry`` (a store failure after the stores' own retries) or a child that died -> retried
  after ``retry_wait_seconds * 2**(n-1)``, ``error`` after ``max_attempts`` such failures
  (of the task's own job or its completion, or of one run: the task then ends ``error`` and
  its other jobs are stopped);
- a cancel -> the child is asked to stop at its next safe point, terminated after
  ``cancel_grace_seconds``; the task ends ``canceled`` once none of its jobs is running (the
  unfinished runs are left as a crash leaves them; no completion runs);
- the worker stopping (Ctrl-C, SIGTERM) -> the same stop, within ``shutdown_grace_seconds``;
  the job goes back to the queue, to resume on any worker (a task not yet fanned out goes
  back to ``pending``);
- the worker killed (``kill -9``): its children exit (their control pipe closes), its heartbeat
  stops, and after ``stall_seconds`` another worker's maintenance puts its jobs back; a run
  resumes once the dead worker's run lease expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from procrastinate import App, JobContext
from procrastinate.job_context import AbortReason
from procrastinate.jobs import Status

from tracker_core.errors import ConfigurationError
from tracker_core.service.child import ChildSpec
from tracker_core.service.models import Task, TaskStatus
from tracker_core.service.queue import (
    COMPLETE,
    MAINTENANCE_QUEUE,
    RUN_PARAMS,
    RUNTIME_KEY,
    TASK_QUEUE,
    QueueJobs,
    RetryTask,
    build_app,
    notify_retried,
)
from tracker_core.service.registry import MethodRegistry
from tracker_core.service.repository import PlannedRun, RunEnd, TaskRepository
from tracker_core.service.schema import ensure_schema
from tracker_core.service.settings import ServiceSettings
from tracker_core.service.supervisor import (
    ChildProcess,
    Outcome,
    preload,
    stores_to_preload,
    warm_up,
)

__all__ = ["WorkerRuntime", "run_worker"]

log = logging.getLogger(__name__)

#: how a run's MLflow status maps to its state in the run table
_ENDED = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "failed"}


class _Stop:
    """A stop request for one job, forwarded to its child once the child exists.

    Reasons: ``shutdown`` (this worker stops: the job goes back to the queue), ``cancel``
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


async def _no_progress(_progress: dict[str, Any]) -> None:
    return None


class WorkerRuntime:
    """What the jobs of one worker process share: settings, the task table, the methods,
    and the queue (to defer and cancel jobs inside the task table's transactions)."""

    def __init__(
        self,
        settings: ServiceSettings,
        repo: TaskRepository,
        registry: MethodRegistry,
        jobs: QueueJobs,
    ) -> None:
        self.settings, self.repo, self.registry, self.jobs = settings, repo, registry, jobs
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    # ------------------------------------------------------------------ job bodies
    async def _guard(
        self,
        context: JobContext,
        what: str,
        body: Callable[[_Stop], Coroutine[Any, Any, None]],
    ) -> None:
        """Run a job's body. A Procrastinate abort (a cancel, or this worker stopping)
        arrives as a cancellation: it becomes a stop request to the child, and the job ends
        once the child has stopped."""
        stop = _Stop()
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
                    stop.request("cancel", self.settings.cancel_grace_seconds)
                else:
                    log.info("%s: worker stopping", what)
                    stop.request("shutdown", self.settings.shutdown_grace_seconds)

    async def run_task_job(self, context: JobContext, task_id: str) -> None:
        """The task's own job: plan the iteration, then run it here or fan it out."""
        await self._guard(
            context, f"task {task_id}", lambda stop: self._execute(context, task_id, stop)
        )

    async def run_params_job(self, context: JobContext, task_id: str, params_id: str) -> None:
        """One run job of a fanned-out task."""
        await self._guard(
            context,
            f"task {task_id} run {params_id}",
            lambda stop: self._execute_run(context, task_id, params_id, stop),
        )

    async def complete_job(self, context: JobContext, task_id: str) -> None:
        """The completion job of a fanned-out task."""
        await self._guard(
            context,
            f"task {task_id} completion",
            lambda stop: self._execute_completion(context, task_id, stop),
        )

    def _spec(self, task: Task, **extra: Any) -> ChildSpec:
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
            max_parallel_runs=task.max_parallel_runs,
            **extra,
        )

    async def _child(
        self,
        spec: ChildSpec,
        stop: _Stop,
        on_progress: Callable[[dict[str, Any]], Awaitable[None]] = _no_progress,
    ) -> Outcome:
        child = ChildProcess(spec)
        await asyncio.to_thread(child.start)
        stop.attach(child)
        return await child.wait(on_progress)

    # ------------------------------------------------------------------ the task's own job
    async def _execute(self, context: JobContext, task_id: str, stop: _Stop) -> None:
        execution = uuid.uuid4().hex
        started = await self.repo.start(task_id, execution, self.name)
        if started.reason == "waiting":
            # another task of this iteration has its runs out: wait for it in the queue
            log.info("task %s waits for task %s of the same iteration", task_id, started.holder)
            raise RetryTask(
                f"task {task_id}: task {started.holder} holds the iteration",
                delay=max(1.0, self.settings.poll_seconds),
            )
        if started.reason != "started" or started.task is None:
            if started.reason == "unknown":
                log.warning("job %s names an unknown task %s; dropped", context.job.id, task_id)
            else:
                log.info("task %s: nothing to run (%s)", task_id, started.reason)
            return
        task = started.task
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

        async def on_progress(progress: dict[str, Any]) -> None:
            if not await self.repo.progress(task.id, execution, progress):
                # another execution holds the task now: stop, and write nothing more
                log.warning("task %s was taken over; stopping this execution", task.id)
                stop.request("lost", self.settings.shutdown_grace_seconds)

        outcome = await self._child(spec, stop, on_progress)
        if outcome.kind == "planned" and stop.reason != "lost":
            await self._fan_out(task, execution, outcome.payload)
            return
        await self._conclude(task, execution, outcome, stop)

    async def _fan_out(self, task: Task, execution: str, payload: dict[str, Any]) -> None:
        plan = payload["plan"]
        runs = [PlannedRun(p["id"], plan["ended"].get(p["id"])) for p in plan["params"]]
        fanned = await self.repo.fan_out(
            task.id, execution, plan, runs, payload["parallel_runs"], self.jobs
        )
        if fanned is None:
            log.warning("task %s was taken over before its runs were queued", task.id)
        elif fanned.status == TaskStatus.CANCELED:
            log.info("task %s: canceled while it was being planned", task.id)
        else:
            cap = payload["parallel_runs"]
            log.info(
                "task %s: %d run(s) planned (%s), %s at a time",
                task.id,
                len(runs),
                plan["iteration"],
                "as many as there are free workers" if cap is None else cap,
            )

    async def _conclude(
        self,
        task: Task,
        execution: str,
        outcome: Outcome,
        stop: _Stop,
        *,
        completion: bool = False,
    ) -> None:
        """End the task by its child's outcome (the task's own job, or its completion)."""
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
        # a completion stays processing (its runs are out); the task's own job goes back to
        # pending
        requeue = repo.release if completion else repo.requeue
        if stop.reason == "shutdown":
            await requeue(task.id, execution, None)
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
        await requeue(task.id, execution, message, failed=True)
        raise RetryTask(f"task {task.id}: {message}; retrying in {delay:.0f}s", delay=delay)

    # ------------------------------------------------------------------ a run job
    async def _execute_run(
        self, context: JobContext, task_id: str, params_id: str, stop: _Stop
    ) -> None:
        assert context.job.id is not None
        job_id = int(context.job.id)
        execution = uuid.uuid4().hex
        started = await self.repo.start_run(
            task_id, params_id, job_id, execution, self.name, self.jobs
        )
        if started is None:
            log.info("task %s run %s: nothing to run", task_id, params_id)
            return
        task, row = started
        log.info("task %s run %s: training, attempt %d", task_id, params_id, row.attempts)
        if stop.reason is not None:
            outcome = Outcome("stopped", "before it started")
        else:
            try:
                spec = self._spec(task, kind="run", plan=task.plan, params_id=params_id)
            except ConfigurationError as exc:
                outcome = Outcome("error", str(exc))
            else:
                outcome = await self._child(spec, stop)
        await self._conclude_run(task, params_id, job_id, execution, row.failures, outcome, stop)

    async def _conclude_run(
        self,
        task: Task,
        params_id: str,
        job_id: int,
        execution: str,
        failures_before: int,
        outcome: Outcome,
        stop: _Stop,
    ) -> None:
        repo, settings, what = self.repo, self.settings, f"task {task.id} run {params_id}"
        log.info("%s: child ended %s (%s)", what, outcome.kind, outcome.payload)
        if outcome.kind == "ran" and outcome.payload.get("status") in _ENDED:
            ran = outcome.payload
            await repo.end_run(
                task.id,
                params_id,
                execution,
                RunEnd(
                    _ENDED[ran["status"]],
                    mlflow_status=ran["status"],
                    run_id=ran["run_id"],
                    metric=ran["metric"],
                    error=ran["error"],
                    trained=bool(ran["trained"]),
                ),
                self.jobs,
            )
            return
        if outcome.kind in ("error", "failed"):
            message = f"run {params_id}: {outcome.payload}"
            await repo.end_run(
                task.id, params_id, execution, RunEnd("queued", error=message), self.jobs
            )
            await repo.fail_task(task.id, message, self.jobs, keep=job_id)
            return
        if stop.reason in ("cancel", "shutdown"):
            await repo.end_run(task.id, params_id, execution, RunEnd("queued"), self.jobs)
            if stop.reason == "shutdown":
                raise RetryTask(f"{what}: the worker stopped; back in the queue")
            return
        # "retry", "crashed", "stopped" from outside, or a run left unfinished
        failures = failures_before + 1
        message = str(outcome.payload)
        end = RunEnd("queued", error=message, failure=True)
        await repo.end_run(task.id, params_id, execution, end, self.jobs)
        if failures >= settings.max_attempts:
            await repo.fail_task(
                task.id,
                f"run {params_id}: {message} (gave up after {failures} attempts)",
                self.jobs,
                keep=job_id,
            )
            return
        delay = settings.retry_wait_seconds * 2 ** (failures - 1)
        raise RetryTask(f"{what}: {message}; retrying in {delay:.0f}s", delay=delay)

    # ------------------------------------------------------------------ the completion job
    async def _execute_completion(self, context: JobContext, task_id: str, stop: _Stop) -> None:
        execution = uuid.uuid4().hex
        task = await self.repo.start_completion(task_id, execution, self.name, self.jobs)
        if task is None:
            log.info("task %s: no completion to run", task_id)
            return
        log.info("task %s: completing its iteration", task_id)
        if stop.reason is not None:
            outcome = Outcome("stopped", "before it started")
        else:
            outcomes = {r.params_id: (r.trained, r.error) for r in await self.repo.runs(task_id)}
            try:
                spec = self._spec(task, kind="complete", plan=task.plan, outcomes=outcomes)
            except ConfigurationError as exc:
                outcome = Outcome("error", str(exc))
            else:
                outcome = await self._child(spec, stop)
        await self._conclude(task, execution, outcome, stop, completion=True)

    # ------------------------------------------------------------------ maintenance
    async def retry_stalled_jobs(self, app: App) -> None:
        """Put the jobs of dead workers back in the queue: a task's own job (its task back
        to ``pending``), a run job (its run back to ``queued``) or a completion job (its task
        held by no execution); a task whose cancel was waiting for them is canceled."""
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
            if job.task_name == RUN_PARAMS:
                params_id = str(job.task_kwargs.get("params_id", ""))
                await self.repo.requeue_run(task_id, params_id, self.jobs)
                log.warning(
                    "task %s run %s: its worker stopped heartbeating; job %s is back in the "
                    "queue (the run resumes once the dead worker's lease expired)",
                    task_id,
                    params_id,
                    job.id,
                )
            elif job.task_name == COMPLETE:
                await self.repo.release(task_id, None, None)
                await self.repo.advance(task_id, self.jobs)
                log.warning(
                    "task %s: its completion's worker died; job %s requeued", task_id, job.id
                )
            else:
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
            if status == Status.TODO:
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
    preload(stores_to_preload(settings.resolved_tracking_uri, settings.resolved_artifact_uri))
    warming = asyncio.create_task(asyncio.to_thread(warm_up), name="forkserver warm-up")
    async with app.open_async():
        await ensure_schema(app)
        repo = TaskRepository(app.connector.pool)  # type: ignore[attr-defined]
        runtime = WorkerRuntime(settings, repo, registry, QueueJobs(app))
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
