"""The end of an iteration in the continual loop: gate its challenger, record its lineage.

:func:`conclude` is what the driver's completion (:func:`tracker_core.finetune.complete_iteration`,
also the task service's completion job) and a hand-written loop (``manager.promote(...)``) call
once an iteration's runs have ended (:func:`promote` is the hand-written loop's, choosing
the run the iteration started from): with a holdout evaluation, the iteration's best model is
the challenger, gated by :class:`~tracker_core.promotion.Promoter`; with or without one, the
iteration's :class:`~tracker_core.lineage.LineageRecord` is written. Both are repeatable, so a
repeated completion concludes the same way.

:func:`start_run` is the start-from policy: what the next iteration starts from.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import attrs

from tracker_core import tags as T
from tracker_core.lineage import LineageRecord
from tracker_core.models import is_marked, sha256_of
from tracker_core.params import PARAM_PREFIX
from tracker_core.promotion import Decision
from tracker_core.tracker import Tracker
from tracker_core.values import ExperimentRecord, RunRecord, RunStatus

__all__ = ["START_FROM", "Conclusion", "conclude", "promote", "start_run", "started_by"]

log = logging.getLogger(__name__)

#: the start-from policies: the champion, or the last iteration's best
START_FROM = ("champion", "last")

Holdout = Callable[[Any], float]


@attrs.frozen
class Conclusion:
    """What :func:`conclude` did: the promotion decision (None without a holdout) and the
    lineage record written."""

    decision: Decision | None
    record: LineageRecord


def started_by(default: str) -> str:
    """Who or what started the iteration: ``$TRACKER_CORE_TASK_ID`` (the task service sets it
    for a task's jobs) as ``task <id>``, else ``default``."""
    task = os.environ.get("TRACKER_CORE_TASK_ID")
    return f"task {task}" if task else default


def conclude(
    tracker: Tracker,
    experiment: ExperimentRecord,
    *,
    start_run_id: str,
    holdout: Holdout | None,
    by: str,
) -> Conclusion:
    """Gate the iteration's best model on ``holdout`` (if given) and write its lineage record.
    ``by`` names who or what ran it (a task id, a host)."""
    best = tracker.models.best_run(experiment.experiment_id)
    decision = None
    if holdout is not None and best is not None:

        def score(run: RunRecord) -> float:
            return holdout(tracker.load(run))

        decision = tracker.promoter.gate(best, score, by=by)
    record = _record(tracker, experiment, best, start_run_id, decision, by)
    tracker.lineage.write(record)
    return Conclusion(decision, record)


def promote(
    tracker: Tracker,
    holdout: Holdout | None = None,
    *,
    start_run_id: str | None = None,
    by: str | None = None,
) -> Conclusion:
    """:func:`conclude` the tracker's current iteration; it started from ``start_run_id``,
    by default the iteration's ``run_id``, else the champion's run, else the last model's,
    else the initial model's (see ``ExperimentsManager.promote``)."""
    with tracker.lock:
        experiment = tracker.require_iteration()
        iteration = tracker.iteration
        start = start_run_id or (iteration.run_id if iteration else None)
        if start is None:  # each looked up only if the one before gives none
            champion = tracker.promoter.serving()
            start = champion.run_id if champion else None
            if not start:
                last = tracker.last_model()
                start = last[1].run_id if last else None
            if not start:
                initial = tracker.initial.run()
                start = initial.run_id if initial else ""
        return conclude(
            tracker,
            experiment,
            start_run_id=start,
            holdout=holdout,
            by=by or started_by(tracker.leases.owner),
        )


def _record(
    tracker: Tracker,
    experiment: ExperimentRecord,
    best: RunRecord | None,
    start_run_id: str,
    decision: Decision | None,
    by: str,
) -> LineageRecord:
    settings = tracker.settings
    runs = sorted(
        tracker.iterations.runs(experiment.experiment_id), key=lambda r: (r.start_time_ms, r.run_id)
    )
    initial = tracker.initial.marked_run()
    promoter = tracker.promoter
    start_version = None
    if promoter.available:
        found = promoter.registry.search_versions(promoter.name, start_run_id)
        start_version = found[0].version if found else None
    outcome = decision.outcome.value if decision else ("failed" if best is None else None)
    return LineageRecord(
        plugin_name=settings.plugin_name,
        iteration=experiment.name,
        experiment_id=experiment.experiment_id,
        batch_id=experiment.tags.get(T.TAG_BATCH, ""),
        created_ms=experiment.creation_time_ms,
        completed_ms=tracker.leases.clock.now_ms(),
        start_run_id=start_run_id,
        started_from_initial=initial is not None and initial.run_id == start_run_id,
        main_metric=settings.main_metric,
        is_loss=settings.is_loss,
        runs=[_summary(r, settings.main_metric) for r in runs],
        best_run_id=best.run_id if best else None,
        best_metric=best.metrics.get(settings.main_metric) if best else None,
        started_by=by,
        start_version=start_version,
        holdout=decision.holdout if decision else None,
        champion_holdout=decision.champion_holdout if decision else None,
        decision=outcome,
        registered_model=decision.registered_model if decision else None,
        version=decision.version if decision else None,
        model_files=(sha256_of(best) or {}) if best else {},
    )


def _summary(run: RunRecord, metric: str) -> dict[str, Any]:
    params = {
        k[len(PARAM_PREFIX) :]: v for k, v in run.params.items() if k.startswith(PARAM_PREFIX)
    }
    return {
        "run_id": run.run_id,
        "params": params,
        "status": run.status.value,
        "metric": None if run.status == RunStatus.FAILED else run.metrics.get(metric),
        "has_model": is_marked(run),
    }


def start_run(tracker: Tracker, policy: str, last_best: RunRecord) -> RunRecord:
    """The run the next iteration starts from: the champion's (policy ``"champion"``, when
    there is one whose model is servable) or ``last_best``, the last iteration's best."""
    if policy not in START_FROM:
        raise ValueError(f"start_from must be one of {START_FROM}, got {policy!r}")
    if policy == "champion":
        champion = tracker.promoter.serving()
        run = champion.run if champion is not None else None
        if run is not None and is_marked(run) and run.status == RunStatus.FINISHED:
            if run.run_id != last_best.run_id:
                log.info("starting from the champion (run %s)", run.run_id)
            return run
    return last_best
