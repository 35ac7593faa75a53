"""What an iteration and its runs ended as: :class:`RunResult` (one params set),
:class:`IterationResult` (one call of the driver, or of the completion step), and
:class:`IterationProgress` (how far an iteration is, for ``on_progress``).

``_collect`` reads the :class:`RunResult` of each params set from the tracking store; one run
(:mod:`.run`) and the completion (:mod:`.completion`) both report with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from tracker_core import tags as T
from tracker_core.errors import ModelNotFoundError, redact
from tracker_core.manager import ExperimentsManager
from tracker_core.params import FineTuningParams
from tracker_core.promotion import Decision
from tracker_core.values import RunStatus

__all__ = ["IterationProgress", "IterationResult", "RunResult"]

#: the statuses whose main metric counts (a FAILED or pruned run's does not)
_RANKED = (RunStatus.FINISHED, RunStatus.RUNNING, RunStatus.SCHEDULED)


@attrs.frozen
class RunResult:
    """One params set of an iteration and how its run ended.

    ``trained`` is False when the run had finished in an earlier attempt and was skipped;
    ``has_model`` tells whether the run holds a stored model at the end of the iteration;
    ``pruned``: the search's pruner stopped it (KILLED; never the best, never a model).
    """

    params: FineTuningParams
    run_id: str
    status: RunStatus
    metric: float | None
    trained: bool
    has_model: bool
    error: str | None = None
    pruned: bool = False

    @property
    def succeeded(self) -> bool:
        return self.status == RunStatus.FINISHED and self.metric is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "params": self.params.to_dict(),
            "status": self.status.value,
            "metric": self.metric,
            "trained": self.trained,
            "has_model": self.has_model,
            "error": None if self.error is None else redact(self.error),
            "pruned": self.pruned,
        }


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
    #: the holdout gate's decision on the best model (a method with ``evaluate_holdout``)
    promotion: Decision | None = None

    @property
    def failed_runs(self) -> tuple[RunResult, ...]:
        return tuple(r for r in self.runs if r.status == RunStatus.FAILED)

    @property
    def trained_runs(self) -> tuple[RunResult, ...]:
        return tuple(r for r in self.runs if r.trained)

    @property
    def pruned_runs(self) -> tuple[RunResult, ...]:
        return tuple(r for r in self.runs if r.pruned)

    def to_json(self) -> dict[str, Any]:
        """The one JSON view of a result: ``tracker-core run --json`` prints it, and a task of
        the service ends ``done`` with it as its ``result``. ``runs`` lists every params set
        (as :meth:`RunResult.to_json`); ``trained_runs`` counts those trained by this call;
        ``failed_runs`` repeats the failed ones' id, params and error, ``pruned_runs`` the
        pruned ones' id and params; ``promotion`` is the holdout gate's decision
        (:meth:`~tracker_core.decisions.Decision.to_json`, both scores and the outcome) or
        None."""
        return {
            "plugin": self.plugin_name,
            "iteration": self.iteration_name,
            "experiment_id": self.experiment_id,
            "batch_id": self.batch_id,
            "main_metric": self.main_metric,
            "is_loss": self.is_loss,
            "start_run_id": self.start_run_id,
            "started_from_initial": self.started_from_initial,
            "resumed": self.resumed,
            "best_run_id": self.best_run_id,
            "best_metric": self.best_metric,
            "best_model_uri": self.best_model_uri,
            "deleted_iteration_id": self.deleted_iteration_id,
            "promotion": None if self.promotion is None else self.promotion.to_json(),
            "runs": [r.to_json() for r in self.runs],
            "trained_runs": len(self.trained_runs),
            "failed_runs": [
                {k: v for k, v in r.to_json().items() if k in ("run_id", "params", "error")}
                for r in self.failed_runs
            ],
            "pruned_runs": [
                {k: v for k, v in r.to_json().items() if k in ("run_id", "params")}
                for r in self.pruned_runs
            ],
        }


@attrs.frozen
class IterationProgress:
    """How far an iteration is: ``finished`` of ``planned`` runs have ended (trained in this
    call, or finished in an earlier one), ``failed`` of them failed and ``pruned`` of them
    were pruned in this call."""

    planned: int
    finished: int
    failed: int
    pruned: int = 0


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
                metric=metric if run.status in _RANKED else None,
                trained=trained,
                has_model=run.tags.get(T.TAG_MODEL_UPLOADED) == T.TRUE,
                error=error,
                pruned=run.status == RunStatus.KILLED and run.tags.get(T.TAG_PRUNED) == T.TRUE,
            )
        )
    return out
