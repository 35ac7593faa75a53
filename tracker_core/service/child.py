"""The child process that runs one task's iteration (:func:`child_main`).

Why a child process: the worker's heartbeat runs on its event loop, and training that holds
the GIL for longer than the stall threshold would make a live worker look dead; a child also
frees its GPU memory when it ends, and can be terminated for sure when a cancel's grace period
runs out.

Two pipes join it to its worker:

- *control* (worker -> child): ``"stop"`` asks the iteration to stop at its next safe point
  (between runs, or where the method calls :func:`tracker_core.finetune.check_stop`). End of
  file means the worker died (``kill -9``): the child exits at once, leaving its run
  unfinished, as the worker's own crash would have.
- *events* (child -> worker): ``("progress", {...})`` after every run, then exactly one of
  ``("done", result)``, ``("failed", message)`` (every run failed),
  ``("stopped", message)``, ``("retry", message)`` (the stores failed; worth another attempt)
  or ``("error", message)``.

The child ignores SIGINT (a Ctrl-C in the terminal reaches the whole process group; the worker
decides what happens) and turns SIGTERM into :class:`~tracker_core.finetune.IterationStopped`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from multiprocessing.connection import Connection
from typing import Any

import attrs

from tracker_core.leases import DEFAULT_LEASE_SECONDS

__all__ = ["ChildSpec", "child_main", "result_json"]

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
        "runs": len(result.runs),
        "trained_runs": len(result.trained_runs),
        "failed_runs": [
            {"run_id": r.run_id, "params": r.params.to_dict(), "error": r.error}
            for r in result.failed_runs
        ],
    }


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s %(levelname)s task {spec.task_id} %(name)s: %(message)s",
    )
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
        MaxAttemptsReachedException,
        ModelNotFoundError,
        NoModelToKeepError,
        TrackerError,
        TrackingStoreError,
        TransientError,
    )
    from tracker_core.finetune import IterationProgress, IterationStopped, run_iteration
    from tracker_core.methods import connect_kwargs
    from tracker_core.service.registry import load_spec

    retryable = (
        TrackingStoreError,
        ArtifactStoreError,
        TransientError,
        MaxAttemptsReachedException,
        ModelNotFoundError,
        IterationInUseError,
    )

    def progress(p: IterationProgress) -> None:
        events.send(
            ("progress", {"planned": p.planned, "finished": p.finished, "failed": p.failed})
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
            # runs held by other live workers are waited for inside (stoppable): a task
            # redelivered after a kill -9 resumes once the dead worker's lease expired
            result = run_iteration(
                method,
                manager,
                spec.batch_id,
                seed=spec.seed,
                work_dir=spec.work_dir,
                on_progress=progress,
                should_stop=ctl.stop.is_set,
            )
            return "done", result_json(result)
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
