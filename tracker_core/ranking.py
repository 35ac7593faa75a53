"""How runs are ranked: by the final value of the main metric, in the direction ``is_loss`` gives.

One definition serves the best-model rule, the best quality and the top params, so all three
always agree, ties included. :class:`TopRuns` makes the two selections among FINISHED runs:
an iteration's best quality, and the params the next iteration starts from.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from tracker_core import tags as T
from tracker_core.errors import ConfigurationError
from tracker_core.params import FineTuningParams
from tracker_core.registry import import_object
from tracker_core.stores import RunQuery, TrackingStore
from tracker_core.values import RunRecord, RunStatus

__all__ = ["Ranking", "TopRuns", "params_type_of"]


@attrs.frozen
class Ranking:
    """Orders runs best first. ``metric`` is the main metric; lower is better when ``is_loss``."""

    metric: str
    is_loss: bool = False

    def key(self, run: RunRecord) -> tuple[int, float, int, str]:
        """Sort key, best first: FAILED or metric-less runs last, then the metric's final
        value, then the earlier run, then the run id (a deterministic tie-break)."""
        value = run.metrics.get(self.metric)
        if value is None or run.status == RunStatus.FAILED:
            return (1, 0.0, run.start_time_ms, run.run_id)
        return (0, value if self.is_loss else -value, run.start_time_ms, run.run_id)

    def best_first(self, runs: list[RunRecord]) -> list[RunRecord]:
        return sorted(runs, key=self.key)

    def finished_query(self, experiment_id: str, limit: int) -> RunQuery:
        """The ``limit`` best FINISHED runs that logged the metric, ordered by the server."""
        return RunQuery(
            (experiment_id,),
            statuses=(RunStatus.FINISHED,),
            has_metric=self.metric,
            order_by_metric=self.metric,
            ascending=self.is_loss,
            max_results=limit,
        )

    @property
    def worst_value(self) -> float:
        return float("inf") if self.is_loss else float("-inf")


def params_type_of(
    runs: Sequence[RunRecord], *preferred: type[FineTuningParams] | None
) -> type[FineTuningParams]:
    """The first of ``preferred`` given, else the params type the runs recorded (a tag)."""
    given = next((cls for cls in preferred if cls is not None), None)
    if given is not None:
        return given
    path = next((r.tags[T.TAG_PARAMS_TYPE] for r in runs if r.tags.get(T.TAG_PARAMS_TYPE)), None)
    if path is None:
        raise ConfigurationError("cannot tell the params type: pass params_type=")
    obj = import_object(path)
    if not (isinstance(obj, type) and issubclass(obj, FineTuningParams)):
        raise ConfigurationError(f"{path} is not a FineTuningParams subclass")
    return obj


class TopRuns:
    """The best FINISHED runs of an experiment that logged the main metric (one query,
    ordered by the server, then by :class:`Ranking`), whether or not they still hold a model."""

    def __init__(self, tracking: TrackingStore, ranking: Ranking) -> None:
        self._tracking = tracking
        self.ranking = ranking

    def finished(self, experiment_id: str, limit: int) -> list[RunRecord]:
        """The best ``limit`` FINISHED runs that logged the main metric, best first."""
        query = self.ranking.finished_query(experiment_id, limit)
        return self.ranking.best_first(self._tracking.search_runs(query))

    def best_quality(self, experiment_id: str, limit: int) -> tuple[str | None, float]:
        """The best run and its final value of the main metric; ``(None, worst value)``."""
        runs = self.finished(experiment_id, limit)
        if not runs:
            return None, self.ranking.worst_value
        return runs[0].run_id, float(runs[0].metrics[self.ranking.metric])

    def params(
        self, experiment_id: str, limit: int, *preferred: type[FineTuningParams] | None
    ) -> list[FineTuningParams] | None:
        """The params of the best ``limit`` runs, best first, typed as
        :func:`params_type_of` says; None if there are none."""
        runs = self.finished(experiment_id, limit)
        if not runs:
            return None
        cls = params_type_of(runs, *preferred)
        return [cls.from_mlflow(r.params) for r in runs]
