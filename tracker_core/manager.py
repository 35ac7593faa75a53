"""ExperimentsManager: iterations, runs, metrics and the best model, written once for every backend.

The manager talks to a :class:`~tracker_core.stores.TrackingStore` and an
:class:`~tracker_core.stores.ArtifactStore` only, and wraps every call to them in the one
retry policy. Names and semantics follow the seed's ``ExperimentsManager`` API.

Thread-safety: a manager tracks one iteration and one run at a time; its methods are
serialised by a lock, so sharing one manager between threads is safe but runs their work one
after another. For concurrent runs, use one manager per thread or process: managers share no
state (no MLflow fluent API, no globals).
"""

from __future__ import annotations

import atexit
import logging
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tracker_core import tags as T
from tracker_core.accumulators import MetricsAccumulator
from tracker_core.codecs import ModelFactory, get_codec
from tracker_core.errors import (
    ConfigurationError,
    InvalidMetricError,
    ModelNotFoundError,
    NoActiveIterationError,
    NoActiveRunError,
    TrackerError,
)
from tracker_core.leases import DEFAULT_LEASE_SECONDS
from tracker_core.metrics import MetricsBuffer
from tracker_core.models import (
    MissingModel,
    MissingScan,
    ModelKeeper,
    OrphanedModel,
    OrphanedUpload,
    OrphanScan,
    is_marked,
)
from tracker_core.params import FineTuningParams
from tracker_core.ranking import Ranking
from tracker_core.registry import get_backend, import_object, scheme_of
from tracker_core.retry import Retrier, RetryConfig
from tracker_core.stores import ArtifactStore, ExperimentQuery, RunQuery, TrackingStore
from tracker_core.values import (
    INITIAL_EXPERIMENT_NAME,
    INITIAL_RUN_NAME,
    ExperimentRecord,
    FineTuningIteration,
    MetricValue,
    RunRecord,
    RunStatus,
    validate_name,
)

__all__ = [
    "DEFAULT_ARTIFACT_URI",
    "DEFAULT_TRACKING_URI",
    "ExperimentsManager",
    "OrphanScan",
    "OrphanedModel",
]

log = logging.getLogger(__name__)
P = TypeVar("P", bound=FineTuningParams)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACT_URI = "mlartifacts"
_UNFINISHED = (RunStatus.RUNNING, RunStatus.SCHEDULED)

_live_managers: weakref.WeakSet[ExperimentsManager] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for manager in list(_live_managers):
        try:
            manager.flush_metrics()
        except Exception:
            log.exception("could not flush metrics of %r at exit", manager)


