"""``ExperimentsManager``: the seed's API (``seeds/experiments-manager-api.md``), every name of
it, public and private, as one adapter over a :class:`~tracker_core.tracker.Tracker`.

The constructor checks every argument (:mod:`tracker_core.arguments`) before anything is
written, opens the two stores of the backend that the artifact URI's scheme names, and builds
the tracker. Each method is a delegation to the tracker, one of its services or
:class:`~tracker_core.lookup.ModelLookup` (the seed's model lookups); the work, and its
documentation, is there. At interpreter exit, every manager still open sends its queued
metrics and lets go of its run (:meth:`~tracker_core.tracker.Tracker.at_exit`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar, overload

from tracker_core import arguments, continual, leases
from tracker_core import tags as T
from tracker_core.accumulators import MetricsAccumulator
from tracker_core.clock import SYSTEM_CLOCK, Clock
from tracker_core.codecs import ModelFactory
from tracker_core.continual import Conclusion
from tracker_core.errors import (
    InvalidMetricError,
    TrackerError,
)
from tracker_core.lineage import Lineage
from tracker_core.lookup import ModelLookup
from tracker_core.models import ModelKeeper, is_marked
from tracker_core.opening import DEFAULT_ARTIFACT_URI, DEFAULT_TRACKING_URI, open_tracker
from tracker_core.params import FineTuningParams
from tracker_core.promotion import Promoter, PromotionConfig
from tracker_core.ranking import Ranking
from tracker_core.reconcile import (
    AbandonedTwin,
    MissingModel,
    MissingScan,
    OrphanedModel,
    OrphanedUpload,
    OrphanScan,
)
from tracker_core.retry import RetryConfig
from tracker_core.retrying import (
    RetryingArtifactStore,
    RetryingRegistryStore,
    RetryingTrackingStore,
)
from tracker_core.stores import ArtifactStore, TrackingStore
from tracker_core.tracker import ActiveRun, Settings, Tracker
from tracker_core.values import (
    ExperimentRecord,
    FineTuningIteration,
    MetricValue,
    RunRecord,
    RunStatus,
)

__all__ = [
    "DEFAULT_ARTIFACT_URI",
    "DEFAULT_TRACKING_URI",
    "ActiveRun",
    "ExperimentsManager",
    "OrphanScan",
    "OrphanedModel",
]

log = logging.getLogger(__name__)

P = TypeVar("P", bound=FineTuningParams)
_V = TypeVar("_V")

_live_trackers: weakref.WeakSet[Tracker] = weakref.WeakSet()


@atexit.register
def _at_exit() -> None:
    for tracker in list(_live_trackers):
        tracker.at_exit()


class _Setting(Generic[_V]):
    """A read-only manager attribute: one value of its :class:`Settings`."""

    def __init__(self, read: Callable[[Settings], _V]) -> None:
        self._read = read

    @overload
    def __get__(self, manager: None, owner: type) -> _Setting[_V]: ...
    @overload
    def __get__(self, manager: ExperimentsManager, owner: type) -> _V: ...
    def __get__(self, manager: ExperimentsManager | None, owner: type) -> _V | _Setting[_V]:
        return self if manager is None else self._read(manager.settings)

    def __set__(self, manager: ExperimentsManager, value: object) -> NoReturn:
        raise AttributeError("a manager's settings are fixed at construction")


class ExperimentsManager:
    """Fine-tuning experiment management over a tracking store and an artifact store.

    Every fine-tuning iteration is an experiment named after :class:`FineTuningIteration`;
    every params set tried in it is a run whose identity is the params' hash. Only the best
    ``keep`` models of an iteration are kept (ranked by the final value of ``main_metric``,
    lower is better when ``is_loss``); a model is served once its run ended FINISHED; the
    initial model lives in its own experiment and is never removed by iteration cleanup. One
    worker trains a run at a time (a lease renewed by a heartbeat; a dead worker's run is
    resumable ``lease_seconds`` after it died).

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
        artifact_uri: where models live; its scheme picks the backend. No credentials in it.
        keep: how many best models an iteration keeps.
        model_format: ``"mlflow.pytorch"`` (default when the backend offers it) or ``"state_dict"``.
        model_factory: builds an empty model, for formats that store weights only.
        params_type: the :class:`FineTuningParams` subclass :meth:`get_top_params` returns.
        lease_seconds: how long a run stays locked to a worker that stopped renewing it.
        tracking_store / artifact_store: ready stores (tests, third-party setups); the manager
            calls them under its retry policy.
        clock: what leases, heartbeats and waits read the time from (tests step it).
        promotion: champion/challenger promotion in the model registry
            (:class:`~tracker_core.promotion.PromotionConfig`; default: from the environment).
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
        lease_seconds: float = leases.DEFAULT_LEASE_SECONDS,
        tracking_store: TrackingStore | None = None,
        artifact_store: ArtifactStore | None = None,
        clock: Clock = SYSTEM_CLOCK,
        promotion: PromotionConfig | None = None,
    ) -> None:
        self._tracker = open_tracker(
            tracking_uri,
            main_metric,
            plugin_name,
            accumulators,
            is_loss,
            n_top_runs,
            requirements,
            retry_config,
            artifact_uri=artifact_uri,
            storage_options=storage_options,
            keep=keep,
            model_format=model_format,
            model_factory=model_factory,
            params_type=params_type,
            lease_seconds=lease_seconds,
            tracking_store=tracking_store,
            artifact_store=artifact_store,
            clock=clock,
            promotion=promotion,
        )
        self._lookup = ModelLookup(self._tracker)
        _live_trackers.add(self._tracker)

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
        if not all(hasattr(wrapper, a) for a in ("tracking_uri", "requirements", "retry_config")):
            arguments.refuse(
                "wrapper",
                wrapper,
                "an MLflowClientWrapper (an object with tracking_uri, requirements and "
                "retry_config)",
            )
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
            f"{type(self).__name__}(plugin={self.plugin_name!r}, metric={self.main_metric!r}, "
            f"is_loss={self.is_loss}, artifacts={self.artifacts.root!r})"
        )

    def close(self) -> None:
        """End the current run implicitly (see :meth:`set_run`), flush, release the stores."""
        self._tracker.close()

    def __enter__(self) -> ExperimentsManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ what it is made of
    @property
    def tracker(self) -> Tracker:
        """The composed core: stores, services and session (for tools and tests)."""
        return self._tracker

    @property
    def tracking(self) -> RetryingTrackingStore:
        """The tracking store (runs, params, metrics, tags), behind the retry policy."""
        return self._tracker.stores.tracking

    @property
    def artifacts(self) -> RetryingArtifactStore:
        """The artifact store (model files), behind the retry policy."""
        return self._tracker.stores.artifacts

    @property
    def settings(self) -> Settings:
        """What this manager was configured with."""
        return self._tracker.settings

    @property
    def models(self) -> ModelKeeper:
        return self._tracker.models

    @property
    def ranking(self) -> Ranking:
        return self._tracker.ranking

    is_loss: _Setting[bool] = _Setting(lambda s: s.is_loss)  # True if lower main_metric is better
    main_metric: _Setting[str] = _Setting(lambda s: s.main_metric)
    plugin_name: _Setting[str] = _Setting(lambda s: s.plugin_name)
    keep: _Setting[int] = _Setting(lambda s: s.keep)
    n_top_runs: _Setting[int] = _Setting(lambda s: s.n_top_runs)
    model_format: _Setting[str] = _Setting(lambda s: s.model_format)
    model_factory: _Setting[ModelFactory | None] = _Setting(lambda s: s.model_factory)
    params_type: _Setting[type[FineTuningParams] | None] = _Setting(lambda s: s.params_type)
    requirements: _Setting[list[str] | None] = _Setting(
        lambda s: list(s.requirements) if s.requirements else None
    )
    retry_config: _Setting[RetryConfig] = _Setting(lambda s: s.retry)
    tracking_uri: _Setting[str | None] = _Setting(lambda s: s.tracking_uri)
    lease_seconds: _Setting[float] = _Setting(lambda s: s.lease_seconds)

    @property
    def current_iteration(self) -> FineTuningIteration | None:
        return self._tracker.iteration

    @property
    def current_experiment_id(self) -> str | None:
        experiment = self._tracker.experiment
        return experiment.experiment_id if experiment else None

    @property
    def current_run_id(self) -> str | None:
        run = self._tracker.runs.run
        return run.run_id if run else None

    def _fix_name(self, name: str) -> str:
        """Prefix a name with the plugin name: ``"<plugin> / <name>"``."""
        return f"{self.plugin_name} / {name}"

    # ------------------------------------------------------------------ initial model
    def get_initial_run_id(self) -> str | None:
        """The run id of the initial model's run, or None if it was never created."""
        run = self._tracker.initial.run()
        return run.run_id if run else None

    def is_initial_run(self, run_id: str) -> bool:
        """Whether ``run_id`` is the initial model's run."""
        return run_id is not None and run_id == self.get_initial_run_id()

    def has_initial_model(self) -> bool:
        """Whether the initial model was uploaded completely (marked) and its files are there."""
        return self._tracker.initial.exists()

    def get_initial_model_run_id(self) -> str | None:
        """The initial model's run id; None (and an error logged) if no initial model exists."""
        run = self._tracker.initial.marked_run()
        if run is None:
            log.error("no initial model uploaded for plugin %r", self.plugin_name)
        return run.run_id if run else None

    def upload_initial_model(self, model: Any, model_format: str | None = None) -> bool:
        """Upload the initial model once; False (nothing uploaded) if it exists (see
        :mod:`tracker_core.initial`). Ends any current iteration first."""
        return self._tracker.upload_initial_model(model, model_format)

    def download_initial_model(self) -> Any:
        """The initial model. Raises :class:`ModelNotFoundError` if it was never uploaded."""
        return self._tracker.load(self._tracker.initial.require())

    # ------------------------------------------------------------------ iterations
    def set_iteration(self, iteration: FineTuningIteration) -> None:
        """Start (or resume) the iteration; its experiment is created if it does not exist.
        A current run is ended implicitly (see :meth:`set_run`)."""
        self._tracker.enter(iteration)

    def finish_iteration(self) -> None:
        """End the current iteration (a current run ends implicitly, see :meth:`set_run`)."""
        self._tracker.leave()

    def abandon_iteration(self) -> None:
        """Forget the current run and iteration *without* ending them, as after an interrupt:
        the run stays RUNNING, its lease released (resumable at once)."""
        self._tracker.abandon()

    def _set_experiment_with_name(self, experiment_name: str) -> None:
        """Make the experiment with that name (created if needed) the current iteration."""
        iteration = self._tracker.iteration
        batch = iteration.batch_id if iteration else ""
        tags = self._tracker.iterations.tags(T.KIND_ITERATION, batch)
        self._tracker.enter_experiment(
            self._tracker.iterations.get_or_create(experiment_name, tags)
        )

    def _set_experiment_with_id(self, experiment_id: str) -> None:
        """Make the experiment with that id the current iteration."""
        experiment = self._tracker.iterations.get(experiment_id)
        if experiment is None or experiment.lifecycle_stage != "active":
            raise TrackerError(f"experiment {experiment_id} does not exist or is deleted")
        self._tracker.enter_experiment(experiment)

    def get_experiments(self) -> list[ExperimentRecord]:
        """Every iteration experiment of this plugin, newest first (the initial one excluded)."""
        return self._tracker.iterations.all()

    def get_experiment(self, experiment_id: str) -> ExperimentRecord | None:
        """The experiment with that id (active or deleted); None if there is none."""
        return self._tracker.iterations.get(experiment_id)

    def get_experiment_by_name(self, name: str) -> ExperimentRecord | None:
        """The active experiment with that name; None if there is none."""
        return self._tracker.iterations.by_name(name)

    def get_previous_iteration_id(self) -> str | None:
        """The newest iteration created before the current one; None without a current iteration."""
        experiment = self._tracker.experiment
        if experiment is None:
            log.warning("get_previous_iteration_id: no current iteration is set")
            return None
        found = self._tracker.iterations.previous(experiment)
        return found.experiment_id if found else None

    def get_last_iteration_id(self) -> str | None:
        """The newest iteration other than the current one."""
        iterations = self._tracker.iterations
        found = iterations.latest(iterations.query(self._tracker.experiment))
        return found.experiment_id if found else None

    def get_last_finished_iteration_id(self) -> str | None:
        """The newest iteration, other than the current one, that has runs, all ended."""
        return self._tracker.iterations.last_finished(self._tracker.experiment)

    def get_last_model_run(self) -> RunRecord | None:
        """The run holding the model the next iteration starts from: the best model of a
        FINISHED run in the newest iteration (created before the current one, if any) that
        holds one. :meth:`download_last_model`, :meth:`get_top_params` and
        :meth:`delete_previous_iteration` use this iteration."""
        return self._lookup.last_run()

    def delete_previous_iteration(self) -> None:
        """Prune the current iteration, then delete the one it started from (see
        :meth:`get_last_model_run`). Refused, nothing deleted, while the current iteration
        holds no model of a FINISHED run (:class:`NoModelToKeepError`) or live workers hold
        runs of the previous one (:class:`IterationInUseError`); never the initial one."""
        self._tracker.delete_previous()

    def delete_iteration(self, experiment_id: str, *, defer: bool = False) -> bool:
        """Delete one iteration (never the initial or current one); True once deleted. While
        live workers hold its runs: :class:`IterationInUseError`, or with ``defer`` marked for
        :meth:`delete_pending_iterations` and False."""
        return self._tracker.delete_iteration(experiment_id, defer=defer)

    def delete_pending_iterations(self) -> list[str]:
        """Delete the deferred iterations no live worker holds any more; their ids."""
        return self._tracker.delete_pending()

    def get_runs(
        self, experiment_id: str, *, statuses: Sequence[RunStatus] = (), marked_only: bool = False
    ) -> list[RunRecord]:
        """Active runs of an experiment, optionally only those holding a marked model."""
        tags = {T.TAG_MODEL_UPLOADED: T.TRUE} if marked_only else {}
        return self._tracker.iterations.runs(experiment_id, tuple(statuses), tags=tags)

    def has_unfinished_runs(self, experiment_id: str) -> bool:
        """Whether any run of the experiment is still RUNNING or SCHEDULED."""
        return self._tracker.iterations.has_unfinished_runs(experiment_id)

    # ------------------------------------------------------------------ runs and metrics
    def _start_run(self, params: FineTuningParams) -> tuple[RunRecord, bool]:
        """Find or create the current iteration's run for ``params`` (True if created)."""
        return self._tracker.find_or_create_run(params)

    def _save_params(self) -> None:
        """Log the iteration's and the current run's params again (idempotent)."""
        run, params = self._tracker.runs.require(), self._tracker.runs.params
        iteration = self._tracker.iteration
        assert iteration is not None and params is not None
        values = {**iteration.to_params(), **params.to_mlflow()}
        self.tracking.log_batch(run.run_id, (), values)

    def _set_run(self, params: FineTuningParams, wait: float = 0.0) -> bool:
        """Start or resume the run of ``params``; True if it is new or unfinished (to train)."""
        return not self._tracker.take_run(params, wait)

    def set_run(self, params: FineTuningParams, *, wait: float = 0.0) -> bool:
        """Start the run of ``params`` in the current iteration, or resume an unfinished one.

        True if it already ended in an earlier attempt (skip it). A run held by another live
        worker is waited for up to ``wait`` seconds (``math.inf``: until it ends or its worker
        dies), then :class:`~tracker_core.errors.RunInUseError`. A current run is ended first:
        FINISHED if it could be, else left resumable (see :mod:`tracker_core.runs`)."""
        return self._tracker.take_run(params, wait)

    def run(
        self, params: FineTuningParams, *, wait: float = 0.0
    ) -> contextlib.AbstractContextManager[ActiveRun]:
        """``with manager.run(params) as run:`` - :meth:`set_run`, then the block, then the
        end: FINISHED when the block completes, FAILED when it raises an ``Exception``
        (re-raised), left resumable on an interrupt. ``run.finished``: skip the block."""
        return self._tracker.run(params, wait=wait)

    def finish_run(self, as_failed: bool = False) -> None:
        """End the current run, FINISHED or (``as_failed``) FAILED, once its queued metrics
        reached the store. FINISHED needs the main metric (:class:`InvalidMetricError`) and no
        failed ``save_model`` since the last good one (:class:`ModelNotSavedError`). A FAILED
        run's model is deleted; a FINISHED one's is served, and the iteration pruned."""
        self._tracker.end_run(RunStatus.FAILED if as_failed else RunStatus.FINISHED)

    def get_run_by_id(self, run_id: str, models_only: bool = False) -> RunRecord | None:
        """The run with that id; with ``models_only``, None unless it holds a marked model."""
        return self._lookup.run(run_id, marked_only=models_only)

    def save_metric(self, metric_value: MetricValue) -> None:
        """Feed the value to the accumulators and queue what they yield; queued values are
        sent in batches (see :mod:`tracker_core.metrics`)."""
        if not isinstance(metric_value, MetricValue):
            raise InvalidMetricError(f"expected a MetricValue, got {type(metric_value).__name__}")
        with self._tracker.lock:
            self._tracker.runs.add_metric(metric_value)

    def flush_metrics(self) -> None:
        """Send queued metric values now; a batch that cannot be sent stays queued."""
        with self._tracker.lock:
            self._tracker.runs.flush()

    def get_quality(self) -> float:
        """The current run's main metric, final value. Raises if there is no run or no value."""
        with self._tracker.lock:
            return self._tracker.runs.quality()

    def _get_best_quality(self, experiment_id: str) -> tuple[str | None, float]:
        """Best FINISHED run of the experiment by the main metric, and its quality."""
        return self._tracker.top.best_quality(experiment_id, self.n_top_runs)

    def get_best_quality(self) -> tuple[str | None, float]:
        """Best finished run of the current iteration and its quality."""
        return self._get_best_quality(self._tracker.require_iteration().experiment_id)

    # ------------------------------------------------------------------ models
    def _save_model(self, model: Any) -> str:
        """Upload the current run's model and mark it; returns its URI."""
        with self._tracker.lock:
            return self._tracker.write_model(model)

    def save_model(self, model: Any, best_only: bool = True) -> bool:
        """Save the current run's model; True if it was written. With ``best_only``, only if
        fewer than ``keep`` models of FINISHED runs are better, pruning after. Served once the
        run ends FINISHED, deleted if it ends FAILED; a failed save blocks FINISHED until one
        succeeds. :class:`~tracker_core.errors.LeaseLostError` if the run was taken over."""
        return self._tracker.save_model(model, best_only)

    def _set_model_as_deleted(self, run_id: str, experiment_id: str | None = None) -> None:
        """Unmark the run's model (tags) and log the seed's marker metrics."""
        self.models.unmark(run_id)

    def _delete_model(self, run_id: str, experiment_id: str) -> bool:
        """Delete the files of the run's model; True when none are left."""
        return self.models.delete_files(self._tracker.runs.get_existing(run_id))

    def delete_model(self, run_id: str, experiment_id: str | None = None) -> bool:
        """Delete the model of a run (of the current iteration unless ``experiment_id``);
        never the initial model. False, with a warning, when the run holds no model."""
        experiment_id = experiment_id or self._tracker.require_iteration().experiment_id
        return self._lookup.delete(run_id, experiment_id)

    def model_is_uploaded(self) -> bool:
        """Whether the current run holds a marked model."""
        runs = self._tracker.runs
        return is_marked(runs.get_existing(runs.require().run_id))

    def get_best_model_run(self, experiment_id: str) -> RunRecord | None:
        """The run holding the best model of an experiment: a model of a FINISHED run."""
        return self.models.best_run(experiment_id)

    def _get_best_previous_run_id(self) -> tuple[str | None, bool]:
        """The run of :meth:`get_last_model_run`; ``(None, True)`` when there is none."""
        run = self.get_last_model_run()
        return (run.run_id, False) if run else (None, True)

    def get_best_current_run_id(self) -> tuple[str | None, bool]:
        """Best model run of the current iteration; ``(None, True)`` without a current one."""
        if self._tracker.experiment is None:
            return None, True
        best = self._lookup.current_best()
        return (best.run_id if best else None), False

    def get_last_model_url(self) -> str | None:
        """Storage URL of the model the next iteration starts from; None if there is none."""
        return self._lookup.url(self._lookup.last_run())

    def get_current_model_url(self) -> str | None:
        """Storage URL of the current iteration's best model; None if there is none."""
        run = self._lookup.current_best()
        if run is None:
            log.info("no model in the current iteration")
        return self._lookup.url(run)

    def download_model_files(
        self, run_id: str, destination: Path, progress: bool | None = None
    ) -> Path:
        """Copy the run's marked model files into ``destination``; returns the model folder."""
        return self._lookup.files(run_id, destination, progress)

    def download_model_by_run_id(self, run_id: str) -> Any | None:
        """The run's model; None if the run holds none (its files missing raise
        :class:`ModelFilesMissingError`). Store failures raise."""
        return self._lookup.load(run_id)

    def download_model(self, experiment_name: str, run_name: str) -> Any | None:
        """The model of the run named ``run_name`` in the experiment ``experiment_name``."""
        return self._lookup.load_named(experiment_name, run_name)

    def download_best_model(self, experiment_id: str) -> Any:
        """The best model of an experiment; the initial model if it holds none."""
        return self._lookup.load_best(experiment_id)

    def download_last_model(self) -> Any:
        """The model the next iteration starts from (see :meth:`get_last_model_run`); else
        the initial model."""
        return self._tracker.load_best(self._lookup.last_run)

    def get_top_params_by_experiment_id(
        self, experiment_id: str, params_type: type[P] | None = None
    ) -> list[P] | None:
        """The params of the best ``n_top_runs`` FINISHED runs of an experiment that logged
        the main metric, best first, typed; None if there are none or for the initial one."""
        return self._tracker.top_params(experiment_id, params_type)  # type: ignore[return-value]

    def get_top_params(self, params_type: type[P] | None = None) -> list[P] | None:
        """Top params of the iteration the next one starts from (see
        :meth:`get_last_model_run`); None if there is none."""
        run = self.get_last_model_run()
        if run is None:
            return None
        return self.get_top_params_by_experiment_id(run.experiment_id, params_type)

    # ------------------------------------------------------------------ reconcile (gc, verify)
    def find_orphaned_models(
        self, *, include_running: bool = False, max_depth: int = 4
    ) -> OrphanScan:
        """Model folders no run marks and incomplete uploads whose writer is gone."""
        return self._tracker.reconcile.find_orphans(
            include_running=include_running, max_depth=max_depth, lease_seconds=self.lease_seconds
        )

    def delete_orphaned_model(self, orphan: OrphanedModel) -> bool:
        """Delete one folder found by :meth:`find_orphaned_models`; True when it is gone."""
        return self._tracker.reconcile.delete_orphan(orphan)

    def abort_orphaned_upload(self, upload: OrphanedUpload) -> None:
        """Abort one incomplete upload found by :meth:`find_orphaned_models`."""
        self._tracker.reconcile.abort_upload(upload)

    def delete_abandoned_twin(self, twin: AbandonedTwin) -> bool:
        """Delete a run of :attr:`OrphanScan.twins` if it is still abandoned; True if deleted."""
        return self._tracker.reconcile.delete_twin(twin, lease_seconds=self.lease_seconds)

    def find_models_missing_files(self) -> MissingScan:
        """Runs marked as holding a model whose files are gone (``tracker-core verify``)."""
        return self._tracker.reconcile.find_missing_files(lease_seconds=self.lease_seconds)

    def unmark_model_missing_files(self, model: MissingModel) -> bool:
        """Unmark a run found by :meth:`find_models_missing_files` as a deletion would."""
        return self._tracker.reconcile.unmark_missing(model, lease_seconds=self.lease_seconds)

    # ------------------------------------------------------------------ promotion and lineage
    @property
    def promotion(self) -> Promoter:
        """The champion in the model registry: ``champion()``, ``promote_run``, ``rollback``
        (:mod:`tracker_core.promotion`)."""
        return self._tracker.promoter

    @property
    def lineage(self) -> Lineage:
        """The permanent records of the iterations (:mod:`tracker_core.lineage`)."""
        return self._tracker.lineage

    @property
    def registry(self) -> RetryingRegistryStore | None:
        """The model registry, behind the retry policy; None if the tracking store has none."""
        return self._tracker.stores.registry

    def promote(
        self,
        holdout: Callable[[Any], float] | None = None,
        *,
        start_run_id: str | None = None,
        by: str | None = None,
    ) -> Conclusion:
        """Conclude the current iteration of a hand-written loop, once its runs ended (before
        :meth:`delete_previous_iteration`): its best model, scored by ``holdout`` (a fixed
        evaluation, same direction as the main metric), becomes the champion if it beats
        the champion; its lineage record is written (also without ``holdout``).

        ``start_run_id``: the run whose model the iteration started from (default: the
        iteration's ``run_id``, else the champion's run, else the last model's, else the
        initial model's). Repeatable: a second call finds the decision made."""
        return continual.promote(self._tracker, holdout, start_run_id=start_run_id, by=by)

    def download_champion_model(self) -> Any:
        """The champion's model (``models:/<name>@champion``); before the first promotion,
        the model :meth:`download_last_model` gives."""
        return self._lookup.load_champion()
