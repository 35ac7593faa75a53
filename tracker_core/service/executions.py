"""The life of a task's jobs: what each kind of job does in its child, and how it ends.

A task becomes jobs on the task queue (:mod:`tracker_core.service.queue` has their locks):

1. **The task's own job** (:meth:`JobExecutions.task`) moves the task to ``processing`` and
   has its child plan the iteration (seed steps 1-3, a :class:`~.protocol.TaskJob`). When at
   most one run can train at a time (the task's or the method's ``max_parallel_runs`` is 1, or
   one run is left), the same child trains the runs in order and completes the iteration, as
   :func:`~tracker_core.finetune.run_iteration` does (:class:`~.protocol.Done`). Otherwise the
   child hands the plan back (:class:`~.protocol.Planned`) and the job *fans out*: one run row
   per params set and the first run jobs (at most ``parallel_runs`` out at a time), in the
   transaction that records the plan; no execution holds the task any more.
2. **A run job** (:meth:`JobExecutions.run`) trains one params set (steps 4-6 and 8, a
   :class:`~.protocol.RunJob`); its end (:class:`~.protocol.Ran`) is recorded in the
   transaction that defers the next queued run, or the completion job once every run ended.
3. **The completion job** (:meth:`JobExecutions.completion`) finishes the iteration (step 7,
   a :class:`~.protocol.CompletionJob`) and ends the task.

How a job ends, by its child's outcome (:data:`~.protocol.Outcome`) and its stop request
(:class:`~.protocol.StopReason`):

- :class:`~.protocol.Done` -> the task ``done`` with the result; :class:`~.protocol.Failed`
  (every run failed) or :class:`~.protocol.Error` -> ``error`` with the message (a run job's
  error ends its whole task ``error``, its other jobs stopped); :class:`~.protocol.Ran` -> the
  run ``finished`` or ``failed``;
- :class:`~.protocol.Retry` (a store failure past the stores' own retries), a child that died
  (:class:`~.protocol.Crashed`) or one stopped from outside -> retried after
  ``retry_wait_seconds * 2**(n-1)``, ``error`` after ``max_attempts`` such failures (of the
  task's own job or its completion, or of one run: the task then ends ``error``);
- a cancel -> the child is asked to stop at its next safe point, terminated after
  ``cancel_grace_seconds``; the task ends ``canceled`` once none of its jobs is running (the
  unfinished runs are left as a crash leaves them; no completion runs);
- the worker stopping (Ctrl-C, SIGTERM) -> the same stop, within ``shutdown_grace_seconds``;
  the job goes back to the queue, to resume on any worker (a task not yet fanned out goes
  back to ``pending``, a run back to ``queued``);
- another execution took the task over (:attr:`~.protocol.StopReason.LOST`) -> the child
  stops and nothing more is written;
- the worker killed (``kill -9``): its children exit (their control pipe closes), its heartbeat
  stops, and after ``stall_seconds`` another worker's maintenance puts its jobs back
  (:meth:`~tracker_core.service.worker.WorkerRuntime.retry_stalled_jobs`); a run resumes once
  the dead worker's run lease expired.

A child whose job ended clean stays for the next job of the same method and stores
(:class:`~tracker_core.service.supervisor.WarmChildren`). How a worker rides out an outage of
its database is in :mod:`tracker_core.service.worker`.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import assert_never

from procrastinate import JobContext

from tracker_core.errors import ConfigurationError
from tracker_core.service.models import RunState, Task, TaskStatus
from tracker_core.service.protocol import (
    ChildSettings,
    CompletionJob,
    Crashed,
    Done,
    Error,
    Failed,
    Job,
    Outcome,
    Planned,
    Progress,
    Ran,
    Retry,
    RunJob,
    Stopped,
    StopReason,
    TaskJob,
)
from tracker_core.service.queue import QueueJobs, RetryTask
from tracker_core.service.registry import MethodRegistry
from tracker_core.service.repository import PlannedRun, RunEnd, StartReason, TaskRepository
from tracker_core.service.settings import ServiceSettings
from tracker_core.service.supervisor import ChildProcess, WarmChildren

__all__ = ["JobExecutions", "JobStop"]

log = logging.getLogger(__name__)

_NOT_STARTED = Stopped("before it started")


class JobStop:
    """A stop request for one job, forwarded to its child once the child exists; a stronger
    reason (:class:`~.protocol.StopReason`) wins, and a shorter grace."""

    def __init__(self) -> None:
        self.reason: StopReason | None = None
        self.grace: float | None = None
        self.child: ChildProcess | None = None

    def request(self, reason: StopReason, grace: float) -> None:
        if self.reason is None or reason.value > self.reason.value:
            self.reason = reason
        self.grace = grace if self.grace is None else min(self.grace, grace)
        if self.child is not None:
            self.child.request_stop(self.reason, self.grace)

    def attach(self, child: ChildProcess) -> None:
        self.child = child
        if self.reason is not None and self.grace is not None:
            child.request_stop(self.reason, self.grace)


async def _no_progress(_progress: Progress) -> None:
    return None


class JobExecutions:
    """How each kind of job of one worker process runs in a child and ends (see the module
    docstring): its settings, the task table, the methods, the queue and its warm children."""

    def __init__(
        self,
        settings: ServiceSettings,
        repo: TaskRepository,
        registry: MethodRegistry,
        jobs: QueueJobs,
        children: WarmChildren,
    ) -> None:
        self.settings, self.repo, self.registry, self.jobs = settings, repo, registry, jobs
        self.children = children
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def _child_settings(self, task: Task) -> ChildSettings:
        s = self.settings
        return ChildSettings(
            method=task.fine_tuning_method,
            method_spec=self.registry.spec(task.fine_tuning_method),
            tracking_uri=s.resolved_tracking_uri,
            artifact_uri=s.resolved_artifact_uri,
            seed=s.seed,
            work_dir=None if s.work_dir is None else str(s.work_dir),
            log_level=logging.getLogger("tracker_core").getEffectiveLevel(),
            lease_seconds=s.lease_seconds,
        )

    async def _in_child(
        self,
        task: Task,
        job: Job,
        stop: JobStop,
        on_progress: Callable[[Progress], Awaitable[None]] = _no_progress,
    ) -> Outcome:
        """Run ``job`` in a child (a warm one if there is one) and wait for its outcome."""
        if stop.reason is not None:
            return _NOT_STARTED
        try:
            settings = self._child_settings(task)
        except ConfigurationError as exc:
            return Error(str(exc))
        child = await self.children.start(settings, job)
        stop.attach(child)
        outcome = await child.wait(on_progress)
        self.children.done(child)
        return outcome

    # ------------------------------------------------------------------ the task's own job
    async def task(self, context: JobContext, task_id: str, stop: JobStop) -> None:
        execution = uuid.uuid4().hex
        started = await self.repo.tasks.start(task_id, execution, self.name)
        match started.reason:
            case StartReason.WAITING:
                # another task of this iteration has its runs out: wait for it in the queue
                log.info("task %s waits for task %s of its iteration", task_id, started.holder)
                raise RetryTask(
                    f"task {task_id}: task {started.holder} holds the iteration",
                    delay=max(1.0, self.settings.poll_seconds),
                )
            case StartReason.UNKNOWN:
                log.warning("job %s names an unknown task %s; dropped", context.job.id, task_id)
                return
            case StartReason.ENDED | StartReason.CANCELED | StartReason.FANNED_OUT:
                log.info("task %s: nothing to run (%s)", task_id, started.reason.value)
                return
            case StartReason.STARTED:
                assert started.task is not None
                task = started.task
            case _:
                assert_never(started.reason)
        log.info(
            "task %s (%s, batch %s) processing, attempt %d",
            task.id,
            task.fine_tuning_method,
            task.batch_id,
            task.attempts,
        )

        async def on_progress(progress: Progress) -> None:
            if not await self.repo.tasks.progress(task.id, execution, progress.to_json()):
                # another execution holds the task now: stop, and write nothing more
                log.warning("task %s was taken over; stopping this execution", task.id)
                stop.request(StopReason.LOST, self.settings.shutdown_grace_seconds)

        job = TaskJob(
            task.id,
            task.batch_id,
            max_parallel_runs=task.max_parallel_runs,
            proposal=task.proposal,
            max_runs=task.max_runs,
        )
        outcome = await self._in_child(task, job, stop, on_progress)
        if isinstance(outcome, Planned) and stop.reason != StopReason.LOST:
            await self._fan_out(task, execution, outcome)
            return
        await self._conclude(task, execution, outcome, stop)

    async def _fan_out(self, task: Task, execution: str, planned: Planned) -> None:
        plan = planned.plan
        runs = [PlannedRun(p["id"], plan["ended"].get(p["id"])) for p in plan["params"]]
        fanned = await self.repo.runs.fan_out(
            task.id, execution, plan, runs, planned.parallel_runs, self.jobs
        )
        if fanned is None:
            log.warning("task %s was taken over before its runs were queued", task.id)
        elif fanned.status == TaskStatus.CANCELED:
            log.info("task %s: canceled while it was being planned", task.id)
        else:
            cap = planned.parallel_runs
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
        stop: JobStop,
        *,
        completion: bool = False,
    ) -> None:
        """End the task by its child's outcome (the task's own job, or its completion)."""
        tasks, settings = self.repo.tasks, self.settings
        log.info("task %s: child ended %s", task.id, outcome)
        if stop.reason == StopReason.LOST:
            return
        match outcome:
            case Done(result):
                await tasks.finish(task.id, execution, TaskStatus.DONE, result=result)
                return
            case Failed(message) | Error(message):
                await tasks.finish(task.id, execution, TaskStatus.ERROR, error=message)
                return
            case Planned() | Ran():  # never the answer to these jobs
                message = f"unexpected answer {type(outcome).__name__}"
                await tasks.finish(task.id, execution, TaskStatus.ERROR, error=message)
                return
            case Retry(message) | Crashed(message) | Stopped(message):
                pass
            case _:
                assert_never(outcome)
        if stop.reason == StopReason.CANCEL:
            await tasks.finish(task.id, execution, TaskStatus.CANCELED)
            return
        # a completion stays processing (its runs are out); the task's own job goes back to
        # pending
        requeue = self.repo.runs.release if completion else tasks.requeue
        if stop.reason == StopReason.SHUTDOWN:
            await requeue(task.id, execution, None)
            raise RetryTask(f"task {task.id}: the worker stopped; back in the queue")
        # retry, crashed, or a child stopped from outside: another attempt, with backoff
        failures = await tasks.failures(task.id) + 1
        if failures >= settings.max_attempts:
            await tasks.finish(
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
    async def run(self, context: JobContext, task_id: str, params_id: str, stop: JobStop) -> None:
        assert context.job.id is not None
        job_id = int(context.job.id)
        execution = uuid.uuid4().hex
        started = await self.repo.runs.start_run(
            task_id, params_id, job_id, execution, self.name, self.jobs
        )
        if started is None:
            log.info("task %s run %s: nothing to run", task_id, params_id)
            return
        task, row = started
        log.info("task %s run %s: training, attempt %d", task_id, params_id, row.attempts)
        assert task.plan is not None
        outcome = await self._in_child(task, RunJob(task.id, task.plan, params_id), stop)
        await self._conclude_run(task, params_id, job_id, execution, row.failures, outcome, stop)

    async def _conclude_run(
        self,
        task: Task,
        params_id: str,
        job_id: int,
        execution: str,
        failures_before: int,
        outcome: Outcome,
        stop: JobStop,
    ) -> None:
        runs, what = self.repo.runs, f"task {task.id} run {params_id}"
        log.info("%s: child ended %s", what, outcome)
        match outcome:
            case Ran(status=status) if status.is_terminal:
                end = RunEnd(
                    RunState.ended_as(status),
                    mlflow_status=status,
                    run_id=outcome.run_id,
                    metric=outcome.metric,
                    error=outcome.error,
                    trained=outcome.trained,
                )
                await runs.end_run(task.id, params_id, execution, end, self.jobs)
                return
            case Error(message) | Failed(message):
                await self._fail_run(task, params_id, job_id, execution, message)
                return
            case Done() | Planned():  # never the answer to a run job
                message = f"unexpected answer {type(outcome).__name__}"
                await self._fail_run(task, params_id, job_id, execution, message)
                return
            case Ran() | Retry() | Crashed() | Stopped():
                pass
            case _:
                assert_never(outcome)
        if stop.reason in (StopReason.CANCEL, StopReason.SHUTDOWN):
            await runs.end_run(task.id, params_id, execution, RunEnd(RunState.QUEUED), self.jobs)
            if stop.reason == StopReason.SHUTDOWN:
                raise RetryTask(f"{what}: the worker stopped; back in the queue")
            return
        # retry, crashed, stopped from outside, or a run left unfinished
        failures = failures_before + 1
        message = (
            f"the run was left {outcome.status}" if isinstance(outcome, Ran) else outcome.message
        )
        end = RunEnd(RunState.QUEUED, error=message, failure=True)
        await runs.end_run(task.id, params_id, execution, end, self.jobs)
        if failures >= self.settings.max_attempts:
            await runs.fail_task(
                task.id,
                f"run {params_id}: {message} (gave up after {failures} attempts)",
                self.jobs,
                keep=job_id,
            )
            return
        delay = self.settings.retry_wait_seconds * 2 ** (failures - 1)
        raise RetryTask(f"{what}: {message}; retrying in {delay:.0f}s", delay=delay)

    async def _fail_run(
        self, task: Task, params_id: str, job_id: int, execution: str, message: str
    ) -> None:
        """A run job that cannot succeed: its run waits again, its task ends ``error``."""
        message = f"run {params_id}: {message}"
        end = RunEnd(RunState.QUEUED, error=message)
        await self.repo.runs.end_run(task.id, params_id, execution, end, self.jobs)
        await self.repo.runs.fail_task(task.id, message, self.jobs, keep=job_id)

    # ------------------------------------------------------------------ the completion job
    async def completion(self, context: JobContext, task_id: str, stop: JobStop) -> None:
        execution = uuid.uuid4().hex
        task = await self.repo.runs.start_completion(task_id, execution, self.name, self.jobs)
        if task is None:
            log.info("task %s: no completion to run", task_id)
            return
        log.info("task %s: completing its iteration", task_id)
        assert task.plan is not None
        outcomes = {r.params_id: (r.trained, r.error) for r in await self.repo.runs.runs(task_id)}
        job = CompletionJob(task.id, task.plan, outcomes)
        outcome = await self._in_child(task, job, stop)
        await self._conclude(task, execution, outcome, stop, completion=True)
