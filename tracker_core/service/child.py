"""The child process that runs one job of a task (:func:`child_main`): by ``ChildSpec.kind``,

- ``task``: the task's own job: seed steps 1-3 (:func:`~tracker_core.finetune.prepare_iteration`);
  then, when at most one run can be trained at a time (the task's or the method's
  ``max_parallel_runs`` is 1, or one run is left), steps 4-8 and 7 right here, as
  :func:`~tracker_core.finetune.run_iteration` does; otherwise it ends with ``("planned",
  {"plan", "parallel_runs"})`` and the worker defers one job per run;
- ``run``: one run job, steps 4-6 and 8 for one params set
  (:func:`~tracker_core.finetune.train_run`), ending with ``("ran", {run_id, status, metric,
  trained, error, has_model})``;
- ``complete``: the completion job, step 7 (:func:`~tracker_core.finetune.complete_iteration`).

Why a child process: the worker's heartbeat runs on its event loop, and training that holds
the GIL for longer than the stall threshold would make a live worker look dead; a child also
frees its GPU memory when it ends, and can be terminated for sure when a cancel's grace period
runs out.

Two pipes join it to its worker:

- *control* (worker -> child): ``"stop"`` asks the iteration to stop at its next safe point
  (between runs, or where the method calls :func:`tracker_core.finetune.check_stop`). End of
  file means the worker died (``kill -9``): the child exits at once, leaving its run
  unfinished, as the worker's own crash would have.
- *events* (child -> worker): ``("progress", {...})`` after every run (``task`` only) and
  ``("notice", line)`` for a log line to say once per worker
  (:data:`tracker_core.service.logs.ONCE`), then exactly one of ``("done", result)``,
  ``("failed", message)`` (every run failed), ``("planned", ...)``, ``("ran", ...)``,
  ``("stopped", message)``, ``("retry", message)`` (the stores failed; worth another attempt)
  or ``("error", message)`` (every message passed through :func:`tracker_core.errors.redact`).

The child ignores SIGINT (a Ctrl-C in the terminal reaches the whole process group; the worker
decides what happens) and turns SIGTERM into :class:`~tracker_core.finetune.IterationStopped`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from multiprocessing.connection import Connection
from typing import Any

import attrs

from tracker_core.errors import redact
from tracker_core.leases import DEFAULT_LEASE_SECONDS
from tracker_core.service.logs import configure_child_logging

__all__ = ["ChildSpec", "child_main", "parallel_cap", "result_json"]

log = logging.getLogger(__name__)

#: exit status of a child whose worker died
_ORPHANED = 70


@attrs.frozen
class ChildSpec:
    """Everything the child needs (picklable)."""

    task_id: str
    method: str
    #: what load_method takes: an entry-point name or module:attr
    method_spec: str
    batch_id: str
    tracking_uri: str
    artifact_uri: str
    seed: int = 0
    work_dir: str | None = None
    log_level: int = logging.WARNING
    #: the managers' run lease (a dead worker's run resumes this long after it died)
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    #: ``task``, ``run`` or ``complete`` (see the module docstring)
    kind: str = "task"
    #: the task's own cap of parallel runs (None: as many as there are free workers)
    max_parallel_runs: int | None = None
    #: ``task``: the task's proposal policy and budget (None: the method's)
    proposal: str | None = None
    max_runs: int | None = None
    #: ``run`` and ``complete``: the iteration's plan (IterationPlan.to_json())
    plan: dict[str, Any] | None = None
    #: ``run``: the params set to train
    params_id: str | None = None
    #: ``complete``: {params id: (trained, error)} as the run jobs reported them
    outcomes: dict[str, tuple[bool, str | None]] | None = None

    @property
    def label(self) -> str:
        return self.task_id if self.params_id is None else f"{self.task_id}/{self.params_id}"


def parallel_cap(task_cap: int | None, method_cap: int | None) -> int | None:
    """How many runs of a task may train at once: the smaller of the task's and the method's
    caps; None: no cap (as many as there are free workers)."""
    caps = [c for c in (task_cap, method_cap) if c is not None]
    return min(caps) if caps else None


def result_json(result: Any) -> dict[str, Any]:
    """The task's ``result`` from an :class:`~tracker_core.finetune.IterationResult`."""
    return {
        "experiment_id": result.experiment_id,
        "iteration": result.iteration_name,
        "best_run_id": result.best_run_id,
        "best_metric": result.best_metric,
        "best_model_uri": result.best_model_uri,
        "main_metric": result.main_metric,
        "is_loss": result.is_loss,
        "resumed": result.resumed,
        "started_from_run_id": result.start_run_id,
        "deleted_iteration_id": result.deleted_iteration_id,
        # the holdout gate's decision (a method with evaluate_holdout): both scores, outcome
        "promotion": result.promotion.to_json() if result.promotion is not None else None,
        "runs": len(result.runs),
        "trained_runs": len(result.trained_runs),
        "failed_runs": [
            {"run_id": r.run_id, "params": r.params.to_dict(), "error": _redacted(r.error)}
            for r in result.failed_runs
        ],
        "pruned_runs": [
            {"run_id": r.run_id, "params": r.params.to_dict()} for r in result.pruned_runs
        ],
    }


