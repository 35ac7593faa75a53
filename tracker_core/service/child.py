"""The child process that runs a worker's jobs (:func:`child_main`), one at a time.

It loads its method and opens its manager once, on the first job, then answers each job
(:mod:`tracker_core.service.protocol`) with one outcome: a :class:`~.protocol.TaskJob` with
:func:`~tracker_core.finetune.prepare_iteration` (and :func:`~tracker_core.finetune.run_prepared`
when at most one run can train at a time), a :class:`~.protocol.RunJob` with
:func:`~tracker_core.finetune.train_run`, a :class:`~.protocol.CompletionJob` with
:func:`~tracker_core.finetune.complete_iteration`. What an error becomes: an
:class:`~tracker_core.errors.IterationFailedError` is :class:`~.protocol.Failed`, one of
:data:`~tracker_core.errors.RETRYABLE_ERRORS` is :class:`~.protocol.Retry`, any other error
:class:`~.protocol.Error`. After an outcome that leaves it clean it waits for the worker's next
job (a warm child: no new process, no new connection, no second schema check); otherwise it
exits.

Why a child process: the worker's heartbeat runs on its event loop, and training that holds
the GIL for longer than the stall threshold would make a live worker look dead; a child also
frees its GPU memory when it ends, and can be terminated for sure when a cancel's grace period
runs out. It ignores SIGINT (a Ctrl-C in the terminal reaches the whole process group; the
worker decides what happens) and turns SIGTERM into
:class:`~tracker_core.finetune.IterationStopped`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from tracker_core.errors import redact
from tracker_core.service.logs import configure_child_logging
from tracker_core.service.protocol import (
    ChildSettings,
    CompletionJob,
    Done,
    Error,
    Failed,
    Job,
    Notice,
    Outcome,
    Planned,
    Progress,
    Ran,
    Release,
    Retry,
    RunJob,
    Stop,
    Stopped,
    TaskJob,
    keeps_child,
)

__all__ = ["child_main", "parallel_cap"]

log = logging.getLogger(__name__)

#: exit status of a child whose worker died
_ORPHANED = 70


def parallel_cap(task_cap: int | None, method_cap: int | None) -> int | None:
    """How many runs of a task may train at once: the smaller of the task's and the method's
    caps; None: no cap (as many as there are free workers)."""
    caps = [c for c in (task_cap, method_cap) if c is not None]
    return min(caps) if caps else None


def _one_line(exc: BaseException) -> str:
    """How the task's ``error`` says what went wrong: one line, no URI's password in it."""
    text = redact(" ".join(str(exc).split()))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _redacted(text: str | None) -> str | None:
    return None if text is None else redact(text)


def _relay(events: Connection) -> Callable[[str], None]:
    """Hands a say-once notice to the worker (a small message is one atomic pipe write)."""

    def relay(message: str) -> None:
        with contextlib.suppress(OSError):
            events.send(Notice(message))

    return relay


class _Control:
    """Reads the control pipe in a daemon thread: :class:`Stop` sets ``stop``; jobs and
    :class:`Release` wait in ``inbox`` for the main thread; the worker gone ends the process."""

    def __init__(self, conn: Connection) -> None:
        self.stop = threading.Event()
        self.inbox: queue.SimpleQueue[Job | Release] = queue.SimpleQueue()
        self._conn = conn
        threading.Thread(target=self._loop, name="tracker-core-control", daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                # the worker died: leave the run as its crash would (unfinished), now
                os._exit(_ORPHANED)
            match message:
                case Stop():
                    self.stop.set()
                case TaskJob() | RunJob() | CompletionJob() | Release():
                    self.inbox.put(message)

    def next_job(self) -> Job | None:
        """The worker's next job for this child; None when it lets the child go."""
        message = self.inbox.get()
        if isinstance(message, Release):
            return None
        self.stop.clear()
        return message


def child_main(settings: ChildSettings, job: Job, control: Connection, events: Connection) -> None:
    """Entry point of the child process (``multiprocessing`` target): ``job``, then whatever
    the worker sends next, until an outcome that does not keep the child or a release."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctl = _Control(control)

    from tracker_core.finetune import IterationStopped

    def on_term(_sig: int, _frame: object) -> None:
        ctl.stop.set()
        raise IterationStopped("terminated by the worker")

    signal.signal(signal.SIGTERM, on_term)
    session = _Session(settings)
    current: Job | None = job
    try:
        while current is not None:
            # who started the iteration, for its lineage record and promotion decision (a
            # warm child's next job may be another task's)
            os.environ["TRACKER_CORE_TASK_ID"] = current.task_id
            configure_child_logging(
                settings.log_level, f"{current.kind} {current.label}", _relay(events)
            )
            outcome = session.answer(current, ctl, events)
            try:
                events.send(outcome)
            except (BrokenPipeError, OSError):
                os._exit(_ORPHANED)
            if not keeps_child(outcome) or ctl.stop.is_set():
                break
            _free_memory()
            current = ctl.next_job()
    except IterationStopped:  # SIGTERM while idle: nothing to stop
        pass
    finally:
        session.close()
        events.close()


def _free_memory() -> None:
    """Between jobs, on a GPU: free what the last job left (its tensors in reference cycles,
    then the CUDA cache), so another process can have it. A full collection costs a fraction
    of a second with torch and MLflow loaded, so without a GPU it is left to Python."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


