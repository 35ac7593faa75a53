"""Step 7, once every run of the iteration has ended: :func:`complete_iteration`.

It finishes the iteration and deletes the iteration it started from (its models included);
while live workers still hold runs of that iteration its deletion is deferred to a later
completion. The initial model is never deleted. Before that, the iteration is concluded
(:func:`tracker_core.continual.conclude`): with a method that has a holdout evaluation, its best
model is the challenger, promoted to champion if it beats the one serving (an iteration that
holds the champion's or the rollback model is then kept, its deletion deferred); the
iteration's lineage record is written either way. If no run succeeded,
:class:`~tracker_core.errors.IterationFailedError` is raised naming the failures; the failed
iteration is moved to MLflow's deleted experiments (restorable from the UI, and out of the way
so the same batch can be retried) and the previous iteration, with its best model, is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from tracker_core.continual import conclude, started_by
from tracker_core.errors import IterationFailedError, IterationInUseError
from tracker_core.finetune.champion import holdout_of
from tracker_core.finetune.plan import IterationPlan, _enter
from tracker_core.finetune.results import IterationResult, _collect
from tracker_core.manager import ExperimentsManager
from tracker_core.methods import FineTuningMethod
from tracker_core.values import RunStatus

__all__ = ["complete_iteration"]

log = logging.getLogger(__name__)

_UNFINISHED = (RunStatus.RUNNING, RunStatus.SCHEDULED)


def complete_iteration(
    method: FineTuningMethod[Any],
    manager: ExperimentsManager,
    plan: IterationPlan,
    outcomes: Mapping[str, tuple[bool, str | None]],
    *,
    by: str | None = None,
) -> IterationResult:
    """Step 7, once every run of the iteration has ended: finish the iteration and delete
    the one it started from (deferred while live workers still hold runs of it).

    ``outcomes`` maps a params id to ``(trained, error)`` as the runs reported them (for the
    result; a missing id counts as not trained here). Refuses, deleting nothing, while a run
    of the plan is still unfinished (:class:`~tracker_core.errors.IterationInUseError`). If
    no run succeeded, moves the failed iteration aside and raises
    :class:`~tracker_core.errors.IterationFailedError`; the previous iteration is kept.

    ``by`` names who or what ran the iteration, for its lineage record and the promotion
    decision (default: ``task <$TRACKER_CORE_TASK_ID>``, else this worker).
    """
    _enter(manager, plan)
    experiment = manager.tracker.require_iteration()
    by = by or started_by(manager.tracker.leases.owner)
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
        conclude(manager.tracker, experiment, start_run_id=plan.start_run_id, holdout=None, by=by)
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

    # every run has ended: what a worker killed between ending its run and pruning left
    # (a model of a FAILED run, one below the `keep` best) goes now
    manager.models.prune(experiment_id, manager.keep)
    best_run_id, _ = manager.get_best_current_run_id()
    best_uri = manager.get_current_model_url() if best_run_id else None
    best_metric = next((r.metric for r in runs if r.run_id == best_run_id), None)
    # the challenger is gated (and protected if promoted) before anything is deleted
    conclusion = conclude(
        manager.tracker,
        experiment,
        start_run_id=plan.start_run_id,
        holdout=holdout_of(method),
        by=by,
    )

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
        promotion=conclusion.decision,
    )
