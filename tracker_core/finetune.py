"""The fine-tuning process: one iteration of a method, steps 1-8 of ``seeds/run-fine-tuning.md``.

:func:`run_iteration` does, in order:

1. **Initial model setup**: upload the method's initial model if none was uploaded yet; pick
   the model to start from (the best model of the newest iteration holding one, else the initial
   model) and download it to a local working copy.
2. **Hyper-parameter selection**: the previous iteration's top-N params, else the method's
   initial sets.
3. **Iteration creation**: ``FineTuningIteration(plugin, batch_id, run_id=<start run>)``.
4.-6. **Runs**: for each params set, start or resume its run (a run that finished in an
   earlier attempt is skipped), train a fresh copy of the starting model, evaluate and log
   the main metric, save the model if it is among the best, finish the run. A run whose
   method raises is FAILED and does not count.
7. **Iteration completion**: finish the iteration and delete the iteration it started from
   (its models included); while live workers still hold runs of that iteration its deletion
   is deferred to a later completion. The initial model is never deleted.
8. **Model cleanup**: the local working copy (and every temporary file) is removed, on every
   path, success or failure.

An iteration is identified by its plugin and ``batch_id``: calling :func:`run_iteration` again
with the same batch resumes the newest iteration of that batch (finished runs are skipped, an
unfinished one restarts), and is a no-op that returns the same result once it is complete.

Progress and stopping (for a supervisor such as the task service):

- ``on_progress`` is called with an :class:`IterationProgress` once the params sets are known
  and after every run (trained, failed or skipped);
- ``should_stop`` is polled before every run; when it returns True the driver raises
  :class:`IterationStopped` there. A method can stop sooner from inside ``train`` by calling
  :func:`check_stop` (or testing :func:`stop_requested`) at its own safe points. Either way
  the current run is left unfinished, exactly as after a crash, so calling
  :func:`run_iteration` again with the same batch resumes it.

Failure semantics:

- an exception from the method (``train``/``evaluate``, or a non-finite metric) fails that run
  only (FAILED, with the error logged and reported in the result);
- a failure of the stores (tracking or artifact side, after retries) or an interrupt
  (``KeyboardInterrupt``, ``SystemExit``, any ``BaseException``) stops the iteration: the
  current run is left unfinished, so the next call with the same batch restarts it;
- if no run of the iteration succeeded, :class:`~tracker_core.errors.IterationFailedError` is
  raised naming the failures; the failed iteration is moved to MLflow's deleted experiments
  (restorable from the UI, and out of the way so the same batch can be retried) and the
  previous iteration, with its best model, is kept.
"""

from __future__ import annotations

import contextvars
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from tracker_core import tags as T
from tracker_core.codecs import get_codec
from tracker_core.errors import (
    ArtifactStoreError,
    ConfigurationError,
    InvalidParamsError,
    IterationFailedError,
    LeaseLostError,
    MaxAttemptsReachedException,
    ModelNotFoundError,
    RunInUseError,
    TrackingStoreError,
    TransientError,
)
from tracker_core.manager import ExperimentsManager
from tracker_core.methods import FineTuningMethod, _check_method
from tracker_core.params import FineTuningParams
from tracker_core.values import (
    ExperimentRecord,
    FineTuningIteration,
    MetricValue,
    RunRecord,
    RunStatus,
    validate_name,
)

__all__ = [
    "IterationProgress",
    "IterationResult",
    "IterationStopped",
    "RunResult",
    "check_stop",
    "parse_iteration_name",
    "run_iteration",
    "stop_requested",
]

log = logging.getLogger(__name__)

#: failures of the infrastructure, not of the run: they stop the iteration (resumable)
_INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    LeaseLostError,
    TrackingStoreError,
    ArtifactStoreError,
    TransientError,
    MaxAttemptsReachedException,
    ModelNotFoundError,
)
_UNFINISHED = (RunStatus.RUNNING, RunStatus.SCHEDULED)


@attrs.frozen
class RunResult:
    """One params set of an iteration and how its run ended.

    ``trained`` is False when the run had finished in an earlier attempt and was skipped;
    ``has_model`` tells whether the run holds a stored model at the end of the iteration.
    """

    params: FineTuningParams
    run_id: str
    status: RunStatus
    metric: float | None
    trained: bool
    has_model: bool
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status == RunStatus.FINISHED and self.metric is not None