class _Session:
    """The child's method and manager, loaded and opened on first use, kept for its next jobs."""

    def __init__(self, settings: ChildSettings) -> None:
        self.settings = settings
        self._method: Any = None
        self._stack = contextlib.ExitStack()
        self._manager: Any = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()

    def _open(self) -> tuple[Any, Any]:
        from tracker_core.connect import connect
        from tracker_core.methods import connect_kwargs
        from tracker_core.service.registry import load_spec

        s = self.settings
        if self._method is None:
            self._method = load_spec(s.method_spec)
        if self._manager is None:
            self._manager = self._stack.enter_context(
                connect(
                    s.artifact_uri,
                    tracking_uri=s.tracking_uri,
                    lease_seconds=s.lease_seconds,
                    **connect_kwargs(self._method),
                )
            )
        return self._method, self._manager

    def answer(self, job: Job, ctl: _Control, events: Connection) -> Outcome:
        """Run one job; how it ended (never raises: the worker must always hear it)."""
        from tracker_core.errors import RETRYABLE_ERRORS, IterationFailedError, TrackerError
        from tracker_core.finetune import IterationStopped

        try:
            try:
                method, manager = self._open()
            except TrackerError as exc:
                if self._method is None:
                    what = f"cannot load fine-tuning method {self.settings.method!r}"
                    return Error(f"{what}: {_one_line(exc)}")
                raise
            match job:
                case TaskJob():
                    return _plan(self.settings, job, method, manager, ctl, events)
                case RunJob():
                    return _train(self.settings, job, method, manager, ctl)
                case CompletionJob():
                    return _complete(job, method, manager)
        except IterationStopped as exc:
            return Stopped(str(exc))
        except IterationFailedError as exc:
            return Failed(_one_line(exc))
        except RETRYABLE_ERRORS as exc:
            return Retry(_one_line(exc))
        except BaseException as exc:  # an error of ours or not: said in one line, the child ends
            return Error(_one_line(exc))


def _plan(
    settings: ChildSettings,
    job: TaskJob,
    method: Any,
    manager: Any,
    ctl: _Control,
    events: Connection,
) -> Outcome:
    """The task's own job: plan the iteration; run it here or hand the plan back."""
    from tracker_core.finetune import (
        IterationProgress,
        IterationStopped,
        prepare_iteration,
        run_prepared,
    )

    def progress(p: IterationProgress) -> None:
        running = 0 if p.finished >= p.planned else 1
        events.send(
            Progress(
                planned=p.planned,
                queued=p.planned - p.finished - running,
                running=running,
                finished=p.finished - p.failed - p.pruned,
                failed=p.failed,
                pruned=p.pruned,
            )
        )

    plan = prepare_iteration(
        method,
        manager,
        job.batch_id,
        seed=settings.seed,
        proposal=job.proposal,
        max_runs=job.max_runs,
    )
    if ctl.stop.is_set():
        manager.finish_iteration()
        raise IterationStopped("stopped after planning the iteration")
    cap = parallel_cap(job.max_parallel_runs, method.max_parallel_runs)
    if (cap is not None and cap <= 1) or len(plan.unfinished) <= 1:
        # one run at a time: the rest of the iteration here, as run_iteration does
        result = run_prepared(
            method,
            manager,
            plan,
            work_dir=settings.work_dir,
            on_progress=progress,
            should_stop=ctl.stop.is_set,
        )
        return Done(result.to_json())
    manager.finish_iteration()
    return Planned(plan.to_json(), cap)


def _train(
    settings: ChildSettings, job: RunJob, method: Any, manager: Any, ctl: _Control
) -> Outcome:
    """One run job: steps 4-6 (and 8) for one params set."""
    from tracker_core.finetune import IterationPlan, train_run

    plan = IterationPlan.from_json(job.plan, method.params_type)
    run = train_run(
        method,
        manager,
        plan,
        plan.params_by_id(job.params_id),
        work_dir=settings.work_dir,
        should_stop=ctl.stop.is_set,
    )
    return Ran(run.run_id, run.status, run.metric, run.trained, _redacted(run.error), run.has_model)


def _complete(job: CompletionJob, method: Any, manager: Any) -> Outcome:
    """The completion job: step 7."""
    from tracker_core.finetune import IterationPlan, complete_iteration

    plan = IterationPlan.from_json(job.plan, method.params_type)
    outcomes = {k: (bool(v[0]), v[1]) for k, v in job.outcomes.items()}
    return Done(complete_iteration(method, manager, plan, outcomes).to_json())
