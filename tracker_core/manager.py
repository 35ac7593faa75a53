"""ExperimentsManager: the seed's API, written once for every backend.

The manager is the public face: it checks arguments, holds the lock and the current iteration,
and delegates each concept to the module that implements it. Its methods are grouped by
concept in :mod:`tracker_core.facade` (iterations, runs and metrics, models, reconcile); this
module builds the state they share and owns the manager's life (open, close, exit):

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
import logging
import os
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tracker_core import arguments, leases
from tracker_core.accumulators import MetricsAccumulator
from tracker_core.codecs import ModelFactory, get_codec
from tracker_core.errors import ConfigurationError
from tracker_core.facade.iterations import IterationsAPI
from tracker_core.facade.models import ModelsAPI
from tracker_core.facade.reconcile import ReconcileAPI
from tracker_core.facade.runs import ActiveRun, RunsAPI
from tracker_core.initial import InitialModel
from tracker_core.iterations import Iterations
from tracker_core.models import ModelKeeper
from tracker_core.params import FineTuningParams
from tracker_core.ranking import Ranking, TopRuns
from tracker_core.reconcile import (
    OrphanedModel,
    OrphanScan,
    Reconciler,
)
from tracker_core.registry import get_backend, scheme_of
from tracker_core.remote import Remote
from tracker_core.retry import Retrier, RetryConfig
from tracker_core.runs import RunTracker
from tracker_core.stores import ArtifactStore, TrackingStore
from tracker_core.uris import has_secret_query, has_userinfo, redact_uri
from tracker_core.values import (
    ExperimentRecord,
    FineTuningIteration,
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

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACT_URI = "mlartifacts"

_live_managers: weakref.WeakSet[ExperimentsManager] = weakref.WeakSet()


@atexit.register
def _at_exit() -> None:
    """Queued metrics reach the store; a run still held is let go (resumable at once). Each
    store call is tried once; a store that is gone (a deleted temporary folder, a server
    stopped first) costs one line: a WARNING if metric values were lost, else DEBUG."""
    for manager in list(_live_managers):
        manager._remote.single_attempt()
        run_id, queued = manager.current_run_id, len(manager._runs.metrics)
        try:
            manager.flush_metrics()
        except Exception as exc:
            log.warning(
                "%d metric value(s) of run %s could not be sent at exit: %s",
                *(queued, run_id, _one_line(exc)),
            )
        try:
            manager._runs.release(at_exit=True)
        except Exception as exc:
            log.debug("could not let go of run %s at exit: %s", run_id, _one_line(exc))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _check_storage_uri(uri: str) -> None:
    """Credentials never travel in a storage URI (they would end up in logs, ``repr`` and the
    tracking database as the experiments' artifact locations). The refused URI is shown
    redacted, never as given."""
    if has_userinfo(uri) or has_secret_query(uri):
        raise ConfigurationError(
            f"the storage URI {redact_uri(uri, keep_user=False)} carries credentials: give them "
            "through storage_options= (s3fs: key=/secret=, gcsfs: token=) or the standard "
            "credential chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profiles, "
            "GOOGLE_APPLICATION_CREDENTIALS)"
        )


class ExperimentsManager(RunsAPI, ModelsAPI, IterationsAPI, ReconcileAPI):
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
        if tracking_uri is not None:
            arguments.text("tracking_uri", tracking_uri)
        accumulators = arguments.instances(
            "accumulators", accumulators, MetricsAccumulator, "MetricsAccumulator instances"
        )
        is_loss = arguments.flag("is_loss", is_loss)
        n_top_runs = arguments.positive_int("n_top_runs", n_top_runs)
        requirements = arguments.string_list("requirements", requirements)
        arguments.optional_instance("retry_config", retry_config, RetryConfig, "a RetryConfig")
        if artifact_uri is not None:
            arguments.text("artifact_uri", artifact_uri)
        storage_options = arguments.optional_mapping("storage_options", storage_options)
        keep = arguments.positive_int("keep", keep)
        if model_format is not None:
            arguments.text("model_format", model_format)
        arguments.optional_callable("model_factory", model_factory, "an empty torch.nn.Module")
        arguments.optional_subclass("params_type", params_type, FineTuningParams)
        lease_seconds = arguments.seconds(
            "lease_seconds", lease_seconds, maximum=arguments.MAX_LEASE_SECONDS
        )
        arguments.optional_store("tracking_store", tracking_store, TrackingStore)
        arguments.optional_store("artifact_store", artifact_store, ArtifactStore)
        artifact_uri = artifact_uri or DEFAULT_ARTIFACT_URI
        _check_storage_uri(artifact_uri)
        self._main_metric, self._plugin_name, self._is_loss = main_metric, plugin_name, is_loss
        self.n_top_runs, self.keep = n_top_runs, keep
        self.requirements = requirements or None
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
            f"{type(self).__name__}(plugin={self._plugin_name!r}, metric={self._main_metric!r}, "
            f"is_loss={self._is_loss}, artifacts={self.artifacts.root!r})"
        )

    def close(self) -> None:
        """End the current run implicitly (see :meth:`set_run`), flush, release the stores."""
        try:
            with self._lock:
                self._end_run_implicitly()
        finally:
            self._runs.close()
            self.tracking.close()
            self.artifacts.close()

    def __enter__(self) -> ExperimentsManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
