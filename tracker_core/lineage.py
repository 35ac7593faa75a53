"""Lineage: where a model came from, long after its iteration was cleaned up.

Each iteration, once complete, writes one :class:`LineageRecord`: its batch, the model it
started from (run, and registered version if it was one), the params sets it tried and how
each ended, its best run and main metric, the holdout scores and the promotion decision, the
SHA-256 of the best model's files, when, and who or what started it (a task id).

**Where records live, and why there.** In the tracking store, in one experiment per plugin,
``<plugin> / lineage`` (tag ``tracker.kind`` = ``lineage``): one FINISHED run per iteration,
named ``iteration <experiment id>``, the record as JSON in its tags (split in parts of 7,000
characters, below MLflow's 8,000 per tag value) and its scores as metrics. That experiment is
no iteration: no cleanup of tracker-core lists or deletes it (``delete_previous_iteration``,
the driver's step 7 and ``tracker-core gc`` touch iteration experiments and model folders
only), and MLflow's ``gc`` purges only what was deleted, so the record outlives its
iteration, its runs and its model files. It needs nothing but the tracking store (no model
files, no registry: rejected challengers and failed iterations are recorded too, which a
registered version could not hold), it is one filtered query to read, and in the MLflow UI the
lineage experiment charts the holdout and batch metric across iterations, which the
iterations' own experiments cannot. A registered version (:mod:`tracker_core.promotion`) also
carries a few of these as tags (run, iteration, batch, holdout), pointing back here.

Writing is idempotent: a repeated completion rewrites the same run (found by name; two
workers creating it at once agree on one, as for any run, :meth:`RunTracker.get_or_create`).
:meth:`Lineage.chain` walks records from a run back to the initial model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from tracker_core import tags as T
from tracker_core.errors import ModelNotFoundError
from tracker_core.iterations import Iterations
from tracker_core.runs import RunTracker
from tracker_core.stores import RunQuery, TrackingStore
from tracker_core.values import ExperimentRecord, MetricValue, RunRecord, RunStatus

__all__ = ["KIND_LINEAGE", "Lineage", "LineageRecord"]

log = logging.getLogger(__name__)

KIND_LINEAGE = "lineage"
TAG_ITERATION = "tracker.lineage.iteration"
TAG_RECORD = "tracker.lineage.record"
TAG_PARTS = "tracker.lineage.parts"
_PART = 7000


def _tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value)


def _dict(value: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(value or {})


@attrs.frozen
class LineageRecord:
    """What one iteration was (see the module docstring). ``runs`` lists each params set
    tried: ``{"run_id", "params", "status", "metric"}``. ``decision`` is ``"promoted"`` or
    ``"rejected"`` (the holdout gate), ``"failed"`` (no run succeeded), or None (no
    promotion configured)."""

    plugin_name: str
    iteration: str
    experiment_id: str
    batch_id: str
    created_ms: int
    completed_ms: int
    start_run_id: str
    started_from_initial: bool
    main_metric: str
    is_loss: bool
    runs: tuple[Mapping[str, Any], ...] = attrs.field(converter=_tuple)
    best_run_id: str | None
    best_metric: float | None
    started_by: str
    start_version: str | None = None
    holdout: float | None = None
    champion_holdout: float | None = None
    decision: str | None = None
    registered_model: str | None = None
    version: str | None = None
    model_files: Mapping[str, str] = attrs.field(factory=dict, converter=_dict)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=False) | {
            "runs": [dict(r) for r in self.runs],
            "model_files": dict(self.model_files),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LineageRecord:
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def metrics(self) -> list[MetricValue]:
        """Its scores as metrics of its lineage run (one point each, at the iteration's time)."""
        values = {
            self.main_metric: self.best_metric,
            "holdout": self.holdout,
            "champion_holdout": self.champion_holdout,
        }
        if self.decision in ("promoted", "rejected"):
            values["promoted"] = float(self.decision == "promoted")
        return [
            MetricValue(name, float(value), step=0, timestamp_ms=self.created_ms)
            for name, value in values.items()
            if value is not None
        ]


def _parts(record: LineageRecord) -> dict[str, str]:
    text = json.dumps(record.to_json(), sort_keys=True, separators=(",", ":"), default=str)
    chunks = [text[i : i + _PART] for i in range(0, len(text), _PART)] or [""]
    return {TAG_PARTS: str(len(chunks))} | {
        f"{TAG_RECORD}.{i}": chunk for i, chunk in enumerate(chunks)
    }


def _record_of(run: RunRecord) -> LineageRecord | None:
    """The record a lineage run holds; None if it is incomplete (its writer died)."""
    try:
        count = int(run.tags.get(TAG_PARTS, ""))
        text = "".join(run.tags[f"{TAG_RECORD}.{i}"] for i in range(count))
        return LineageRecord.from_json(json.loads(text))
    except (KeyError, ValueError, TypeError) as exc:
        log.warning("lineage run %s holds no complete record (%s)", run.run_id, exc)
        return None


class Lineage:
    """The lineage records of one plugin (see the module docstring). Holds no mutable state
    but the lineage experiment's record."""

    def __init__(self, tracking: TrackingStore, iterations: Iterations, runs: RunTracker) -> None:
        self._tracking, self._iterations, self._runs = tracking, iterations, runs

    @property
    def name(self) -> str:
        return f"{self._iterations.plugin_name} / {KIND_LINEAGE}"

    def experiment(self, create: bool = False) -> ExperimentRecord | None:
        """The lineage experiment (created if ``create``); None if there is none yet."""
        return self._iterations.plugin_experiment(KIND_LINEAGE, KIND_LINEAGE, create)

    def write(self, record: LineageRecord) -> str:
        """Write (or rewrite) the record of its iteration; returns its lineage run's id."""
        experiment = self.experiment(create=True)
        assert experiment is not None
        tags = {
            T.TAG_PLUGIN: record.plugin_name,
            T.TAG_KIND: KIND_LINEAGE,
            TAG_ITERATION: record.experiment_id,
        }
        run, _ = self._runs.get_or_create(
            experiment.experiment_id, f"iteration {record.experiment_id}", tags
        )
        self._tracking.log_batch(run.run_id, record.metrics(), None, tags | _parts(record))
        if run.status != RunStatus.FINISHED:
            self._tracking.set_terminated(run.run_id, RunStatus.FINISHED)
        log.info("lineage of iteration %r recorded (run %s)", record.iteration, run.run_id)
        return run.run_id

    def records(self) -> list[LineageRecord]:
        """Every complete record, in the order the iterations were created."""
        experiment = self.experiment()
        if experiment is None:
            return []
        query = RunQuery(
            (experiment.experiment_id,),
            statuses=(RunStatus.FINISHED,),
            tags={T.TAG_KIND: KIND_LINEAGE},
        )
        by_iteration: dict[str, LineageRecord] = {}
        for run in sorted(self._tracking.search_runs(query), key=lambda r: r.start_time_ms):
            record = _record_of(run)
            if record is not None:
                by_iteration.setdefault(record.experiment_id, record)
        return sorted(by_iteration.values(), key=lambda r: (r.created_ms, int(r.experiment_id)))

    def record_of(self, experiment_id: str) -> LineageRecord | None:
        """The record of one iteration, if written."""
        return next((r for r in self.records() if r.experiment_id == experiment_id), None)

    @staticmethod
    def chain(records: Sequence[LineageRecord], run_id: str) -> list[LineageRecord]:
        """The records from the iteration that made ``run_id``'s model back to the one that
        started from the initial model, newest first. Raises :class:`ModelNotFoundError` if
        no record knows the run."""
        made_by: dict[str, LineageRecord] = {}
        for record in records:  # a run is found as its iteration's best, else among its runs
            for run in record.runs:
                made_by.setdefault(str(run["run_id"]), record)
        made_by.update({r.best_run_id: r for r in records if r.best_run_id})
        found = made_by.get(run_id)
        if found is None:
            raise ModelNotFoundError(f"no lineage record knows run {run_id}")
        out: list[LineageRecord] = []
        while found is not None and found not in out:
            out.append(found)
            if found.started_from_initial:
                break
            found = made_by.get(found.start_run_id)
        return out
