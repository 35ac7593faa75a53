"""Steps 4-6 (and 8) for one params set: :func:`train_run`, what one run job of a parallel
iteration does, in any process, at the same time as the others; the sequential driver
(:mod:`.driver`) trains each params set it takes with the same ``_train_taken``.

One run starts or resumes the run of its params set (a run that ended in an earlier attempt is
skipped; one another live worker holds is waited for), trains a fresh copy of the starting
model, evaluates and logs the main metric, saves the model if it is among the best, and
finishes the run. The starting model is downloaded once, on first use, to a local working
copy (``_StartModel``) that each run loads from; step 8 removes it, on every path.

An exception from the method (``train``/``evaluate``, or a non-finite metric) fails that run
only (FAILED, with the error logged and reported); a failure of the stores or an interrupt
propagates and leaves the run unfinished, so the next attempt restarts it.

With the ``search`` policy and a pruner, the run's pruning is current while ``train`` runs
(:func:`~tracker_core.finetune.check_prune`); a pruned run ends KILLED and tagged
(:mod:`tracker_core.pruning`), whichever process trains it: the other runs' intermediate
values come from the tracking store.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tracker_core import tags as T
from tracker_core.codecs import get_codec
from tracker_core.errors import (
    RETRYABLE_ERRORS,
    ConfigurationError,
    ModelNotFoundError,
    RunInUseError,
)
from tracker_core.finetune.plan import IterationPlan, _enter, method_policy
from tracker_core.finetune.pruning import RunPruned, _prune_scope
from tracker_core.finetune.results import RunResult, _collect
from tracker_core.finetune.stopping import IterationStopped, _stop_scope
from tracker_core.manager import ExperimentsManager
from tracker_core.methods import FineTuningMethod
from tracker_core.params import FineTuningParams
from tracker_core.pruning import RunPruning, end_pruned, is_pruned
from tracker_core.search import Search
from tracker_core.values import MetricValue

#: how one params set's run ended in this call: (trained, error, pruned)
_Outcome = tuple[bool, str | None, bool]
#: makes the pruning of the run being trained (None: no pruning)
_Pruning = Callable[[], RunPruning] | None

__all__ = ["train_run"]

log = logging.getLogger(__name__)


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
                if _take_run(manager, params, should_stop):
                    log.info("run %s %r finished in an earlier attempt; skipped", params.id, params)
                    trained, error = False, None
                else:
                    start = _StartModel(manager, plan.start_run_id, work / "model")
                    pruning = _pruning(method, manager, plan)
                    trained, error, _ = _train_taken(
                        method, manager, params, start, params.id, pruning
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


def _pruning(
    method: FineTuningMethod[Any], manager: ExperimentsManager, plan: IterationPlan
) -> _Pruning:
    """The pruning of the plan's runs: the search's pruner, when the plan was made by a
    search that has one."""
    if plan.proposal != Search.name:
        return None
    policy = method_policy(method, Search.name)
    if not isinstance(policy, Search) or policy.pruner is None:
        return None
    pruner, order = policy.pruner, [p.id for p in plan.params]
    return lambda: RunPruning(
        manager,
        pruner,
        metric=policy.intermediate_metric,
        is_loss=policy.intermediate_is_loss,
        order=order,
    )


def _train_taken(
    method: FineTuningMethod[Any],
    manager: ExperimentsManager,
    p: FineTuningParams,
    start: _StartModel,
    label: str,
    pruning: _Pruning = None,
) -> _Outcome:
    """Steps 4-6 for the params set whose run this worker just took (``set_run``, the run
    not ended): ``(trained, error, pruned)``. A run pruned in an earlier attempt that did not
    get to end it is ended pruned, not trained again; an error of the method fails the run; a
    pruned run ends KILLED; store errors and interrupts propagate (the run is left
    unfinished)."""
    current = manager.tracker.runs.run
    if current is not None and is_pruned(current):
        log.info("run %s was pruned in an earlier attempt; ending it pruned", label)
        end_pruned(manager)
        return False, None, True
    log.info("run %s (%s): %r", label, manager.current_run_id, p)
    model = start.fresh_copy()  # a failure here is the store's, not the run's: it stops
    run_pruning = pruning() if pruning is not None else None
    try:
        with _prune_scope(run_pruning):
            tuned = method.train(model, p, manager)
        value = float(method.evaluate(tuned, p, manager))
        manager.save_metric(MetricValue(method.main_metric, value))
        saved = manager.save_model(tuned, best_only=True)
    except RunPruned as exc:
        log.info("run %s pruned: %s", manager.current_run_id, exc)
        if run_pruning is not None:
            run_pruning.prune()
        else:  # raised by the method itself
            end_pruned(manager)
        return True, None, True
    except RETRYABLE_ERRORS:  # the infrastructure's, not the run's: it stops (resumable)
        raise
    except Exception as exc:
        log.warning("run %s failed: %s", manager.current_run_id, _describe(exc), exc_info=True)
        manager.finish_run(as_failed=True)
        return True, _describe(exc), False
    log.info(
        "run %s: %s=%s%s",
        manager.current_run_id,
        method.main_metric,
        value,
        " (model saved)" if saved else "",
    )
    manager.finish_run()
    return True, None, False


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
