"""Stopping a run that is clearly worse than its iteration's others at the same step, with an
Optuna pruner fed from the tracking store: :class:`RunPruning`.

A run's *intermediate values* are the values it logs of one metric (the main metric unless told
otherwise), by step, through the usual ``save_metric``. To decide,
:meth:`RunPruning.should_prune` sends the run's queued values, reads every run of the iteration
from the tracking store (status and that metric's history; ended runs once, then cached),
builds a throw-away in-memory Optuna study of them (FINISHED -> COMPLETE, pruned -> PRUNED,
FAILED -> FAIL, unfinished -> RUNNING; numbered in the plan's order, so every process numbers
them alike) and asks the pruner about the current run. Runs trained by other processes or hosts
count as soon as their values reach the store. What a pruner keeps about a trial between
decisions (Optuna's trial system attributes: successive halving's rungs) is kept as the run's
tags ``tracker.pruner.<key>``, so a pruner's memory lives in the tracking store too.

A pruned run (:meth:`RunPruning.prune`) ends **KILLED** with the tag ``tracker.pruned=true``
(and the step and value it stopped at): distinct from FAILED and FINISHED, it never becomes
the best (only FINISHED runs rank), never keeps a model (the model of a run that did not end
FINISHED is deleted, as for a FAILED one), is skipped on resume (it has ended), and feeds the
search's history as a pruned trial. The tag is written before the status, so a crash between
the two leaves a RUNNING run marked pruned, which the driver ends KILLED without training it
again when it resumes.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tracker_core import tags as T
from tracker_core.errors import NoActiveRunError
from tracker_core.manager import ExperimentsManager
from tracker_core.quiet import quiet
from tracker_core.search import optuna_module
from tracker_core.values import RunRecord, RunStatus

if TYPE_CHECKING:
    from optuna.pruners import BasePruner
    from optuna.trial import FrozenTrial

__all__ = ["RunPruning", "end_pruned", "is_pruned"]

log = logging.getLogger(__name__)


def is_pruned(run: RunRecord) -> bool:
    """Whether the run was stopped by a pruner (KILLED, or about to be: see the module)."""
    return run.tags.get(T.TAG_PRUNED) == T.TRUE


def end_pruned(manager: ExperimentsManager, last: tuple[int, float] | None = None) -> None:
    """End the manager's current run as pruned: tagged (with the ``(step, value)`` it
    stopped at, if known), then KILLED; its model, if it saved one, is deleted."""
    run_id = manager.current_run_id
    if run_id is None:
        raise NoActiveRunError("end_pruned() needs a current run")
    tags = {T.TAG_PRUNED: T.TRUE}
    if last is not None:
        tags[T.TAG_PRUNED_STEP] = str(last[0])
        tags[T.TAG_PRUNED_VALUE] = repr(last[1])
    manager.tracking.set_tags(run_id, tags)
    manager.tracker.end_run(RunStatus.KILLED)


class RunPruning:
    """Pruning decisions for the manager's current run (see the module docstring).

    ``metric`` holds the intermediate values (None: the main metric), lower is better when
    ``is_loss`` (None: as the main metric). ``order`` lists the params ids of the iteration's
    planned sets: trials are numbered in that order (the others after, by start time), so
    every process sees the same study. The pruner is deep-copied for every decision, so each
    decision is made as a fresh process would make it.
    """

    def __init__(
        self,
        manager: ExperimentsManager,
        pruner: BasePruner,
        *,
        metric: str | None = None,
        is_loss: bool | None = None,
        order: Sequence[str] = (),
    ) -> None:
        self._manager, self._pruner = manager, pruner
        self.metric = metric or manager.main_metric
        self.is_loss = manager.is_loss if is_loss is None else is_loss
        self._order = {params_id: i for i, params_id in enumerate(order)}
        self._ended: dict[str, dict[int, float]] = {}
        #: (step, value) of the current run at the last decision
        self.last: tuple[int, float] | None = None

    def should_prune(self) -> bool:
        """Whether the pruner stops the current run at its last reported step (False while
        it reported no value of the metric)."""
        manager = self._manager
        run_id = manager.current_run_id
        experiment_id = manager.current_experiment_id
        if run_id is None or experiment_id is None:
            raise NoActiveRunError("should_prune() needs a current run: call set_run first")
        manager.flush_metrics()
        runs = sorted(manager.get_runs(experiment_id), key=self._position)
        current = next((r for r in runs if r.run_id == run_id), None)
        if current is None:
            return False
        own = self._values(current)
        if not own:
            return False
        step = max(own)
        self.last = (step, own[step])
        optuna = optuna_module()
        storage = optuna.storages.InMemoryStorage()
        direction = optuna.study.StudyDirection
        with quiet("optuna.storages._in_memory", lambda r: r.levelno <= logging.INFO):
            study_id = storage.create_new_study(
                [direction.MINIMIZE if self.is_loss else direction.MAXIMIZE],
                f"tracker-core-{experiment_id}",
            )
        trial_id = -1
        for run in runs:
            made = storage.create_new_trial(study_id, template_trial=self._trial(run))
            if run.run_id == run_id:
                trial_id = made
        study = optuna.Study(f"tracker-core-{experiment_id}", storage, pruner=self._pruner)
        before = storage.get_trial(trial_id)
        decision = bool(copy.deepcopy(self._pruner).prune(study, before))
        self._keep_memory(run_id, before.system_attrs, storage.get_trial(trial_id).system_attrs)
        if decision:
            log.info("run %s: pruned at step %d (%s=%s)", run_id, step, self.metric, own[step])
        return decision

    def prune(self) -> None:
        """End the current run as pruned (see :func:`end_pruned`), at its last decision."""
        end_pruned(self._manager, self.last)

    # ------------------------------------------------------------------ the study
    def _position(self, run: RunRecord) -> tuple[int, int, str]:
        return (self._order.get(run.run_name, len(self._order)), run.start_time_ms, run.run_id)

    def _values(self, run: RunRecord) -> dict[int, float]:
        """The run's intermediate values by step (the latest value of a step logged twice,
        as by a resumed run); cached once the run ended."""
        if run.run_id in self._ended:
            return self._ended[run.run_id]
        values: dict[int, float] = {}
        for point in self._manager.tracking.get_metric_history(run.run_id, self.metric):
            values[point.step or 0] = point.value
        if run.status.is_terminal:
            self._ended[run.run_id] = values
        return values

    def _trial(self, run: RunRecord) -> FrozenTrial:
        optuna = optuna_module()
        state = optuna.trial.TrialState
        values = self._values(run) if run.status != RunStatus.FAILED else {}
        value: float | None = None
        if run.status == RunStatus.FINISHED:
            trial_state = state.COMPLETE
            final = run.metrics.get(self._manager.main_metric)
            if self.metric != self._manager.main_metric or final is None:
                final = values[max(values)] if values else 0.0
            value = final
        elif run.status == RunStatus.KILLED:
            trial_state = state.PRUNED
        elif run.status == RunStatus.FAILED:
            trial_state = state.FAIL
        else:
            trial_state = state.RUNNING
        start = dt.datetime.fromtimestamp(run.start_time_ms / 1000, dt.UTC)
        trial: FrozenTrial = optuna.trial.FrozenTrial(
            number=-1,
            trial_id=-1,
            state=trial_state,
            value=value,
            values=None,
            datetime_start=start,
            datetime_complete=None if trial_state == state.RUNNING else start,
            params={},
            distributions={},
            user_attrs={"run_id": run.run_id},
            system_attrs=_memory(run.tags),
            intermediate_values=values,
        )
        return trial

    def _keep_memory(
        self, run_id: str, before: Mapping[str, Any], after: Mapping[str, Any]
    ) -> None:
        """Store what the pruner wrote about the current trial as the run's tags."""
        changed = {k: v for k, v in after.items() if k not in before or before[k] != v}
        if changed:
            self._manager.tracking.set_tags(
                run_id, {T.TAG_PRUNER_PREFIX + k: json.dumps(v) for k, v in changed.items()}
            )


def _memory(tags: Mapping[str, str]) -> dict[str, Any]:
    """A run's pruner memory (its ``tracker.pruner.*`` tags) as trial system attributes."""
    out: dict[str, Any] = {}
    for key, text in tags.items():
        if key.startswith(T.TAG_PRUNER_PREFIX):
            try:
                out[key[len(T.TAG_PRUNER_PREFIX) :]] = json.loads(text)
            except ValueError:
                continue
    return out