@attrs.frozen
class IterationResult:
    """What one call of :func:`run_iteration` did."""

    plugin_name: str
    iteration_name: str
    experiment_id: str
    batch_id: str
    main_metric: str
    is_loss: bool
    #: the run whose model the iteration started from (the initial model's run, or the best
    #: run of the previous iteration)
    start_run_id: str
    started_from_initial: bool
    resumed: bool
    runs: tuple[RunResult, ...]
    best_run_id: str | None
    best_metric: float | None
    best_model_uri: str | None
    #: the iteration deleted at the end (the one this iteration started from), if any; None
    #: also when its deletion was deferred (live workers still held runs of it)
    deleted_iteration_id: str | None

    @property
    def failed_runs(self) -> tuple[RunResult, ...]:
        return tuple(r for r in self.runs if r.status == RunStatus.FAILED)

    @property
    def trained_runs(self) -> tuple[RunResult, ...]:
        return tuple(r for r in self.runs if r.trained)


@attrs.frozen
class IterationProgress:
    """How far an iteration is: ``finished`` of ``planned`` runs have ended (trained in this
    call, or finished in an earlier one), ``failed`` of them failed in this call."""

    planned: int
    finished: int
    failed: int


class IterationStopped(BaseException):
    """The iteration was asked to stop (see :func:`check_stop`).

    A ``BaseException``, like ``KeyboardInterrupt``: it is not a failure of the run, so the
    driver leaves the run unfinished instead of marking it FAILED, and the next call of
    :func:`run_iteration` for the same batch resumes it.
    """


#: the stop check of the iteration running in this context (set by run_iteration)
_stop_check: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "tracker_core_stop_check", default=None
)


def stop_requested() -> bool:
    """Whether the iteration running in this thread was asked to stop.

    False outside :func:`run_iteration`, or when it was given no ``should_stop``. Threads a
    method starts do not inherit the check unless started with ``contextvars.copy_context``.
    """
    check = _stop_check.get()
    return bool(check is not None and check())


def check_stop() -> None:
    """Raise :class:`IterationStopped` if the iteration was asked to stop; else return.

    Call it from ``train`` at points where stopping is safe (between epochs, every N
    steps): a canceled task then stops within one step instead of at the end of the run.
    """
    if stop_requested():
        raise IterationStopped("the iteration was asked to stop")


@contextmanager
def _stop_scope(should_stop: Callable[[], bool] | None) -> Iterator[None]:
    token = _stop_check.set(should_stop)
    try:
        yield
    finally:
        _stop_check.reset(token)


def parse_iteration_name(name: str) -> FineTuningIteration | None:
    """The :class:`FineTuningIteration` an experiment name was made from, or None."""
    parts = name.split(" / ")
    if len(parts) != 4 or parts[1] != "iteration":
        return None
    plugin, _, run_id, batch = parts
    try:
        return FineTuningIteration(plugin, batch, run_id=run_id or None)
    except ConfigurationError:
        return None


# ---------------------------------------------------------------------- the driver
def _check_manager(manager: ExperimentsManager, method: FineTuningMethod[Any]) -> None:
    mismatches = [
        f"{what}: manager {mine!r}, method {theirs!r}"
        for what, mine, theirs in (
            ("plugin name", manager.plugin_name, method.name),
            ("main metric", manager.main_metric, method.main_metric),
            ("is_loss", manager.is_loss, bool(method.is_loss)),
        )
        if mine != theirs
    ]
    if mismatches:
        raise ConfigurationError(
            "the manager does not match the fine-tuning method ("
            + "; ".join(mismatches)
            + "); build it with tracker_core.connect(..., **connect_kwargs(method))"
        )


def _iteration_of_batch(manager: ExperimentsManager, batch_id: str) -> ExperimentRecord | None:
    """The newest iteration of this plugin if it was made for ``batch_id`` (to resume)."""
    for experiment in manager.get_experiments():
        if experiment.tags.get(T.TAG_BATCH) == batch_id:
            return experiment
        return None  # only the newest iteration is resumed
    return None


