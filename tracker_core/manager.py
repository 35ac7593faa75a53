"""ExperimentsManager: the seed's API, written once for every backend.

The manager is the public face: it checks arguments, holds the lock and the current iteration,
and delegates each concept to the module that implements it:

- :mod:`tracker_core.iterations`: iteration experiments, lookups newest first, safe deletion;
- :mod:`tracker_core.initial`: the initial model, uploaded once, never cleaned up;
- :mod:`tracker_core.runs`: the current run, its lease, its metrics, how it ends;
- :mod:`tracker_core.models`: writing, marking, pruning and serving models;
- :mod:`tracker_core.reconcile`: what crashes leave (``tracker-core gc`` and ``verify``);
- :mod:`tracker_core.ranking`: the one order of runs (best model, best quality, top params).

Every store call goes through one retry policy (:mod:`tracker_core.remote`).

Thread-safety: a manager tracks one iteration and one run at a time; its methods are
serialised by a lock, so sharing one manager between threads is safe but runs their work one
after another. For concurrent runs, use one manager per thread or process: managers share no
state (no MLflow fluent API, no globals).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs

from tracker_core import leases
from tracker_core import tags as T
from tracker_core.accumulators import MetricsAccumulator
from tracker_core.codecs import ModelFactory, get_codec
from tracker_core.errors import (
    ConfigurationError,
    InvalidMetricError,
    ModelFilesMissingError,
    ModelNotFoundError,
    NoActiveIterationError,
    TrackerError,
)
from tracker_core.initial import InitialModel
from tracker_core.iterations import Iterations
from tracker_core.models import ModelKeeper, is_marked
from tracker_core.params import FineTuningParams
from tracker_core.ranking import Ranking, TopRuns
from tracker_core.reconcile import (
    AbandonedTwin,
    MissingModel,
    MissingScan,
    OrphanedModel,
    OrphanedUpload,
    OrphanScan,
    Reconciler,
)
from tracker_core.registry import get_backend, scheme_of
from tracker_core.remote import Remote
from tracker_core.retry import Retrier, RetryConfig
from tracker_core.runs import RunTracker
from tracker_core.stores import ArtifactStore, TrackingStore
from tracker_core.values import (
    ExperimentRecord,
    FineTuningIteration,
    MetricValue,
    RunRecord,
    RunStatus,
    validate_metric_name,
    validate_name,
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

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACT_URI = "mlartifacts"

_live_managers: weakref.WeakSet[ExperimentsManager] = weakref.WeakSet()


@atexit.register
def _at_exit() -> None:
    """Queued metrics reach the store; a run still held is let go (resumable at once)."""
    for manager in list(_live_managers):
        try:
            manager.flush_metrics()
        except Exception:
            log.exception("could not flush metrics of %r at exit", manager)
        with contextlib.suppress(Exception):
            manager._runs.release()


def _check_storage_uri(uri: str) -> None:
    """Credentials never travel in a storage URI (they would end up in logs, ``repr`` and the
    tracking database as the experiments' artifact locations)."""
    parts = urlsplit(uri)
    if len(parts.scheme) > 1 and (parts.username or parts.password):
        shown = f"{parts.scheme}://***@{parts.hostname or ''}{parts.path}"
        raise ConfigurationError(
            f"the storage URI {shown} carries credentials: give them through storage_options= "
            "(s3fs: key=/secret=, gcsfs: token=) or the standard credential chain "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profiles, GOOGLE_APPLICATION_CREDENTIALS)"
        )


@attrs.frozen
class ActiveRun:
    """What ``with manager.run(params) as run`` yields. ``finished``: the run ended in an
    earlier attempt, so the block has nothing to do (skip it with ``continue``)."""

    run_id: str
    params: FineTuningParams
    finished: bool