def _one_line(exc: BaseException) -> str:
    """How the task's ``error`` says what went wrong: one line, no URI's password in it."""
    text = redact(" ".join(str(exc).split()))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _redacted(text: str | None) -> str | None:
    return None if text is None else redact(text)


def _relay(events: Connection) -> Any:
    """Hands a say-once notice to the worker (a small message is one atomic pipe write)."""

    def relay(message: str) -> None:
        with contextlib.suppress(OSError):
            events.send(("notice", message))

    return relay


class _Control:
    """Reads the control pipe in a daemon thread: sets ``stop`` on "stop", exits the process
    when the worker is gone."""

    def __init__(self, conn: Connection) -> None:
        self.stop = threading.Event()
        self._conn = conn
        threading.Thread(target=self._loop, name="tracker-core-control", daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                # the worker died: leave the run as its crash would (unfinished), now
                os._exit(_ORPHANED)
            if message == "stop":
                self.stop.set()


def child_main(spec: ChildSpec, control: Connection, events: Connection) -> None:
    """Entry point of the child process (``multiprocessing`` spawn target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # who started the iteration, for its lineage record and promotion decision (this
    # process runs one job of one task)
    os.environ["TRACKER_CORE_TASK_ID"] = spec.task_id
    configure_child_logging(spec.log_level, f"{spec.kind} {spec.label}", _relay(events))
    ctl = _Control(control)

    from tracker_core.finetune import IterationStopped

    def on_term(_sig: int, _frame: object) -> None:
        ctl.stop.set()
        raise IterationStopped("terminated by the worker")

    signal.signal(signal.SIGTERM, on_term)
    try:
        kind, payload = _run(spec, ctl, events)
    except IterationStopped as exc:
        kind, payload = "stopped", str(exc)
    except BaseException as exc:  # the worker must always hear how it ended
        kind, payload = "error", _one_line(exc)
    try:
        events.send((kind, payload))
    except (BrokenPipeError, OSError):
        os._exit(_ORPHANED)
    finally:
        events.close()


def _run(spec: ChildSpec, ctl: _Control, events: Connection) -> tuple[str, Any]:
    from tracker_core.connect import connect
    from tracker_core.errors import (
        ArtifactStoreError,
        CleanupRefusedError,
        IterationFailedError,
        IterationInUseError,
        LeaseLostError,
        MaxAttemptsReachedException,
        ModelNotFoundError,
        NoModelToKeepError,
        TrackerError,
        TrackingStoreError,
        TransientError,
    )
    from tracker_core.finetune import IterationStopped
    from tracker_core.methods import connect_kwargs
    from tracker_core.service.registry import load_spec

    # worth another attempt: store failures past their own retries, and a run lease that
    # could not be renewed in time (the next attempt takes the run again, or finds it ended)
    retryable = (
        TrackingStoreError,
        ArtifactStoreError,
        TransientError,
        MaxAttemptsReachedException,
        ModelNotFoundError,
        IterationInUseError,
        LeaseLostError,
    )
    try:
        method = load_spec(spec.method_spec)
    except TrackerError as exc:
        return "error", f"cannot load fine-tuning method {spec.method!r}: {_one_line(exc)}"
    try:
        with connect(
            spec.artifact_uri,
            tracking_uri=spec.tracking_uri,
            lease_seconds=spec.lease_seconds,
            **connect_kwargs(method),
        ) as manager:
            if spec.kind == "run":
                return _train(spec, method, manager, ctl)
            if spec.kind == "complete":
                return _complete(spec, method, manager)
            return _task(spec, method, manager, ctl, events)
    except IterationStopped:
        raise
    except IterationFailedError as exc:
        return "failed", _one_line(exc)
    except NoModelToKeepError as exc:
        return "error", _one_line(exc)
    except CleanupRefusedError as exc:
        return ("retry" if isinstance(exc, IterationInUseError) else "error"), _one_line(exc)
    except retryable as exc:
        return "retry", _one_line(exc)
    except TrackerError as exc:
        return "error", _one_line(exc)


def _task(
    spec: ChildSpec, method: Any, manager: Any, ctl: _Control, events: Connection
) -> tuple[str, Any]:
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
            (
                "progress",
                {
                    "planned": p.planned,
                    "queued": p.planned - p.finished - running,
                    "running": running,
                    "finished": p.finished - p.failed - p.pruned,
                    "failed": p.failed,
                    "pruned": p.pruned,
                },
            )
        )

    plan = prepare_iteration(
        method,
        manager,
        spec.batch_id,
        seed=spec.seed,
        proposal=spec.proposal,
        max_runs=spec.max_runs,
    )
    if ctl.stop.is_set():
        manager.finish_iteration()
        raise IterationStopped("stopped after planning the iteration")
    cap = parallel_cap(spec.max_parallel_runs, method.max_parallel_runs)
    if (cap is not None and cap <= 1) or len(plan.unfinished) <= 1:
        # one run at a time: the rest of the iteration here, as run_iteration does;
        # runs held by other live workers are waited for inside (stoppably): a task
        # redelivered after a kill -9 resumes once the dead worker's lease expired
        result = run_prepared(
            method,
            manager,
            plan,
            work_dir=spec.work_dir,
            on_progress=progress,
            should_stop=ctl.stop.is_set,
        )
        return "done", result_json(result)
    manager.finish_iteration()
    return "planned", {"plan": plan.to_json(), "parallel_runs": cap}


def _train(spec: ChildSpec, method: Any, manager: Any, ctl: _Control) -> tuple[str, Any]:
    """One run job: steps 4-6 (and 8) for one params set."""
    from tracker_core.finetune import IterationPlan, train_run

    assert spec.plan is not None and spec.params_id is not None
    plan = IterationPlan.from_json(spec.plan, method.params_type)
    run = train_run(
        method,
        manager,
        plan,
        plan.params_by_id(spec.params_id),
        work_dir=spec.work_dir,
        should_stop=ctl.stop.is_set,
    )
    return "ran", {
        "run_id": run.run_id,
        "status": run.status.value,
        "metric": run.metric,
        "trained": run.trained,
        "error": _redacted(run.error),
        "has_model": run.has_model,
    }


def _complete(spec: ChildSpec, method: Any, manager: Any) -> tuple[str, Any]:
    """The completion job: step 7."""
    from tracker_core.finetune import IterationPlan, complete_iteration

    assert spec.plan is not None
    plan = IterationPlan.from_json(spec.plan, method.params_type)
    outcomes = {k: (bool(v[0]), v[1]) for k, v in (spec.outcomes or {}).items()}
    return "done", result_json(complete_iteration(method, manager, plan, outcomes))
