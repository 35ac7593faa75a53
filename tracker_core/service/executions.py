"""One execution of each kind of job, from its child process to how its task or run ends.

:class:`JobExecutions` is the part of :class:`~tracker_core.service.worker.WorkerRuntime` that
runs a job once its stop requests are wired (:class:`_Stop`): the task's own job
(:meth:`~JobExecutions._execute`: start the task, plan the iteration in a child, then fan its
runs out or end the task), a run job (:meth:`~JobExecutions._execute_run`) and the completion
job (:meth:`~JobExecutions._execute_completion`). Each ends by its child's outcome as the
:mod:`tracker_core.service.worker` docstring lists: done, error, canceled, back in the queue,
or retried with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from procrastinate import JobContext

from tracker_core.errors import ConfigurationError
from tracker_core.service.child import ChildSpec
from tracker_core.service.models import Task, TaskStatus
from tracker_core.service.queue import QueueJobs, RetryTask
from tracker_core.service.registry import MethodRegistry
from tracker_core.service.repository import PlannedRun, RunEnd, TaskRepository
from tracker_core.service.settings import ServiceSettings
from tracker_core.service.supervisor import ChildProcess, Outcome

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


class JobExecutions:
    """What the jobs of one worker process share (settings, the task table, the methods,
    the queue), and how each kind of job runs in a child and ends (the base of
    :class:`~tracker_core.service.worker.WorkerRuntime`)."""

    def __init__(
        self,
        settings: ServiceSettings,
        repo: TaskRepository,
        registry: MethodRegistry,
        jobs: QueueJobs,
    ) -> None:
        self.settings, self.repo, self.registry, self.jobs = settings, repo, registry, jobs
        self.name = f"{socket.gethostname()}:{os.getpid()}"

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
            proposal=task.proposal,
            max_runs=task.max_runs,
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
