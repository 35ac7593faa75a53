"""``tracker_core.connect``: one call from an artifact URI to a ready manager."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tracker_core import arguments
from tracker_core.accumulators import MetricsAccumulator
from tracker_core.clock import SYSTEM_CLOCK, Clock
from tracker_core.codecs import ModelFactory
from tracker_core.leases import DEFAULT_LEASE_SECONDS
from tracker_core.manager import ExperimentsManager
from tracker_core.params import FineTuningParams
from tracker_core.promotion import PromotionConfig
from tracker_core.retry import RetryConfig
from tracker_core.stores import ArtifactStore, TrackingStore

__all__ = ["connect"]


def connect(
    artifact_uri: str,
    *,
    tracking_uri: str | None = None,
    main_metric: str,
    plugin_name: str,
    is_loss: bool = False,
    n_top_runs: int = 10,
    accumulators: Iterable[MetricsAccumulator] = (),
    storage_options: Mapping[str, Any] | None = None,
    retry: RetryConfig | None = None,
    keep: int = 1,
    model_format: str | None = None,
    model_factory: ModelFactory | None = None,
    params_type: type[FineTuningParams] | None = None,
    requirements: Sequence[str] | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    tracking_store: TrackingStore | None = None,
    artifact_store: ArtifactStore | None = None,
    clock: Clock = SYSTEM_CLOCK,
    promotion: PromotionConfig | None = None,
) -> ExperimentsManager:
    """A manager keeping models at ``artifact_uri`` and tracking runs at ``tracking_uri``.

    The scheme of ``artifact_uri`` picks the backend: ``file://`` or a plain path (local),
    ``s3://bucket/prefix`` (S3), ``gs://`` / ``gcs://`` (GCS). ``tracking_uri`` defaults to
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``. ``storage_options`` pass through
    to the fsspec filesystem. ``lease_seconds``: how long a run stays locked to a worker
    that stopped renewing its lease (it died); the run is resumable after that. Raises
    :class:`~tracker_core.errors.UnknownSchemeError` (listing the installed schemes) for a
    scheme no installed backend serves.

    ``tracking_store`` / ``artifact_store``: stores to use instead of those the backend
    makes (wrappers for fault injection, third-party setups; see
    :func:`~tracker_core.opening.open_stores`); ``clock``: what leases and waits read the
    time from (tests step it). ``promotion``: the registered model, margin and webhook of
    champion/challenger promotion (:mod:`tracker_core.promotion`; default
    :meth:`PromotionConfig.from_env`).
    """
    arguments.text("artifact_uri", artifact_uri)
    arguments.optional_instance("retry", retry, RetryConfig, "a RetryConfig")
    return ExperimentsManager(
        tracking_uri,
        main_metric,
        plugin_name,
        accumulators,
        is_loss,
        n_top_runs,
        requirements,
        retry,
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