def _previous_iteration(manager: ExperimentsManager) -> tuple[ExperimentRecord, RunRecord] | None:
    """The newest iteration that holds a best model, with that run. Runs still unfinished in it
    (a straggling worker, a crash) do not matter: its best model so far is the start, and its
    deletion at step 7 waits for its live workers."""
    for experiment in manager.get_experiments():
        best = manager.get_best_model_run(experiment.experiment_id)
        if best is not None:
            return experiment, best
        log.info("skipping iteration %r: it holds no model", experiment.name)
    return None


def _dedupe(params: Sequence[FineTuningParams]) -> list[FineTuningParams]:
    seen: dict[str, FineTuningParams] = {}
    for p in params:
        if not isinstance(p, FineTuningParams):
            raise ConfigurationError(f"params must be FineTuningParams, got {type(p).__name__}")
        seen.setdefault(p.id, p)
    return list(seen.values())


class _StartModel:
    """The local working copy of the starting model, downloaded once on first use; each run
    gets a fresh copy loaded from it."""

    def __init__(self, manager: ExperimentsManager, run_id: str, directory: Path) -> None:
        self._manager, self._run_id, self._dir = manager, run_id, directory
        self._format: str | None = None

    def fresh_copy(self) -> Any:
        if self._format is None:
            run = self._manager.get_run_by_id(self._run_id, models_only=True)
            if run is None:
                raise ModelNotFoundError(f"the starting run {self._run_id} holds no model")
            log.info("downloading the starting model (run %s) to %s", self._run_id, self._dir)
            self._manager.models.download_files(run, self._dir, progress=None)
            self._format = run.tags.get(T.TAG_MODEL_FORMAT, self._manager.model_format)
        return get_codec(self._format).load(self._dir, self._manager.model_factory)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def run_iteration(
    method: FineTuningMethod[Any],
    manager: ExperimentsManager,
    batch_id: str,
    *,
    seed: int | None = 0,
    work_dir: str | Path | None = None,
    on_progress: Callable[[IterationProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> IterationResult:
    """Run (or resume) one fine-tuning iteration of ``method`` on the data batch ``batch_id``.

    ``manager`` must track ``method`` (same plugin name, main metric and direction; build it
    with ``connect(artifact_uri, **connect_kwargs(method))``). ``seed`` is passed to
    ``method.initial_params``; keep it fixed so a resumed first iteration proposes the same
    sets. Temporary files (the local copy of the starting model) go to a fresh folder under
    ``work_dir`` (default: the system temporary folder), removed before returning or raising.

    ``on_progress`` and ``should_stop`` are for supervisors (see the module docstring):
    progress reports, and a stop check polled before every run and offered to the method
    through :func:`check_stop`.

    Returns an :class:`IterationResult`. Raises
    :class:`~tracker_core.errors.IterationFailedError` if no run succeeded,
    :class:`IterationStopped` if asked to stop, and store errors (after retries) as they are;
    see the module docstring for what is kept in each case.
    """
    with _stop_scope(should_stop):
        return _run_iteration(method, manager, batch_id, seed, work_dir, on_progress, should_stop)


def _run_iteration(
    method: FineTuningMethod[Any],
    manager: ExperimentsManager,
    batch_id: str,
    seed: int | None,
    work_dir: str | Path | None,
    on_progress: Callable[[IterationProgress], None] | None,
    should_stop: Callable[[], bool] | None,
) -> IterationResult:
    _check_method(method)
    _check_manager(manager, method)
    validate_name(batch_id, "batch_id")
    if manager.current_iteration is not None:
        manager.finish_iteration()

    # 1. initial model setup
    if not manager.has_initial_model():
        log.info("uploading the initial model of %r", method.name)
        manager.upload_initial_model(method.initial_model())
    initial_run_id = manager.get_initial_model_run_id()
    if initial_run_id is None:
        raise ModelNotFoundError(f"the initial model of {method.name!r} could not be found")

    existing = _iteration_of_batch(manager, batch_id)
    resumed_iteration = parse_iteration_name(existing.name) if existing is not None else None
    previous: ExperimentRecord | None = None
    if resumed_iteration is not None:
        start_run_id = resumed_iteration.run_id or initial_run_id
        start_run = manager.get_run_by_id(start_run_id)
        if start_run is not None and start_run_id != initial_run_id:
            previous = manager.get_experiment(start_run.experiment_id)
            if previous is not None and previous.lifecycle_stage != "active":
                previous = None
        log.info("resuming iteration %r", str(resumed_iteration))
    else:
        found = _previous_iteration(manager)
        if found is not None:
            previous, best = found
            start_run_id = best.run_id
            log.info("starting from the best model of %r (run %s)", previous.name, start_run_id)
        else:
            start_run_id = initial_run_id
            log.info("starting from the initial model (run %s)", start_run_id)

    # 2. hyper-parameter selection
    params: list[FineTuningParams] = []
    if previous is not None:
        params = list(
            manager.get_top_params_by_experiment_id(previous.experiment_id, method.params_type)
            or []
        )
    # a resumed iteration whose starting iteration is already gone (a crash after step 7)
    # only finishes the runs it has; any other iteration falls back to the initial sets
    start_is_gone = (
        resumed_iteration is not None and start_run_id != initial_run_id and previous is None
    )
    if not params and not start_is_gone:
        params = list(method.initial_params(seed))
    if existing is not None:  # runs already created by an earlier attempt are kept
        for run in sorted(
            manager.get_runs(existing.experiment_id),
            key=lambda r: (r.start_time_ms, r.run_id),
        ):
            try:
                params.append(method.params_type.from_mlflow(run.params))
            except InvalidParamsError:
                # created by a worker that died before logging its params: its params set
                # is among the ones above (the run gets its params when that set resumes it)
                log.warning("run %s (%s) has no params yet; skipped", run.run_id, run.run_name)
    params = _dedupe(params)
    if not params:
        raise ConfigurationError(f"fine-tuning method {method.name!r} proposed no params sets")
    log.info("%d params set(s) to try", len(params))

    # 3. iteration creation
    iteration = resumed_iteration or FineTuningIteration(method.name, batch_id, run_id=start_run_id)
    work = Path(tempfile.mkdtemp(prefix="tracker-core-iteration-", dir=work_dir))
    try:
        manager.set_iteration(iteration)
        experiment_id = manager.current_experiment_id
        assert experiment_id is not None
        try:
            results = _run_all(
                method,
                manager,
                params,
                _StartModel(manager, start_run_id, work / "model"),
                on_progress,
                should_stop,
            )
        except BaseException:
            manager.abandon_iteration()
            raise
        runs = _collect(manager, experiment_id, params, results)

        if not any(r.succeeded for r in runs):
            manager.finish_iteration()
            failures = "; ".join(
                f"run {r.run_id} {r.params!r}: {r.error or r.status.value}" for r in runs
            )
            where = (
                "was moved to MLflow's deleted experiments"
                if manager.delete_iteration(experiment_id, defer=True)
                else "will be deleted once the workers still holding its runs are done"
            )
            raise IterationFailedError(
                f"every run of iteration {str(iteration)!r} failed ({failures}); the failed "
                f"iteration (experiment {experiment_id}) {where}, and the previous iteration "
                "was kept"
            )

        best_run_id, _ = manager.get_best_current_run_id()
        best_uri = manager.get_current_model_url() if best_run_id else None
        best_metric = next((r.metric for r in runs if r.run_id == best_run_id), None)

        # 7. iteration completion: an iteration that live workers still use is deleted later,
        # by the next completion (it is marked pending), never under a running worker
        manager.finish_iteration()
        manager.delete_pending_iterations()
        deleted: str | None = None
        if (
            previous is not None
            and previous.experiment_id != experiment_id
            and manager.delete_iteration(previous.experiment_id, defer=True)
        ):
            deleted = previous.experiment_id
        log.info(
            "iteration %r done: %d run(s), %d failed, best run %s (%s=%s)",
            str(iteration),
            len(runs),
            sum(r.status == RunStatus.FAILED for r in runs),
            best_run_id,
            method.main_metric,
            best_metric,
        )
        return IterationResult(
            plugin_name=method.name,
            iteration_name=str(iteration),
            experiment_id=experiment_id,
            batch_id=batch_id,
            main_metric=method.main_metric,
            is_loss=bool(method.is_loss),
            start_run_id=start_run_id,
            started_from_initial=start_run_id == initial_run_id,
            resumed=existing is not None,
            runs=tuple(runs),
            best_run_id=best_run_id,
            best_metric=best_metric,
            best_model_uri=best_uri,
            deleted_iteration_id=deleted,
        )
    finally:
        # 8. model cleanup
        shutil.rmtree(work, ignore_errors=True)


#: how long one wait for a run another live worker holds lasts before the stop check
_LEASE_POLL_SECONDS = 5.0


def _take_run(
    manager: ExperimentsManager, params: FineTuningParams, should_stop: Callable[[], bool] | None
) -> bool:
    """``set_run`` that waits for a run another live worker holds: until it ends (True: skip
    it) or is let go, or its worker's lease expires (False: train it); a stop request ends
    the wait."""
    while True:
        try:
            return manager.set_run(params, wait=_LEASE_POLL_SECONDS)
        except RunInUseError:
            if should_stop is not None and should_stop():
                raise IterationStopped("stopped while another worker held a run") from None


def _run_all(
    method: FineTuningMethod[Any],
    manager: ExperimentsManager,
    params: Sequence[FineTuningParams],
    start: _StartModel,
    on_progress: Callable[[IterationProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, tuple[bool, str | None]]:
    """Steps 4-6 for every params set: ``{params id: (trained, error)}``."""
    done: dict[str, tuple[bool, str | None]] = {}

    def report() -> None:
        if on_progress is not None:
            failed = sum(1 for _, error in done.values() if error is not None)
            on_progress(IterationProgress(len(params), len(done), failed))

    report()
    for index, p in enumerate(params, 1):
        if should_stop is not None and should_stop():
            log.info("stop requested: leaving the iteration before run %d/%d", index, len(params))
            raise IterationStopped(f"stopped before run {index} of {len(params)}")
        if _take_run(manager, p, should_stop):
            log.info("run %d/%d %r finished in an earlier attempt; skipped", index, len(params), p)
            done[p.id] = (False, None)
            report()
            continue
        log.info("run %d/%d (%s): %r", index, len(params), manager.current_run_id, p)
        model = start.fresh_copy()  # a failure here is the store's, not the run's: it stops
        try:
            tuned = method.train(model, p, manager)
            value = float(method.evaluate(tuned, p, manager))
            manager.save_metric(MetricValue(method.main_metric, value))
            saved = manager.save_model(tuned, best_only=True)
        except _INFRASTRUCTURE_ERRORS:
            raise
        except Exception as exc:
            log.warning("run %s failed: %s", manager.current_run_id, _describe(exc), exc_info=True)
            manager.finish_run(as_failed=True)
            done[p.id] = (True, _describe(exc))
            report()
            continue
        log.info(
            "run %s: %s=%s%s",
            manager.current_run_id,
            method.main_metric,
            value,
            " (model saved)" if saved else "",
        )
        manager.finish_run()
        done[p.id] = (True, None)
        report()
    return done


def _collect(
    manager: ExperimentsManager,
    experiment_id: str,
    params: Sequence[FineTuningParams],
    results: dict[str, tuple[bool, str | None]],
) -> list[RunResult]:
    by_name = {r.run_name: r for r in manager.get_runs(experiment_id)}
    out: list[RunResult] = []
    for p in params:
        run = by_name.get(p.id)
        if run is None:  # cannot happen after _run_all; be explicit rather than KeyError
            raise ModelNotFoundError(f"the run of params {p!r} disappeared from {experiment_id}")
        trained, error = results.get(p.id, (False, None))
        metric = run.metrics.get(manager.main_metric)
        out.append(
            RunResult(
                params=p,
                run_id=run.run_id,
                status=run.status,
                metric=None if run.status == RunStatus.FAILED else metric,
                trained=trained,
                has_model=run.tags.get(T.TAG_MODEL_UPLOADED) == T.TRUE,
                error=error,
            )
        )
    return out
