"""How runs are ranked: by the final value of the main metric, in the direction ``is_loss`` gives.

One definition serves the best-model rule, the best quality and the top params, so all three
always agree, ties included.
"""

from __future__ import annotations

import attrs

from tracker_core.stores import RunQuery
from tracker_core.values import RunRecord, RunStatus

__all__ = ["Ranking"]


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
