"""The state the parts of :class:`~tracker_core.manager.ExperimentsManager` share, with its
accessors.

:class:`ManagerState` names what the manager's ``__init__`` builds (the stores, the concept
objects, the lock, the current iteration). Each part of the manager's public face is a mixin
over it in this package; a method one part calls from another is declared here for the type
checker only (``TYPE_CHECKING``), so each is written once, in its part.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from tracker_core.codecs import ModelFactory
from tracker_core.initial import InitialModel
from tracker_core.iterations import Iterations
from tracker_core.models import ModelKeeper
from tracker_core.params import FineTuningParams
from tracker_core.ranking import Ranking, TopRuns
from tracker_core.reconcile import Reconciler
from tracker_core.remote import Remote
from tracker_core.retry import RetryConfig
from tracker_core.runs import RunTracker
from tracker_core.stores import ArtifactStore, TrackingStore
from tracker_core.values import ExperimentRecord, FineTuningIteration, RunRecord

__all__ = ["ManagerState"]


class ManagerState:
    """What every part of the manager reads (set by ``ExperimentsManager.__init__``)."""

    _remote: Remote
    _runs: RunTracker
    _iterations: Iterations
    _initial: InitialModel
    _reconcile: Reconciler
    _top: TopRuns
    _lock: threading.RLock
    _iteration: FineTuningIteration | None
    _experiment: ExperimentRecord | None
    _main_metric: str
    _plugin_name: str
    _is_loss: bool
    models: ModelKeeper
    ranking: Ranking
    keep: int
    n_top_runs: int
    requirements: list[str] | None
    retry_config: RetryConfig
    model_factory: ModelFactory | None
    params_type: type[FineTuningParams] | None
    model_format: str
    tracking_uri: str | None

    # ------------------------------------------------------------------ accessors
    @property
    def tracking(self) -> TrackingStore:
        """The tracking store (runs, params, metrics, tags)."""
        return self._remote.tracking

    @tracking.setter
    def tracking(self, store: TrackingStore) -> None:  # tests wrap it to inject faults
        self._remote.tracking = self.models.tracking = store

    @property
    def artifacts(self) -> ArtifactStore:
        """The artifact store (model files)."""
        return self._remote.artifacts

    @artifacts.setter
    def artifacts(self, store: ArtifactStore) -> None:
        self._remote.artifacts = self.models.artifacts = store

    @property
    def is_loss(self) -> bool:
        """True if the main metric is a loss (lower is better)."""
        return self._is_loss

    @property
    def main_metric(self) -> str:
        return self._main_metric

    @property
    def plugin_name(self) -> str:
        return self._plugin_name

    @property
    def lease_seconds(self) -> float:
        return self._runs.lease_seconds

    @property
    def current_iteration(self) -> FineTuningIteration | None:
        return self._iteration

    @property
    def current_experiment_id(self) -> str | None:
        return self._experiment.experiment_id if self._experiment else None

    @property
    def current_run_id(self) -> str | None:
        return self._runs.run.run_id if self._runs.run else None

    def _fix_name(self, name: str) -> str:
        """Prefix a name with the plugin name: ``"<plugin> / <name>"``."""
        return f"{self._plugin_name} / {name}"

    if TYPE_CHECKING:  # written in one part, called from another

        def flush_metrics(self) -> None: ...
        def finish_iteration(self) -> None: ...
        def finish_run(self, as_failed: bool = False) -> None: ...
        def _require_iteration(self) -> ExperimentRecord: ...
        def _get_run(self, run_id: str) -> RunRecord: ...
        def get_run_by_id(self, run_id: str, models_only: bool = False) -> RunRecord | None: ...
        def _end_run_implicitly(self) -> None: ...
        def get_last_model_run(self) -> RunRecord | None: ...