def _resolve_tracking_uri(tracking_uri: str | None) -> str:
    import os

    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class ExperimentsManager:
    """Fine-tuning experiment management over a tracking store and an artifact store.

    Every fine-tuning iteration is an experiment named after :class:`FineTuningIteration`;
    every params set tried in it is a run whose identity is the params' hash. Only the best
    ``keep`` models of an iteration are kept (ranked by the final value of ``main_metric``,
    lower is better when ``is_loss``); the initial model lives in its own experiment and is
    never removed by iteration cleanup.

    Args:
        tracking_uri: MLflow tracking URI; default ``$MLFLOW_TRACKING_URI``, else
            ``sqlite:///mlflow.db``.
        main_metric: the metric that ranks runs.
        plugin_name: the fine-tuning method's name; prefixes every experiment name.
        accumulators: derived series to log (mean, sliding mean, min, max).
        is_loss: True if lower ``main_metric`` is better.
        n_top_runs: how many params sets :meth:`get_top_params` returns.
        requirements: pip requirements recorded with models (MLflow format).
        retry_config: per-operation retry attempts and waits.
        artifact_uri: where models live; its scheme picks the backend.
        keep: how many best models an iteration keeps.
        model_format: ``"mlflow.pytorch"`` (default when the backend offers it) or ``"state_dict"``.
        model_factory: builds an empty model, for formats that store weights only.
        params_type: the :class:`FineTuningParams` subclass :meth:`get_top_params` returns.
        tracking_store / artifact_store: ready stores (tests, third-party setups).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        main_metric: str = "",
        plugin_name: str = "",
        accumulators: Iterable[MetricsAccumulator] = (),
        is_loss: bool = False,
        n_top_runs: int = 10,
        requirements: Sequence[str] | None = None,
        retry_config: RetryConfig | None = None,
        *,
        artifact_uri: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        keep: int = 1,
        model_format: str | None = None,
        model_factory: ModelFactory | None = None,
        params_type: type[FineTuningParams] | None = None,
        tracking_store: TrackingStore | None = None,
        artifact_store: ArtifactStore | None = None,
    ) -> None:
        if not isinstance(main_metric, str) or not main_metric.strip():
            raise InvalidMetricError(f"main_metric must be a non-empty string, got {main_metric!r}")
        validate_name(main_metric, "main_metric")
        validate_name(plugin_name, "plugin_name")
        if n_top_runs < 1:
            raise ConfigurationError(f"n_top_runs must be >= 1, got {n_top_runs}")
        if keep < 1:
            raise ConfigurationError(f"keep must be >= 1, got {keep}")
        self._main_metric = main_metric
        self._plugin_name = plugin_name
        self._is_loss = bool(is_loss)
        self.n_top_runs = n_top_runs
        self.requirements = list(requirements) if requirements else None
        self.retry_config = retry_config or RetryConfig()
        self.keep = keep
        self.model_factory = model_factory
        self.params_type = params_type

        backend = None
        if tracking_store is None or artifact_store is None:
            backend = get_backend(scheme_of(artifact_uri or DEFAULT_ARTIFACT_URI))
        retrier = Retrier(self.retry_config)
        if artifact_store is None:
            assert backend is not None
            artifact_store = backend.artifact_store(
                artifact_uri or DEFAULT_ARTIFACT_URI,
                storage_options=storage_options,
                retrier=retrier,
            )
        if tracking_store is None:
            assert backend is not None
            tracking_store = backend.tracking_store(
                _resolve_tracking_uri(tracking_uri), retrier=retrier
            )
        self._tracking: TrackingStore = tracking_store
        self._artifacts: ArtifactStore = artifact_store
        self.tracking_uri = getattr(tracking_store, "uri", tracking_uri)
        self.model_format = model_format or (
            backend.default_model_format if backend is not None else "state_dict"
        )
        get_codec(self.model_format)  # unknown formats fail here, before anything is written
        self._t = retrier.with_classifiers(tracking_store.classify_error)
        self._a = retrier.with_classifiers(artifact_store.classify_error)
        self.ranking = Ranking(main_metric, self._is_loss)
        self.models = ModelKeeper(
            tracking_store, artifact_store, self.ranking, track=self._track, art=self._art
        )

        self._lock = threading.RLock()
        self._iteration: FineTuningIteration | None = None
        self._experiment: ExperimentRecord | None = None
        self._initial_experiment: ExperimentRecord | None = None
        self._run: RunRecord | None = None
        self._run_params: FineTuningParams | None = None
        self._metrics = MetricsBuffer(accumulators)
        _live_managers.add(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_wrapper(
        cls,
        wrapper: Any,
        main_metric: str,
        plugin_name: str,
        accumulators: Iterable[MetricsAccumulator] = (),
        is_loss: bool = False,
        n_top_runs: int = 10,
        **kwargs: Any,
    ) -> ExperimentsManager:
        """A manager reusing a wrapper's tracking URI, requirements and retry configuration."""
        return cls(
            wrapper.tracking_uri,
            main_metric,
            plugin_name,
            accumulators,
            is_loss,
            n_top_runs,
            wrapper.requirements,
            wrapper.retry_config,
            **kwargs,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(plugin={self._plugin_name!r}, metric={self._main_metric!r}, "
            f"is_loss={self._is_loss}, artifacts={self.artifacts.root!r})"
        )

    def close(self) -> None:
        """Flush buffered metrics and release the stores."""
        self.flush_metrics()
        self.tracking.close()
        self.artifacts.close()

    def __enter__(self) -> ExperimentsManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ small accessors
    @property
    def tracking(self) -> TrackingStore:
        """The tracking store (runs, params, metrics, tags)."""
        return self._tracking

    @tracking.setter
    def tracking(self, store: TrackingStore) -> None:
        # one store for the manager and its model keeper (tests wrap it to inject faults)
        self._tracking = self.models.tracking = store

    @property
    def artifacts(self) -> ArtifactStore:
        """The artifact store (model files)."""
        return self._artifacts

    @artifacts.setter
    def artifacts(self, store: ArtifactStore) -> None:
        self._artifacts = self.models.artifacts = store

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
    def current_iteration(self) -> FineTuningIteration | None:
        return self._iteration

    @property
    def current_experiment_id(self) -> str | None:
        return self._experiment.experiment_id if self._experiment else None

    @property
    def current_run_id(self) -> str | None:
        return self._run.run_id if self._run else None

    def _fix_name(self, name: str) -> str:
        """Prefix a name with the plugin name: ``"<plugin> / <name>"``."""
        return f"{self._plugin_name} / {name}"

    def _track(self, operation: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self._t.call(operation, fn, *args, **kwargs)

    def _art(self, operation: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self._a.call(operation, fn, *args, **kwargs)

    def _experiment_tags(self, kind: str, batch_id: str = "") -> dict[str, str]:
        out = {T.TAG_PLUGIN: self._plugin_name, T.TAG_KIND: kind}
        if batch_id:
            out[T.TAG_BATCH] = batch_id
        return out

    def _get_or_create_experiment(self, name: str, tags: Mapping[str, str]) -> ExperimentRecord:
        existing: ExperimentRecord | None = self._track(
            "search", self.tracking.get_experiment_by_name, name
        )
        if existing is not None:
            return existing
        location = self.artifacts.experiment_location(name, uuid.uuid4().hex[:12])
        created: ExperimentRecord = self._track(
            "create", self.tracking.create_experiment, name, location, tags
        )
        log.info("created experiment %r (%s) at %s", name, created.experiment_id, location)
        return created

    # ------------------------------------------------------------------ initial model
    def _initial_experiment_name(self) -> str:
        return self._fix_name(INITIAL_EXPERIMENT_NAME)

    def _get_initial_experiment(self, create: bool = False) -> ExperimentRecord | None:
        if self._initial_experiment is None or self._initial_experiment.lifecycle_stage != "active":
            name = self._initial_experiment_name()
            if create:
                self._initial_experiment = self._get_or_create_experiment(
                    name, self._experiment_tags(T.KIND_INITIAL)
                )
            else:
                self._initial_experiment = self._track(
                    "search", self.tracking.get_experiment_by_name, name
                )
        return self._initial_experiment

    def _initial_run(self) -> RunRecord | None:
        experiment = self._get_initial_experiment()
        if experiment is None:
            return None
        return self._first_run(experiment.experiment_id, run_name=INITIAL_RUN_NAME)

    def get_initial_run_id(self) -> str | None:
        """The run id of the initial model's run, or None if it was never created."""
        run = self._initial_run()
        return run.run_id if run else None

    def is_initial_run(self, run_id: str) -> bool:
        """Whether ``run_id`` is the initial model's run."""
        return run_id is not None and run_id == self.get_initial_run_id()

    def has_initial_model(self) -> bool:
        """Whether the initial model was uploaded (completely: it is marked)."""
        run = self._initial_run()
        return run is not None and is_marked(run)

    def get_initial_model_run_id(self) -> str | None:
        """The initial model's run id; None (and an error logged) if no initial model exists."""
        run = self._initial_run()
        if run is None or not is_marked(run):
            log.error("no initial model uploaded for plugin %r", self._plugin_name)
            return None
        return run.run_id

    def upload_initial_model(self, model: Any, model_format: str | None = None) -> bool:
        """Upload the initial model once. Returns False (uploading nothing) if it already exists.

        Any ongoing iteration is finished first. The initial model survives every cleanup.
        """
        with self._lock:
            self.finish_iteration()
            experiment = self._get_initial_experiment(create=True)
            assert experiment is not None
            run = self._get_or_create_run(
                experiment.experiment_id, INITIAL_RUN_NAME, {T.TAG_PLUGIN: self._plugin_name}
            )
            if is_marked(run):
                log.info(
                    "initial model of %r already uploaded (run %s)", self._plugin_name, run.run_id
                )
                return False
            self.models.write_and_mark(
                run, model, model_format or self.model_format, self.requirements
            )
            self._track("finish_run", self.tracking.set_terminated, run.run_id, RunStatus.FINISHED)
            log.info("uploaded initial model of %r (run %s)", self._plugin_name, run.run_id)
            return True

    # ------------------------------------------------------------------ iterations
    def _iteration_query(self, exclude_current: bool = True, **extra: Any) -> ExperimentQuery:
        exclude = (self._experiment.name,) if exclude_current and self._experiment else ()
        return ExperimentQuery(
            tags=self._experiment_tags(T.KIND_ITERATION), exclude_names=exclude, **extra
        )

    def get_experiments(self) -> list[ExperimentRecord]:
        """Every iteration experiment of this plugin, newest first (the initial one excluded)."""
        query = self._iteration_query(exclude_current=False)
        return list(self._track("search", lambda: list(self.tracking.iter_experiments(query))))

    def _latest_iteration(self, query: ExperimentQuery) -> ExperimentRecord | None:
        page, _ = self._track("search", self.tracking.search_experiments, query, 1)
        return page[0] if page else None

    def get_previous_iteration_id(self) -> str | None:
        """The newest iteration created before the current one; None without a current iteration."""
        if self._experiment is None:
            log.warning("get_previous_iteration_id: no current iteration is set")
            return None
        query = self._iteration_query(created_before_ms=self._experiment.creation_time_ms + 1)
        found = self._latest_iteration(query)
        return found.experiment_id if found else None

    def get_last_iteration_id(self) -> str | None:
        """The newest iteration other than the current one."""
        found = self._latest_iteration(self._iteration_query())
        return found.experiment_id if found else None

    def get_last_finished_iteration_id(self) -> str | None:
        """The newest iteration, other than the current one, whose runs all ended (FINISHED,
        FAILED or KILLED) and that has at least one run. Checks one iteration at a time, newest
        first, with one cheap query each."""

        def find() -> str | None:
            for experiment in self.tracking.iter_experiments(self._iteration_query(), page_size=5):
                eid = experiment.experiment_id
                if not self.tracking.has_runs(eid, ()):
                    continue
                if not self.tracking.has_runs(eid, _UNFINISHED):
                    return eid
            return None

        result: str | None = self._track("search", find)
        return result

    def _set_experiment_with_name(self, experiment_name: str) -> None:
        """Make the experiment with that name (created if needed) the current iteration."""
        batch = self._iteration.batch_id if self._iteration else ""
        self._experiment = self._get_or_create_experiment(
            experiment_name, self._experiment_tags(T.KIND_ITERATION, batch)
        )

    def _set_experiment_with_id(self, experiment_id: str) -> None:
        """Make the experiment with that id the current iteration."""
        experiment = self._track("search", self.tracking.get_experiment, experiment_id)
        if experiment is None or experiment.lifecycle_stage != "active":
            raise TrackerError(f"experiment {experiment_id} does not exist or is deleted")
        self._experiment = experiment

    def set_iteration(self, iteration: FineTuningIteration) -> None:
        """Start (or resume) the iteration: its experiment is created if it does not exist."""
        if iteration.plugin_name != self._plugin_name:
            raise ConfigurationError(
                f"iteration is for plugin {iteration.plugin_name!r}, "
                f"this manager tracks {self._plugin_name!r}"
            )
        with self._lock:
            if self._iteration is not None:
                self.finish_iteration()
            self._iteration = iteration
            try:
                self._set_experiment_with_name(str(iteration))
            except BaseException:
                self._iteration = None
                raise
            log.info(
                "iteration %r (%s)",
                str(iteration),
                self._experiment.experiment_id if self._experiment else "?",
            )

    def finish_iteration(self) -> None:
        """End the current iteration (finishing an active run) and go back to the initial state."""
        with self._lock:
            if self._run is not None:
                self.finish_run()
            self._iteration = None
            self._experiment = None

    def _require_iteration(self) -> ExperimentRecord:
        if self._experiment is None:
            raise NoActiveIterationError(
                "no current fine-tuning iteration: call set_iteration(...) first"
            )
        return self._experiment

    def delete_previous_iteration(self) -> None:
        """Delete the models of the previous iteration, then the iteration itself.

        The initial experiment is never touched: it is not an iteration.
        """
        with self._lock:
            previous = self.get_previous_iteration_id()
            if previous is None:
                log.warning("delete_previous_iteration: no previous iteration to delete")
                return
            self._delete_iteration(previous)

    def _delete_iteration(self, experiment_id: str) -> None:
        initial = self._get_initial_experiment()
        if initial is not None and initial.experiment_id == experiment_id:
            raise ConfigurationError("the initial experiment is never deleted by iteration cleanup")
        if self._experiment is not None and self._experiment.experiment_id == experiment_id:
            raise ConfigurationError("refusing to delete the current iteration")
        for run in self._marked_runs(experiment_id):
            self._delete_marked_model(run)
        self._track("delete", self.tracking.delete_experiment, experiment_id)
        log.info("deleted iteration %s", experiment_id)

    # ------------------------------------------------------------------ runs
    def _first_run(self, experiment_id: str, **query: Any) -> RunRecord | None:
        runs: list[RunRecord] = self._track(
            "search", self.tracking.search_runs, RunQuery((experiment_id,), **query)
        )
        if not runs:
            return None
        return min(runs, key=lambda r: (r.start_time_ms, r.run_id))

    def _get_or_create_run(
        self,
        experiment_id: str,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, str] | None = None,
    ) -> RunRecord:
        """The run named ``run_name``, created if missing. Two workers racing to create it
        agree on the oldest one; the other is deleted."""
        existing = self._first_run(experiment_id, run_name=run_name)
        if existing is not None:
            return existing
        created: RunRecord = self._track(
            "create", self.tracking.create_run, experiment_id, run_name, tags
        )
        winner = self._first_run(experiment_id, run_name=run_name) or created
        if winner.run_id != created.run_id:
            log.info("run %r was created concurrently; using %s", run_name, winner.run_id)
            self._track("delete", self.tracking.delete_run, created.run_id)
            return winner
        first_metric = [MetricValue(T.METRIC_MODEL_UPLOADED, 0.0, step=0)]
        self._track(
            "log_params", self.tracking.log_batch, created.run_id, first_metric, params or {}
        )
        return created  # identity, status and artifact URI are all the caller reads

    def _get_run(self, run_id: str) -> RunRecord:
        run: RunRecord | None = self._track("search", self.tracking.get_run, run_id)
        if run is None:
            raise TrackerError(f"run {run_id} does not exist")
        return run

    def _start_run(self, params: FineTuningParams) -> RunRecord:
        """Find or create the current iteration's run for ``params``."""
        experiment = self._require_iteration()
        assert self._iteration is not None
        tags = {
            T.TAG_PLUGIN: self._plugin_name,
            T.TAG_PARAMS_ID: params.id,
            T.TAG_PARAMS_TYPE: f"{type(params).__module__}:{type(params).__qualname__}",
        }
        mlflow_params = {**self._iteration.to_params(), **params.to_mlflow()}
        return self._get_or_create_run(experiment.experiment_id, params.id, tags, mlflow_params)

    def _set_run(self, params: FineTuningParams) -> bool:
        """Start or resume the run of ``params``; True if it is new or unfinished (to train)."""
        run = self._start_run(params)
        self._run = run
        self._run_params = params
        self._metrics.reset()
        return not run.status.is_terminal

    def set_run(self, params: FineTuningParams) -> bool:
        """Start the run of ``params`` in the current iteration, or resume it.

        Returns True if that run had already finished (FINISHED, FAILED or KILLED) in an
        earlier attempt: the caller skips it. An unfinished run (a crash) is resumed.
        Raises :class:`NoActiveIterationError` without a current iteration.
        """
        if not isinstance(params, FineTuningParams):
            raise ConfigurationError(
                f"params must be FineTuningParams, got {type(params).__name__}"
            )
        with self._lock:
            self._require_iteration()
            if self._run is not None:
                self.finish_run()
            return not self._set_run(params)

    def finish_run(self, as_failed: bool = False) -> None:
        """End the current run, FINISHED or (``as_failed``) FAILED, after flushing its metrics."""
        with self._lock:
            if self._run is None:
                log.warning("finish_run: no active run")
                return
            run_id = self._run.run_id
            try:
                self.flush_metrics()
            finally:
                status = RunStatus.FAILED if as_failed else RunStatus.FINISHED
                if not self._run.status.is_terminal:
                    self._track("finish_run", self.tracking.set_terminated, run_id, status)
                self._metrics.reset()
                self._run = None
                self._run_params = None

    def get_run_by_id(self, run_id: str, models_only: bool = False) -> RunRecord | None:
        """The run with that id; with ``models_only``, None unless it holds a marked model."""
        run: RunRecord | None = self._track("search", self.tracking.get_run, run_id)
        if run is None or (models_only and not is_marked(run)):
            return None
        return run

    def _require_run(self) -> RunRecord:
        if self._run is None:
            raise NoActiveRunError("no active run: call set_run(params) first")
        return self._run

    # ------------------------------------------------------------------ metrics
    def save_metric(self, metric_value: MetricValue) -> None:
        """Feed the value to every accumulator and queue what they yield (the value itself
        when no accumulator takes its name). Queued values are sent in batches: when enough
        accumulate, every few seconds, and always by :meth:`finish_run`, :meth:`save_model`,
        :meth:`get_quality` and at interpreter exit."""
        if not isinstance(metric_value, MetricValue):
            raise InvalidMetricError(f"expected a MetricValue, got {type(metric_value).__name__}")
        with self._lock:
            self._require_run()
            if self._metrics.add(metric_value):
                self.flush_metrics()

    def flush_metrics(self) -> None:
        """Send queued metric values now. A retried batch never logs a value twice."""
        with self._lock:
            batch = self._metrics.pending()
            if not batch or self._run is None:
                return
            self._track("log_metric", self.tracking.log_batch, self._run.run_id, batch)
            self._metrics.sent(len(batch))

    def get_quality(self) -> float:
        """The current run's main metric, final value. Raises if there is no run or no value."""
        with self._lock:
            run = self._require_run()
            self.flush_metrics()
            fresh = self._get_run(run.run_id)
            if self._main_metric not in fresh.metrics:
                raise InvalidMetricError(
                    f"run {run.run_id} has no value of the main metric {self._main_metric!r}"
                )
            return float(fresh.metrics[self._main_metric])

    def _rank_key(self, run: RunRecord) -> tuple[int, float, int, str]:
        """Sort key, best first (see :class:`~tracker_core.ranking.Ranking`)."""
        return self.ranking.key(run)

    def _top_finished_runs(self, experiment_id: str) -> list[RunRecord]:
        """The best ``n_top_runs`` FINISHED runs that logged the main metric, best first."""
        query = self.ranking.finished_query(experiment_id, self.n_top_runs)
        runs: list[RunRecord] = self._track("search", self.tracking.search_runs, query)
        return self.ranking.best_first(runs)

    def _get_best_quality(self, experiment_id: str) -> tuple[str | None, float]:
        """Best FINISHED run of the experiment by the main metric, and its quality."""
        runs = self._top_finished_runs(experiment_id)
        if not runs:
            return None, self.ranking.worst_value
        return runs[0].run_id, float(runs[0].metrics[self._main_metric])

    def get_best_quality(self) -> tuple[str | None, float]:
        """Best finished run of the current iteration and its quality."""
        return self._get_best_quality(self._require_iteration().experiment_id)

    # ------------------------------------------------------------------ best model
    def _marked_runs(self, experiment_id: str) -> list[RunRecord]:
        """Runs of the experiment holding a completely written model, best first."""
        return self.models.marked_runs(experiment_id)

    def _best_model_run(self, experiment_id: str) -> RunRecord | None:
        return self.models.best_run(experiment_id)

    def _model_uri(self, run: RunRecord) -> str:
        return self.models.uri_of(run)

    def _save_model(self, model: Any) -> str:
        """Upload the current run's model and mark it; returns its URI."""
        run = self._require_run()
        self.flush_metrics()
        return self.models.write_and_mark(run, model, self.model_format, self.requirements)

    def save_model(self, model: Any, best_only: bool = True) -> bool:
        """Save the current run's model. Returns True if it was written.

        With ``best_only`` the model is written only if fewer than ``keep`` marked models of
        the iteration are better; after writing and marking it, models worse than ``keep``
        marked ones are pruned. Concurrent workers cannot prune a top model: a model is
        written first and marked second, and only models ranked below ``keep`` marked ones
        are ever deleted.
        """
        with self._lock:
            experiment = self._require_iteration()
            run = self._require_run()
            if not best_only:
                self._save_model(model)
                return True
            self.flush_metrics()
            fresh = self._get_run(run.run_id)
            if self._main_metric not in fresh.metrics:
                raise InvalidMetricError(
                    f"cannot rank run {run.run_id}: it has no value of {self._main_metric!r}"
                )
            if len(self.models.better_marked(fresh)) >= self.keep:
                log.info(
                    "run %s (%s=%s) is not among the best %d; model not saved",
                    run.run_id,
                    self._main_metric,
                    fresh.metrics[self._main_metric],
                    self.keep,
                )
                return False
            self._save_model(model)
            self._prune(experiment.experiment_id)
            return True

    def _prune(self, experiment_id: str) -> None:
        """Delete every marked model ranked below the best ``keep``."""
        for run in self.models.marked_runs(experiment_id)[self.keep :]:
            self._delete_marked_model(run)

    def _set_model_as_deleted(self, run_id: str, experiment_id: str | None = None) -> None:
        """Unmark the run's model (tags) and log the seed's marker metrics."""
        self.models.unmark(run_id)

    def _delete_model(self, run_id: str, experiment_id: str) -> bool:
        """Delete the files of the run's model; True when none are left. Backends may
        override it (the seed's S3 manager does)."""
        return self.models.delete_files(self._get_run(run_id))

    def _delete_marked_model(self, run: RunRecord) -> bool:
        # unmark first: a crash between the two steps leaves an orphan for gc, never a
        # marked model without files
        self._set_model_as_deleted(run.run_id, run.experiment_id)
        ok = self._delete_model(run.run_id, run.experiment_id)
        log.info("deleted model of run %s (%s)", run.run_id, "done" if ok else "files remain")
        return ok

    def delete_model(self, run_id: str, experiment_id: str | None = None) -> bool:
        """Delete the model of a run (of the current iteration unless ``experiment_id``).

        Refuses the initial experiment. Returns False, with a warning, when the run holds no
        model.
        """
        with self._lock:
            experiment_id = experiment_id or self._require_iteration().experiment_id
            initial = self._get_initial_experiment()
            if initial is not None and initial.experiment_id == experiment_id:
                raise ConfigurationError("deleting the initial model is not allowed")
            run = self.get_run_by_id(run_id)
            if run is None or run.experiment_id != experiment_id or not is_marked(run):
                log.warning("run %s of experiment %s holds no model", run_id, experiment_id)
                return False
            return self._delete_marked_model(run)

    def model_is_uploaded(self) -> bool:
        """Whether the current run holds a marked model."""
        run = self._require_run()
        return is_marked(self._get_run(run.run_id))

    # ------------------------------------------------------------------ best runs and URLs
    def _get_best_previous_run_id(self) -> tuple[str | None, bool]:
        """Best model run of the previous iteration (the last finished one when no iteration
        is current). ``(None, True)`` when there is no previous iteration."""
        run, is_initial = self._best_previous_run()
        return (run.run_id if run else None), is_initial

    def get_best_current_run_id(self) -> tuple[str | None, bool]:
        """Best model run of the current iteration; ``(None, True)`` without a current iteration."""
        if self._experiment is None:
            return None, True
        best = self._best_model_run(self._experiment.experiment_id)
        return (best.run_id if best else None), False

    def _best_previous_run(self) -> tuple[RunRecord | None, bool]:
        previous = (
            self.get_previous_iteration_id()
            if self._experiment is not None
            else self.get_last_finished_iteration_id()
        )
        if previous is None:
            return None, True
        return self.models.best_run(previous), False

    def get_last_model_url(self) -> str | None:
        """Storage URL of the previous iteration's best model; None if there is none."""
        run, _ = self._best_previous_run()
        return self.models.uri_of(run) if run else None

    def get_current_model_url(self) -> str | None:
        """Storage URL of the current iteration's best model; None if there is none."""
        run = self.models.best_run(self._experiment.experiment_id) if self._experiment else None
        if run is None:
            log.warning("no model in the current iteration")
            return None
        return self.models.uri_of(run)

    # ------------------------------------------------------------------ lookups for tools
    def get_experiment(self, experiment_id: str) -> ExperimentRecord | None:
        """The experiment with that id (active or deleted); None if there is none."""
        found: ExperimentRecord | None = self._track(
            "search", self.tracking.get_experiment, experiment_id
        )
        return found

    def get_experiment_by_name(self, name: str) -> ExperimentRecord | None:
        """The active experiment with that name; None if there is none."""
        found: ExperimentRecord | None = self._track(
            "search", self.tracking.get_experiment_by_name, name
        )
        return found

    def get_runs(
        self,
        experiment_id: str,
        *,
        statuses: Sequence[RunStatus] = (),
        marked_only: bool = False,
    ) -> list[RunRecord]:
        """Active runs of an experiment, optionally only those holding a marked model."""
        tags = {T.TAG_MODEL_UPLOADED: T.TRUE} if marked_only else {}
        query = RunQuery((experiment_id,), statuses=tuple(statuses), tags=tags)
        runs: list[RunRecord] = self._track("search", self.tracking.search_runs, query)
        return runs

    def has_unfinished_runs(self, experiment_id: str) -> bool:
        """Whether any run of the experiment is still RUNNING or SCHEDULED."""
        found: bool = self._track("search", self.tracking.has_runs, experiment_id, _UNFINISHED)
        return found

    def get_best_model_run(self, experiment_id: str) -> RunRecord | None:
        """The run holding the best marked model of an experiment (never a FAILED run)."""
        return self._best_model_run(experiment_id)

    def delete_iteration(self, experiment_id: str) -> None:
        """Delete one iteration: its models, then the experiment. Refuses the initial
        experiment and the current iteration."""
        with self._lock:
            self._delete_iteration(experiment_id)

    def abandon_iteration(self) -> None:
        """Forget the current run and iteration *without* ending them, as a crashed process
        would: the run stays RUNNING, so the next ``set_run`` with the same params resumes it.
        Buffered metrics are flushed if the store allows, then dropped."""
        with self._lock:
            try:
                self.flush_metrics()
            except Exception:
                log.warning("could not flush the metrics of the abandoned run", exc_info=True)
            self._metrics.reset()
            self._run = None
            self._run_params = None
            self._iteration = None
            self._experiment = None

    def find_orphaned_models(
        self, *, include_running: bool = False, max_depth: int = 4
    ) -> OrphanScan:
        """Model folders no run marks and incomplete uploads whose writer is gone: what
        crashes leave (see :meth:`ModelKeeper.find_orphans`)."""
        ttl = getattr(self, "lease_seconds", DEFAULT_LEASE_SECONDS)
        return self.models.find_orphans(
            include_running=include_running, max_depth=max_depth, lease_seconds=ttl
        )

    def delete_orphaned_model(self, orphan: OrphanedModel) -> bool:
        """Delete one folder found by :meth:`find_orphaned_models`; True when it is gone."""
        return self.models.delete_orphan(orphan)

    def abort_orphaned_upload(self, upload: OrphanedUpload) -> None:
        """Abort one incomplete upload found by :meth:`find_orphaned_models`."""
        self.models.abort_upload(upload)

    def find_models_missing_files(self) -> MissingScan:
        """Runs marked as holding a model whose files are gone (``tracker-core verify``)."""
        ttl = getattr(self, "lease_seconds", DEFAULT_LEASE_SECONDS)
        return self.models.find_missing_files(lease_seconds=ttl)

    def unmark_model_missing_files(self, model: MissingModel) -> bool:
        """Unmark a run found by :meth:`find_models_missing_files` as a deletion would."""
        ttl = getattr(self, "lease_seconds", DEFAULT_LEASE_SECONDS)
        return self.models.unmark_missing(model, lease_seconds=ttl)

    # ------------------------------------------------------------------ downloads
    def download_model_files(
        self, run_id: str, destination: Path, progress: bool | None = None
    ) -> Path:
        """Copy the run's marked model files into ``destination``; returns the model folder."""
        run = self.get_run_by_id(run_id, models_only=True)
        if run is None:
            raise ModelNotFoundError(f"run {run_id} holds no model")
        return self.models.download_files(run, Path(destination), progress)

    def _download_model(self, run_id: str) -> Any:
        run = self.get_run_by_id(run_id, models_only=True)
        if run is None:
            raise ModelNotFoundError(f"run {run_id} holds no model")
        return self.models.load(run, self.model_format, self.model_factory)

    def download_model_by_run_id(self, run_id: str) -> Any | None:
        """The run's model; None (logged) if the run holds none. Store failures raise."""
        try:
            return self._download_model(run_id)
        except ModelNotFoundError:
            log.exception("no model to download for run %s", run_id)
            return None

    def download_initial_model(self) -> Any:
        """The initial model. Raises :class:`ModelNotFoundError` if it was never uploaded."""
        run_id = self.get_initial_model_run_id()
        if run_id is None:
            raise ModelNotFoundError(f"no initial model uploaded for plugin {self._plugin_name!r}")
        return self._download_model(run_id)

    def download_model(self, experiment_name: str, run_name: str) -> Any | None:
        """The model of the run named ``run_name`` in the experiment ``experiment_name``."""
        experiment = self._track("search", self.tracking.get_experiment_by_name, experiment_name)
        if experiment is None:
            log.warning("no experiment named %r", experiment_name)
            return None
        run = self._first_run(experiment.experiment_id, run_name=run_name)
        if run is None:
            log.warning("no run named %r in %r", run_name, experiment_name)
            return None
        return self.download_model_by_run_id(run.run_id)

    def download_best_model(self, experiment_id: str) -> Any:
        """The best model of an experiment; the initial model if it holds none."""
        best = self._best_model_run(experiment_id)
        if best is None:
            log.info("experiment %s holds no model; using the initial model", experiment_id)
            return self.download_initial_model()
        return self._download_model(best.run_id)

    def download_last_model(self) -> Any:
        """Best model of the previous (or last finished) iteration; else the initial model."""
        run_id, _ = self._get_best_previous_run_id()
        if run_id is None:
            return self.download_initial_model()
        return self._download_model(run_id)

    # ------------------------------------------------------------------ top params
    def _params_type_of(self, runs: Sequence[RunRecord]) -> type[FineTuningParams]:
        if self.params_type is not None:
            return self.params_type
        if self._run_params is not None:
            return type(self._run_params)
        path = next(
            (r.tags.get(T.TAG_PARAMS_TYPE) for r in runs if r.tags.get(T.TAG_PARAMS_TYPE)), None
        )
        if path is None:
            raise ConfigurationError("cannot tell the params type: pass params_type=")
        obj = import_object(path)
        if not (isinstance(obj, type) and issubclass(obj, FineTuningParams)):
            raise ConfigurationError(f"{path} is not a FineTuningParams subclass")
        return obj

    def get_top_params_by_experiment_id(
        self, experiment_id: str, params_type: type[P] | None = None
    ) -> list[P] | None:
        """The params of the best ``n_top_runs`` FINISHED runs of an experiment that logged the
        main metric (whether or not they still hold a model), best first, typed; None if none."""
        initial = self._get_initial_experiment()
        if initial is not None and initial.experiment_id == experiment_id:
            return None
        runs = self._top_finished_runs(experiment_id)
        if not runs:
            return None
        cls = params_type or self._params_type_of(runs)
        return [cls.from_mlflow(r.params) for r in runs]  # type: ignore[misc]

    def get_top_params(self, params_type: type[P] | None = None) -> list[P] | None:
        """Top params of the previous iteration (the last finished one when no iteration is
        current); None if there are none."""
        previous = (
            self.get_previous_iteration_id()
            if self._experiment is not None
            else self.get_last_finished_iteration_id()
        )
        if previous is None:
            return None
        return self.get_top_params_by_experiment_id(previous, params_type)
