"""The fine-tuning process: one iteration of a method, steps 1-8 of ``seeds/run-fine-tuning.md``.

:func:`run_iteration` does, in order:

1. **Initial model setup**: upload the method's initial model if none was uploaded yet; pick
   the model to start from (the best model of the newest iteration holding one, else the initial
   model); each run loads it from a local working copy.
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

The steps are also callable one by one, which is how the task service trains the params sets
of one iteration on several workers at once: :func:`prepare_iteration` (steps 1-3, returns an
:class:`IterationPlan`, a value that can be sent to other processes as JSON), :func:`train_run`
(steps 4-6 and 8 for one params set, in any process, concurrently with the others),
:func:`complete_iteration` (step 7, once every run has ended), and :func:`run_prepared` (steps
4-8 one after another, then 7). :func:`run_iteration` is :func:`prepare_iteration` followed by
:func:`run_prepared`: the sequential case, with the same code for every step.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    IterationInUseError,
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
    "IterationPlan",
    "IterationProgress",
    "IterationResult",
    "IterationStopped",
    "RunResult",
    "check_stop",
    "complete_iteration",
    "parse_iteration_name",
    "prepare_iteration",
    "run_iteration",
    "run_prepared",
    "stop_requested",
    "train_run",
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


@attrs.frozen
class IterationPlan:
    """What steps 1-3 decided (:func:`prepare_iteration`): the iteration, the model it starts
    from and the params sets to try, in order.

    ``ended`` tells, for the params sets whose run had already ended when the plan was made
    (a resumed iteration), how it ended. :meth:`to_json` / :meth:`from_json` carry a plan to
    other processes (the task service's run jobs).
    """

    iteration: FineTuningIteration
    experiment_id: str
    start_run_id: str
    initial_run_id: str
    #: the iteration deleted at step 7 (the one the starting model comes from), if any
    previous_experiment_id: str | None
    #: the iteration existed already (an earlier attempt created it)
    resumed: bool
    params: tuple[FineTuningParams, ...]
    ended: Mapping[str, RunStatus] = attrs.field(factory=dict, eq=False)

    @property
    def started_from_initial(self) -> bool:
        return self.start_run_id == self.initial_run_id

    @property
    def unfinished(self) -> tuple[FineTuningParams, ...]:
        """The params sets whose run had not ended when the plan was made."""
        return tuple(p for p in self.params if p.id not in self.ended)

    def params_by_id(self, params_id: str) -> FineTuningParams:
        for p in self.params:
            if p.id == params_id:
                return p
        raise ConfigurationError(
            f"params {params_id!r} are not one of the planned sets of {str(self.iteration)!r}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "plugin_name": self.iteration.plugin_name,
            "batch_id": self.iteration.batch_id,
            "iteration_run_id": self.iteration.run_id,
            "iteration": str(self.iteration),
            "experiment_id": self.experiment_id,
            "start_run_id": self.start_run_id,
            "initial_run_id": self.initial_run_id,
            "previous_experiment_id": self.previous_experiment_id,
            "resumed": self.resumed,
            "params": [{"id": p.id, "values": p.to_mlflow()} for p in self.params],
            "ended": {k: v.value for k, v in self.ended.items()},
        }

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], params_type: type[FineTuningParams]
    ) -> IterationPlan:
        """The plan :meth:`to_json` described; ``params_type`` rebuilds the typed params."""
        params = []
        for item in data["params"]:
            p = params_type.from_mlflow(item["values"])
            if p.id != item["id"]:
                raise InvalidParamsError(
                    f"params {item['id']} of the plan rebuild as {p.id} with "
                    f"{params_type.__name__}: the method's params type changed since it was made"
                )
            params.append(p)
        return cls(
            iteration=FineTuningIteration(
                data["plugin_name"], data["batch_id"], run_id=data["iteration_run_id"]
            ),
            experiment_id=str(data["experiment_id"]),
            start_run_id=str(data["start_run_id"]),
            initial_run_id=str(data["initial_run_id"]),
            previous_experiment_id=data["previous_experiment_id"],
            resumed=bool(data["resumed"]),
            params=tuple(params),
            ended={k: RunStatus(v) for k, v in data.get("ended", {}).items()},
        )


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

    It is :func:`prepare_iteration` followed by :func:`run_prepared`.
    """
    with _stop_scope(should_stop):
        plan = prepare_iteration(method, manager, batch_id, seed=seed)
        return run_prepared(
            method,
            manager,
            plan,
            work_dir=work_dir,
            on_progress=on_progress,
            should_stop=should_stop,
        )


# ---------------------------------------------------------------------- steps 1-3
def prepare_iteration(
    method: FineTuningMethod[Any],
    manager: ExperimentsManager,
    batch_id: str,
    *,
    seed: int | None = 0,
) -> IterationPlan:
    """Steps 1-3: upload the initial model if needed, choose the starting model and the
    params sets, and create (or resume) the iteration, which is left current in ``manager``.

    Downloads nothing: each run loads the starting model when it trains (step 4).
    """
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
    ended: dict[str, RunStatus] = {}
    if existing is not None:  # runs already created by an earlier attempt are kept
        for run in sorted(
            manager.get_runs(existing.experiment_id),
            key=lambda r: (r.start_time_ms, r.run_id),
        ):
            if run.status.is_terminal:
                ended.setdefault(run.run_name, run.status)
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
    manager.set_iteration(iteration)
    experiment_id = manager.current_experiment_id
    assert experiment_id is not None
    return IterationPlan(
        iteration=iteration,
        experiment_id=experiment_id,
        start_run_id=start_run_id,
        initial_run_id=initial_run_id,
        previous_experiment_id=None if previous is None else previous.experiment_id,
        resumed=existing is not None,
        params=tuple(params),
        ended={p.id: ended[p.id] for p in params if p.id in ended},
    )


def _enter(manager: ExperimentsManager, plan: IterationPlan) -> None:
    """Make the plan's iteration current in ``manager`` (another process's plan: a run job)."""
    if manager.current_experiment_id == plan.experiment_id:
        return
    manager.set_iteration(plan.iteration)
    if manager.current_experiment_id != plan.experiment_id:
        found = manager.current_experiment_id
        manager.finish_iteration()
        raise ConfigurationError(
            f"iteration {str(plan.iteration)!r} is experiment {found} now, not "
            f"{plan.experiment_id} as planned (was it deleted and made again?); "
            "prepare the iteration again"
        )


# ---------------------------------------------------------------------- steps 4-8, in order
def run_prepared(
    method: FineTuningMethod[Any],
    manager: ExperimentsManager,
    plan: IterationPlan,
    *,
    work_dir: str | Path | None = None,
    on_progress: Callable[[IterationProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> IterationResult:
    """Steps 4-8 of a prepared iteration, one params set after another in this process,
    then step 7 (:func:`complete_iteration`). What :func:`run_iteration` does after
    :func:`prepare_iteration`; the same semantics."""
    with _stop_scope(should_stop):
        _enter(manager, plan)
        work = Path(tempfile.mkdtemp(prefix="tracker-core-iteration-", dir=work_dir))
        try:
            try:
                outcomes = _run_all(
                    method,
                    manager,
                    plan.params,
                    _StartModel(manager, plan.start_run_id, work / "model"),
                    on_progress,
                    should_stop,
                )
            except BaseException:
                manager.abandon_iteration()
                raise
            return complete_iteration(method, manager, plan, outcomes)
        finally:
            # 8. model cleanup
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------- steps 4-6 (and 8), one run
def train_run(
    method: FineTuningMethod[Any],
    manager: ExperimentsManager,
    plan: IterationPlan,
    params: FineTuningParams,
    *,
    work_dir: str | Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RunResult:
    """Steps 4-6 for one params set of a prepared iteration, then step 8 (its local copy of
    the starting model is removed): what one run job of a parallel iteration does, in any
    process, at the same time as the others.

    A run that already ended (FINISHED, FAILED or KILLED) is not trained again
    (``trained`` False); one another live worker holds is waited for (stoppably); one a dead
    worker left unfinished is resumed once its lease expired. Raises
    :class:`IterationStopped` when asked to stop (the run is left unfinished, resumable), and
    store errors as they are; an error of the method fails the run only.
    """
    if params.id not in {p.id for p in plan.params}:
        raise ConfigurationError(f"params {params!r} are not one of the iteration's planned sets")
    with _stop_scope(should_stop):
        _enter(manager, plan)
        work = Path(tempfile.mkdtemp(prefix="tracker-core-run-", dir=work_dir))
        try:
            try:
                trained, error = _train_one(
                    method,
                    manager,
                    params,
                    _StartModel(manager, plan.start_run_id, work / "model"),
                    should_stop,
                    label=params.id,
                )
            except BaseException:
                manager.abandon_iteration()
                raise
            manager.finish_iteration()
            (result,) = _collect(
                manager, plan.experiment_id, [params], {params.id: (trained, error)}
            )
            return result
        finally:
            # 8. model cleanup
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------- step 7
def complete_iteration(
    method: FineTuningMethod[Any],
    manager: ExperimentsManager,
    plan: IterationPlan,
    outcomes: Mapping[str, tuple[bool, str | None]],
) -> IterationResult:
    """Step 7, once every run of the iteration has ended: finish the iteration and delete
    the one it started from (deferred while live workers still hold runs of it).

    ``outcomes`` maps a params id to ``(trained, error)`` as the runs reported them (for the
    result; a missing id counts as not trained here). Refuses, deleting nothing, while a run
    of the plan is still unfinished (:class:`~tracker_core.errors.IterationInUseError`). If
    no run succeeded, moves the failed iteration aside and raises
    :class:`~tracker_core.errors.IterationFailedError`; the previous iteration is kept.
    """
    _enter(manager, plan)
    experiment_id = plan.experiment_id
    iteration = plan.iteration
    runs = _collect(manager, experiment_id, plan.params, outcomes)
    unfinished = [r for r in runs if r.status in _UNFINISHED]
    if unfinished:
        manager.finish_iteration()
        raise IterationInUseError(
            f"iteration {str(iteration)!r} cannot be completed: {len(unfinished)} run(s) are "
            f"not finished ({', '.join(r.run_id for r in unfinished)}); nothing was deleted"
        )

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
    previous = plan.previous_experiment_id
    if (
        previous is not None
        and previous != experiment_id
        and manager.delete_iteration(previous, defer=True)
    ):
        deleted = previous
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
        batch_id=iteration.batch_id,
        main_metric=method.main_metric,
        is_loss=bool(method.is_loss),
        start_run_id=plan.start_run_id,
        started_from_initial=plan.started_from_initial,
        resumed=plan.resumed,
        runs=tuple(runs),
        best_run_id=best_run_id,
        best_metric=best_metric,
        best_model_uri=best_uri,
        deleted_iteration_id=deleted,
    )


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


def _train_one(
    method: FineTuningMethod[Any],
    manager: ExperimentsManager,
    p: FineTuningParams,
    start: _StartModel,
    should_stop: Callable[[], bool] | None,
    label: str,
) -> tuple[bool, str | None]:
    """Steps 4-6 for one params set: ``(trained, error)``. A run that ended in an earlier
    attempt is skipped; an error of the method fails the run; store errors and interrupts
    propagate (the run is left unfinished)."""
    if _take_run(manager, p, should_stop):
        log.info("run %s %r finished in an earlier attempt; skipped", label, p)
        return False, None
    log.info("run %s (%s): %r", label, manager.current_run_id, p)
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
        return True, _describe(exc)
    log.info(
        "run %s: %s=%s%s",
        manager.current_run_id,
        method.main_metric,
        value,
        " (model saved)" if saved else "",
    )
    manager.finish_run()
    return True, None


def _run_all(
    method: FineTuningMethod[Any],
    manager: ExperimentsManager,
    params: Sequence[FineTuningParams],
    start: _StartModel,
    on_progress: Callable[[IterationProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, tuple[bool, str | None]]:
    """Steps 4-6 for every params set, in order: ``{params id: (trained, error)}``."""
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
        done[p.id] = _train_one(method, manager, p, start, should_stop, f"{index}/{len(params)}")
        report()
    return done


def _collect(
    manager: ExperimentsManager,
    experiment_id: str,
    params: Sequence[FineTuningParams],
    results: Mapping[str, tuple[bool, str | None]],
) -> list[RunResult]:
    by_name = {r.run_name: r for r in manager.get_runs(experiment_id)}
    out: list[RunResult] = []
    for p in params:
        run = by_name.get(p.id)
        if run is None:  # a run job that never started it; be explicit rather than KeyError
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