class ExperimentsManager:
    """Fine-tuning experiment management over a tracking store and an artifact store.

    Every fine-tuning iteration is an experiment named after :class:`FineTuningIteration`;
    every params set tried in it is a run whose identity is the params' hash. Only the best
    ``keep`` models of an iteration are kept (ranked by the final value of ``main_metric``,
    lower is better when ``is_loss``); the initial model lives in its own experiment and is
    never removed by iteration cleanup. One worker trains a run at a time (a lease renewed by
    a heartbeat; a dead worker's run is resumable ``lease_seconds`` after it died).

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
        lease_seconds: float = leases.DEFAULT_LEASE_SECONDS,
        tracking_store: TrackingStore | None = None,
        artifact_store: ArtifactStore | None = None,
    ) -> None:
        validate_metric_name(main_metric, "main_metric")
        validate_name(plugin_name, "plugin_name")
        if n_top_runs < 1:
            raise ConfigurationError(f"n_top_runs must be >= 1, got {n_top_runs}")
        if keep < 1:
            raise ConfigurationError(f"keep must be >= 1, got {keep}")
        if not (isinstance(lease_seconds, int | float) and 0 < lease_seconds < math.inf):
            raise ConfigurationError(f"lease_seconds must be a positive number: {lease_seconds!r}")
        artifact_uri = artifact_uri or DEFAULT_ARTIFACT_URI
        _check_storage_uri(artifact_uri)
        self._main_metric, self._plugin_name, self._is_loss = main_metric, plugin_name, is_loss
        self.n_top_runs, self.keep = n_top_runs, keep
        self.requirements = list(requirements) if requirements else None
        self.retry_config = retry_config or RetryConfig()
        self.model_factory, self.params_type = model_factory, params_type

        backend = None
        if tracking_store is None or artifact_store is None:
            backend = get_backend(scheme_of(artifact_uri))
        retrier = Retrier(self.retry_config)
        if artifact_store is None:
            assert backend is not None
            artifact_store = backend.artifact_store(
                artifact_uri, storage_options=storage_options, retrier=retrier
            )
        if tracking_store is None:
            assert backend is not None
            resolved = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            tracking_store = backend.tracking_store(
                resolved or DEFAULT_TRACKING_URI, retrier=retrier
            )
        self.tracking_uri = getattr(tracking_store, "uri", tracking_uri)
        self.model_format = model_format or (
            backend.default_model_format if backend is not None else "state_dict"
        )
        get_codec(self.model_format)  # unknown formats fail here, before anything is written
        remote = self._remote = Remote(tracking_store, artifact_store, retrier)
        self.ranking = Ranking(main_metric, bool(is_loss))
        self.models = ModelKeeper(
            tracking_store, artifact_store, self.ranking, track=remote.track, art=remote.art
        )
        self._runs = RunTracker(remote, main_metric, accumulators, lease_seconds=lease_seconds)
        self._iterations = Iterations(
            plugin_name, remote, self.models, lease_ttl_ms=lambda: self._runs.ttl_ms
        )
        self._initial = InitialModel(remote, self._iterations, self._runs, self.models)
        self._reconcile = Reconciler(remote, self.models)
        self._top = TopRuns(remote, self.ranking)
        self._lock = threading.RLock()
        self._iteration: FineTuningIteration | None = None
        self._experiment: ExperimentRecord | None = None
        _live_managers.add(self)

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
        """End the current run implicitly (see :meth:`set_run`), flush, release the stores."""
        try:
            with self._lock:
                self._runs.end_implicitly()
        finally:
            self._runs.close()
            self.tracking.close()
            self.artifacts.close()

    def __enter__(self) -> ExperimentsManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    # ------------------------------------------------------------------ initial model
    def _get_initial_experiment(self, create: bool = False) -> ExperimentRecord | None:
        return self._initial.experiment(create)

    def get_initial_run_id(self) -> str | None:
        """The run id of the initial model's run, or None if it was never created."""
        run = self._initial.run()
        return run.run_id if run else None

    def is_initial_run(self, run_id: str) -> bool:
        """Whether ``run_id`` is the initial model's run."""
        return run_id is not None and run_id == self.get_initial_run_id()

    def has_initial_model(self) -> bool:
        """Whether the initial model was uploaded completely (marked) and its files are there."""
        return self._initial.exists()

    def get_initial_model_run_id(self) -> str | None:
        """The initial model's run id; None (and an error logged) if no initial model exists."""
        run = self._initial.marked_run()
        if run is None:
            log.error("no initial model uploaded for plugin %r", self._plugin_name)
        return run.run_id if run else None

    def upload_initial_model(self, model: Any, model_format: str | None = None) -> bool:
        """Upload the initial model once; False (nothing uploaded) if it exists. Ends any
        current iteration first; concurrent uploaders agree on one upload; missing files are
        uploaded again (see :mod:`tracker_core.initial`)."""
        with self._lock:
            self.finish_iteration()
            fmt = model_format or self.model_format
            return self._initial.upload(model, fmt, self.requirements)

    # ------------------------------------------------------------------ iterations
    def get_experiments(self) -> list[ExperimentRecord]:
        """Every iteration experiment of this plugin, newest first (the initial one excluded)."""
        return self._iterations.all()

    def get_previous_iteration_id(self) -> str | None:
        """The newest iteration created before the current one; None without a current iteration."""
        if self._experiment is None:
            log.warning("get_previous_iteration_id: no current iteration is set")
            return None
        found = self._iterations.previous(self._experiment)
        return found.experiment_id if found else None

    def get_last_iteration_id(self) -> str | None:
        """The newest iteration other than the current one."""
        found = self._iterations.latest(self._iterations.query(self._experiment))
        return found.experiment_id if found else None

    def get_last_finished_iteration_id(self) -> str | None:
        """The newest iteration, other than the current one, that has runs, all ended."""
        return self._iterations.last_finished(self._experiment)

    def _previous_or_last_finished(self) -> str | None:
        """The previous iteration, or the last finished one when no iteration is current."""
        if self._experiment is not None:
            return self.get_previous_iteration_id()
        return self.get_last_finished_iteration_id()

    def _set_experiment_with_name(self, experiment_name: str) -> None:
        """Make the experiment with that name (created if needed) the current iteration."""
        batch = self._iteration.batch_id if self._iteration else ""
        tags = self._iterations.tags(T.KIND_ITERATION, batch)
        self._experiment = self._iterations.get_or_create(experiment_name, tags)

    def _set_experiment_with_id(self, experiment_id: str) -> None:
        """Make the experiment with that id the current iteration."""
        experiment = self._iterations.get(experiment_id)
        if experiment is None or experiment.lifecycle_stage != "active":
            raise TrackerError(f"experiment {experiment_id} does not exist or is deleted")
        self._experiment = experiment

    def set_iteration(self, iteration: FineTuningIteration) -> None:
        """Start (or resume) the iteration; its experiment is created if it does not exist.
        A current run is ended implicitly (see :meth:`set_run`)."""
        if iteration.plugin_name != self._plugin_name:
            raise ConfigurationError(
                f"iteration is for plugin {iteration.plugin_name!r}, "
                f"this manager tracks {self._plugin_name!r}"
            )
        with self._lock:
            self.finish_iteration()
            self._iteration = iteration
            try:
                self._set_experiment_with_name(str(iteration))
            except BaseException:
                self._iteration = None
                raise
            log.info("iteration %r (%s)", str(iteration), self.current_experiment_id)

    def finish_iteration(self) -> None:
        """End the current iteration (a current run ends implicitly, see :meth:`set_run`)."""
        with self._lock:
            self._runs.end_implicitly()
            self._iteration = None
            self._experiment = None

    def _require_iteration(self) -> ExperimentRecord:
        if self._experiment is None:
            raise NoActiveIterationError(
                "no current fine-tuning iteration: call set_iteration(...) first"
            )
        return self._experiment

    def delete_previous_iteration(self) -> None:
        """Delete the previous iteration: its models, then the experiment. Refused, nothing
        deleted, while the current iteration holds no model (:class:`NoModelToKeepError`) or
        live workers hold runs of the previous one (:class:`IterationInUseError`); never the
        initial experiment (see :mod:`tracker_core.iterations`)."""
        with self._lock:
            if self._experiment is None:
                log.warning("delete_previous_iteration: no current iteration is set")
                return
            self._iterations.delete_previous(self._experiment, self._delete_marked_model)

    def delete_iteration(self, experiment_id: str, *, defer: bool = False) -> bool:
        """Delete one iteration (never the initial or current one); True once deleted. While
        live workers hold its runs: :class:`IterationInUseError`, or with ``defer`` marked for
        :meth:`delete_pending_iterations` and False (see :mod:`tracker_core.iterations`)."""
        with self._lock:
            return self._iterations.delete_or_defer(
                experiment_id,
                current_id=self.current_experiment_id,
                delete_model=self._delete_marked_model,
                defer=defer,
            )

    def delete_pending_iterations(self) -> list[str]:
        """Delete the deferred iterations no live worker holds any more; their ids."""
        with self._lock:
            return self._iterations.delete_pending(
                current_id=self.current_experiment_id, delete_model=self._delete_marked_model
            )

    def abandon_iteration(self) -> None:
        """Forget the current run and iteration *without* ending them, as after an interrupt:
        the run stays RUNNING, its lease released (resumable at once); queued metrics are
        sent if the store allows, then dropped."""
        with self._lock:
            try:
                self.flush_metrics()
            except Exception:
                log.warning("could not flush the metrics of the abandoned run", exc_info=True)
            self._runs.release()
            self._iteration = None
            self._experiment = None

    # ------------------------------------------------------------------ runs
    def _start_run(self, params: FineTuningParams) -> tuple[RunRecord, bool]:
        """Find or create the current iteration's run for ``params`` (True if created)."""
        experiment = self._require_iteration()
        assert self._iteration is not None
        tags = {
            T.TAG_PLUGIN: self._plugin_name,
            T.TAG_PARAMS_ID: params.id,
            T.TAG_PARAMS_TYPE: f"{type(params).__module__}:{type(params).__qualname__}",
        }
        mlflow_params = {**self._iteration.to_params(), **params.to_mlflow()}
        return self._runs.get_or_create(experiment.experiment_id, params.id, tags, mlflow_params)

    def _save_params(self) -> None:
        """Log the iteration's and the current run's params again (idempotent)."""
        run, params = self._runs.require(), self._runs.params
        assert self._iteration is not None and params is not None
        values = {**self._iteration.to_params(), **params.to_mlflow()}
        self._remote.track("log_params", self.tracking.log_batch, run.run_id, (), values)

    def _set_run(self, params: FineTuningParams, wait: float = 0.0) -> bool:
        """Start or resume the run of ``params``; True if it is new or unfinished (to train)."""
        run, created = self._start_run(params)
        return not self._runs.start(run, params, created=created, wait=wait)

    def set_run(self, params: FineTuningParams, *, wait: float = 0.0) -> bool:
        """Start the run of ``params`` in the current iteration, or resume an unfinished one.

        True if it already ended in an earlier attempt (skip it). A run held by another live
        worker is waited for up to ``wait`` seconds (``math.inf``: until it ends or its worker
        dies), then :class:`~tracker_core.errors.RunInUseError`. A current run is ended first:
        FINISHED if it logged the main metric, else left resumable (see :mod:`tracker_core.runs`).
        """
        if not isinstance(params, FineTuningParams):
            raise ConfigurationError(
                f"params must be FineTuningParams, got {type(params).__name__}"
            )
        with self._lock:
            self._require_iteration()
            self._runs.end_implicitly()
            return not self._set_run(params, wait)

    @contextlib.contextmanager
    def run(self, params: FineTuningParams, *, wait: float = 0.0) -> Iterator[ActiveRun]:
        """``with manager.run(params) as run:`` - :meth:`set_run`, then the block, then the end:
        FINISHED when the block completes (the main metric must have been logged), FAILED
        when it raises an ``Exception`` (re-raised), left unfinished and resumable on an
        interrupt (``KeyboardInterrupt``, ``SystemExit``). ``run.finished`` tells that the run
        ended in an earlier attempt: ``continue`` to skip it."""
        finished = self.set_run(params, wait=wait)
        active = ActiveRun(self.current_run_id or "", params, finished)

        def still_current() -> bool:
            return self.current_run_id == active.run_id

        try:
            yield active
        except Exception:
            with self._lock:
                if still_current() and not finished:
                    try:
                        self.finish_run(as_failed=True)
                    except Exception:  # never hide the block's own error
                        log.warning("could not mark run %s FAILED", active.run_id, exc_info=True)
            raise
        except BaseException:
            with self._lock:
                if still_current():
                    self._runs.release()
            raise
        with self._lock:
            if still_current():
                self.finish_run()

    def finish_run(self, as_failed: bool = False) -> None:
        """End the current run, FINISHED or (``as_failed``) FAILED, once its queued metrics
        reached the store (not ended, the error raised, if they cannot be sent). FINISHED
        needs a value of the main metric (:class:`InvalidMetricError`)."""
        with self._lock:
            if self._runs.run is None:
                log.warning("finish_run: no active run")
                return
            self._runs.finish(RunStatus.FAILED if as_failed else RunStatus.FINISHED)

    def _forget_run(self) -> None:
        """Drop the current run as a dying process would (tests simulate crashes with it)."""
        with self._lock:
            self._runs.forget()

    def get_run_by_id(self, run_id: str, models_only: bool = False) -> RunRecord | None:
        """The run with that id; with ``models_only``, None unless it holds a marked model."""
        run = self._runs.get(run_id)
        if run is None or (models_only and not is_marked(run)):
            return None
        return run

    def _get_run(self, run_id: str) -> RunRecord:
        return self._runs.get_existing(run_id)

    # ------------------------------------------------------------------ metrics and quality
    def save_metric(self, metric_value: MetricValue) -> None:
        """Feed the value to the accumulators and queue what they yield (the value itself
        when none takes its name). Queued values are sent in batches, and always by
        :meth:`finish_run`, :meth:`save_model`, :meth:`get_quality` and at exit
        (see :mod:`tracker_core.metrics`)."""
        if not isinstance(metric_value, MetricValue):
            raise InvalidMetricError(f"expected a MetricValue, got {type(metric_value).__name__}")
        with self._lock:
            self._runs.add_metric(metric_value)

    def flush_metrics(self) -> None:
        """Send queued metric values now. A retried batch never logs a value twice; a batch
        that cannot be sent stays queued."""
        with self._lock:
            self._runs.flush()

    def get_quality(self) -> float:
        """The current run's main metric, final value. Raises if there is no run or no value."""
        with self._lock:
            return self._runs.quality()

    def _get_best_quality(self, experiment_id: str) -> tuple[str | None, float]:
        """Best FINISHED run of the experiment by the main metric, and its quality."""
        return self._top.best_quality(experiment_id, self.n_top_runs)

    def get_best_quality(self) -> tuple[str | None, float]:
        """Best finished run of the current iteration and its quality."""
        return self._get_best_quality(self._require_iteration().experiment_id)

    # ------------------------------------------------------------------ saving and deleting models
    def _marked_runs(self, experiment_id: str) -> list[RunRecord]:
        """Runs of the experiment holding a completely written model, best first."""
        return self.models.marked_runs(experiment_id)

    def _model_uri(self, run: RunRecord) -> str:
        return self.models.uri_of(run)

    def _save_model(self, model: Any) -> str:
        """Upload the current run's model and mark it; returns its URI."""
        run = self._runs.require()
        self.flush_metrics()
        return self.models.write_and_mark(
            run, model, self.model_format, self.requirements, before_mark=self._runs.require
        )

    def save_model(self, model: Any, best_only: bool = True) -> bool:
        """Save the current run's model; True if it was written. With ``best_only``, only
        if fewer than ``keep`` marked models of the iteration are better, and models below
        ``keep`` marked ones are pruned after (see :mod:`tracker_core.models`). Raises
        :class:`~tracker_core.errors.LeaseLostError` if another worker took the run over."""
        with self._lock:
            experiment = self._require_iteration()
            run = self._runs.require()
            if not best_only:
                self._save_model(model)
                return True
            self.flush_metrics()
            fresh = self._get_run(run.run_id)
            self._runs.check_lease(fresh)
            if not self.models.among_best(fresh, self.keep):
                return False
            self._save_model(model)
            self.models.prune(experiment.experiment_id, self.keep, self._delete_marked_model)
            return True

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
        """Delete the model of a run (of the current iteration unless ``experiment_id``);
        never the initial model. False, with a warning, when the run holds no model."""
        with self._lock:
            experiment_id = experiment_id or self._require_iteration().experiment_id
            if self._iterations.is_initial(experiment_id):
                raise ConfigurationError("deleting the initial model is not allowed")
            run = self.get_run_by_id(run_id)
            if run is None or run.experiment_id != experiment_id or not is_marked(run):
                log.warning("run %s of experiment %s holds no model", run_id, experiment_id)
                return False
            return self._delete_marked_model(run)

    def model_is_uploaded(self) -> bool:
        """Whether the current run holds a marked model."""
        return is_marked(self._get_run(self._runs.require().run_id))

    # ------------------------------------------------------------------ best runs and URLs
    def _best_previous_run(self) -> RunRecord | None:
        previous = self._previous_or_last_finished()
        return self.models.best_run(previous) if previous is not None else None

    def _get_best_previous_run_id(self) -> tuple[str | None, bool]:
        """Best model run of the previous iteration (the last finished one when no iteration
        is current). ``(None, True)`` when there is no previous iteration."""
        previous = self._previous_or_last_finished()
        if previous is None:
            return None, True
        run = self.models.best_run(previous)
        return (run.run_id if run else None), False

    def get_best_current_run_id(self) -> tuple[str | None, bool]:
        """Best model run of the current iteration; ``(None, True)`` without a current iteration."""
        if self._experiment is None:
            return None, True
        best = self.models.best_run(self._experiment.experiment_id)
        return (best.run_id if best else None), False

    def get_last_model_url(self) -> str | None:
        """Storage URL of the previous iteration's best model; None if there is none."""
        run = self._best_previous_run()
        return self.models.uri_of(run) if run else None

    def get_current_model_url(self) -> str | None:
        """Storage URL of the current iteration's best model; None if there is none."""
        run = self.models.best_run(self._experiment.experiment_id) if self._experiment else None
        if run is None:
            log.info("no model in the current iteration")
        return self.models.uri_of(run) if run else None

    # ------------------------------------------------------------------ lookups for tools
    def get_experiment(self, experiment_id: str) -> ExperimentRecord | None:
        """The experiment with that id (active or deleted); None if there is none."""
        return self._iterations.get(experiment_id)

    def get_experiment_by_name(self, name: str) -> ExperimentRecord | None:
        """The active experiment with that name; None if there is none."""
        return self._iterations.by_name(name)

    def get_runs(
        self, experiment_id: str, *, statuses: Sequence[RunStatus] = (), marked_only: bool = False
    ) -> list[RunRecord]:
        """Active runs of an experiment, optionally only those holding a marked model."""
        tags = {T.TAG_MODEL_UPLOADED: T.TRUE} if marked_only else {}
        return self._iterations.runs(experiment_id, tuple(statuses), tags=tags)

    def has_unfinished_runs(self, experiment_id: str) -> bool:
        """Whether any run of the experiment is still RUNNING or SCHEDULED."""
        return self._iterations.has_unfinished_runs(experiment_id)

    def get_best_model_run(self, experiment_id: str) -> RunRecord | None:
        """The run holding the best marked model of an experiment (never a FAILED run)."""
        return self.models.best_run(experiment_id)

    # ------------------------------------------------------------------ reconcile (gc, verify)
    def find_orphaned_models(
        self, *, include_running: bool = False, max_depth: int = 4
    ) -> OrphanScan:
        """Model folders no run marks and incomplete uploads whose writer is gone: what
        crashes leave (see :meth:`Reconciler.find_orphans`)."""
        return self._reconcile.find_orphans(
            include_running=include_running, max_depth=max_depth, lease_seconds=self.lease_seconds
        )

    def delete_orphaned_model(self, orphan: OrphanedModel) -> bool:
        """Delete one folder found by :meth:`find_orphaned_models`; True when it is gone."""
        return self._reconcile.delete_orphan(orphan)

    def abort_orphaned_upload(self, upload: OrphanedUpload) -> None:
        """Abort one incomplete upload found by :meth:`find_orphaned_models`."""
        self._reconcile.abort_upload(upload)

    def delete_abandoned_twin(self, twin: AbandonedTwin) -> bool:
        """Delete a run of :attr:`OrphanScan.twins` if it is still abandoned; True if deleted."""
        return self._reconcile.delete_twin(twin, lease_seconds=self.lease_seconds)

    def find_models_missing_files(self) -> MissingScan:
        """Runs marked as holding a model whose files are gone (``tracker-core verify``)."""
        return self._reconcile.find_missing_files(lease_seconds=self.lease_seconds)

    def unmark_model_missing_files(self, model: MissingModel) -> bool:
        """Unmark a run found by :meth:`find_models_missing_files` as a deletion would."""
        return self._reconcile.unmark_missing(model, lease_seconds=self.lease_seconds)

    # ------------------------------------------------------------------ downloads
    def _marked_run(self, run_id: str) -> RunRecord:
        run = self.get_run_by_id(run_id, models_only=True)
        if run is None:
            raise ModelNotFoundError(f"run {run_id} holds no model")
        return run

    def _load(self, run: RunRecord) -> Any:
        return self.models.load(run, self.model_format, self.model_factory)

    def download_model_files(
        self, run_id: str, destination: Path, progress: bool | None = None
    ) -> Path:
        """Copy the run's marked model files into ``destination``; returns the model folder."""
        return self.models.download_files(self._marked_run(run_id), Path(destination), progress)

    def download_model_by_run_id(self, run_id: str) -> Any | None:
        """The run's model; None if the run holds none (logged at INFO; its files missing
        raise :class:`ModelFilesMissingError`). Store failures raise."""
        try:
            return self._load(self._marked_run(run_id))
        except ModelFilesMissingError:
            raise
        except ModelNotFoundError as exc:
            log.info("no model to download: %s", exc)
            return None

    def download_initial_model(self) -> Any:
        """The initial model. Raises :class:`ModelNotFoundError` if it was never uploaded."""
        return self._load(self._initial.require())

    def download_model(self, experiment_name: str, run_name: str) -> Any | None:
        """The model of the run named ``run_name`` in the experiment ``experiment_name``."""
        experiment = self._iterations.by_name(experiment_name)
        if experiment is None:
            log.warning("no experiment named %r", experiment_name)
            return None
        run = self._runs.first(experiment.experiment_id, run_name=run_name)
        if run is None:
            log.warning("no run named %r in %r", run_name, experiment_name)
            return None
        return self.download_model_by_run_id(run.run_id)

    def _download_best(self, pick: Callable[[], RunRecord | None]) -> Any:
        """The model of the run ``pick()`` returns, else the initial model; picked again if
        it is deleted while read (see :meth:`ModelKeeper.load_best`)."""
        return self.models.load_best(
            pick, self._initial.require, self.model_format, self.model_factory
        )

    def download_best_model(self, experiment_id: str) -> Any:
        """The best model of an experiment; the initial model if it holds none."""

        def pick() -> RunRecord | None:
            best = self.models.best_run(experiment_id)
            if best is None:
                log.info("experiment %s holds no model; using the initial model", experiment_id)
            return best

        return self._download_best(pick)

    def download_last_model(self) -> Any:
        """Best model of the previous (or last finished) iteration; else the initial model."""
        return self._download_best(self._best_previous_run)

    # ------------------------------------------------------------------ top params
    def get_top_params_by_experiment_id(
        self, experiment_id: str, params_type: type[P] | None = None
    ) -> list[P] | None:
        """The params of the best ``n_top_runs`` FINISHED runs of an experiment that logged
        the main metric, best first, typed (see :class:`~tracker_core.ranking.TopRuns`);
        None if there are none or for the initial experiment."""
        if self._iterations.is_initial(experiment_id):
            return None
        current = type(self._runs.params) if self._runs.params is not None else None
        preferred = (params_type, self.params_type, current)
        return self._top.params(experiment_id, self.n_top_runs, *preferred)  # type: ignore[return-value]

    def get_top_params(self, params_type: type[P] | None = None) -> list[P] | None:
        """Top params of the previous iteration (the last finished one when no iteration is
        current); None if there are none."""
        previous = self._previous_or_last_finished()
        if previous is None:
            return None
        return self.get_top_params_by_experiment_id(previous, params_type)
