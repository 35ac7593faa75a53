"""Opening a manager's core: every argument checked when given (:mod:`tracker_core.arguments`),
the backend named by the artifact URI's scheme asked for its two stores, and the
:class:`~tracker_core.tracker.Tracker` built over them, before anything is written."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tracker_core import arguments, leases
from tracker_core.accumulators import MetricsAccumulator
from tracker_core.clock import SYSTEM_CLOCK, Clock
from tracker_core.codecs import ModelFactory, get_codec
from tracker_core.errors import ConfigurationError
from tracker_core.params import FineTuningParams
from tracker_core.promotion import PromotionConfig
from tracker_core.registry import Backend, get_backend, scheme_of
from tracker_core.retry import Retrier, RetryConfig
from tracker_core.retrying import Stores
from tracker_core.stores import ArtifactStore, TrackingStore
from tracker_core.tracker import Settings, Tracker
from tracker_core.uris import has_secret_query, has_userinfo, redact_uri
from tracker_core.values import validate_metric_name, validate_name

__all__ = [
    "DEFAULT_ARTIFACT_URI",
    "DEFAULT_TRACKING_URI",
    "check_storage_uri",
    "open_stores",
    "open_tracker",
]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACT_URI = "mlartifacts"


def check_storage_uri(uri: str) -> None:
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


def _artifact_store(
    backend: Backend, uri: str, options: Mapping[str, Any] | None, retry: RetryConfig
) -> ArtifactStore:
    return backend.artifact_store(uri, storage_options=options, retrier=Retrier(retry))


def _tracking_store(backend: Backend, uri: str | None, retry: RetryConfig) -> TrackingStore:
    resolved = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    return backend.tracking_store(resolved, retrier=Retrier(retry))


def open_stores(
    artifact_uri: str,
    *,
    tracking_uri: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    retry: RetryConfig | None = None,
) -> tuple[TrackingStore, ArtifactStore]:
    """The two stores, as the backend makes them (no retry policy around them), for a
    caller that wraps them before giving them to a manager (fault injection, tools)."""
    check_storage_uri(artifact_uri)
    backend = get_backend(scheme_of(artifact_uri))
    retry = retry or RetryConfig()
    return (
        _tracking_store(backend, tracking_uri, retry),
        _artifact_store(backend, artifact_uri, storage_options, retry),
    )


def open_tracker(
    tracking_uri: str | None,
    main_metric: str,
    plugin_name: str,
    accumulators: Iterable[MetricsAccumulator],
    is_loss: bool,
    n_top_runs: int,
    requirements: Sequence[str] | None,
    retry_config: RetryConfig | None,
    *,
    artifact_uri: str | None,
    storage_options: Mapping[str, Any] | None,
    keep: int,
    model_format: str | None,
    model_factory: ModelFactory | None,
    params_type: type[FineTuningParams] | None,
    lease_seconds: float = leases.DEFAULT_LEASE_SECONDS,
    tracking_store: TrackingStore | None = None,
    artifact_store: ArtifactStore | None = None,
    clock: Clock = SYSTEM_CLOCK,
    promotion: PromotionConfig | None = None,
) -> Tracker:
    """The core of a manager configured so (see
    :class:`~tracker_core.manager.ExperimentsManager` for the arguments)."""
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
    arguments.optional_instance("promotion", promotion, PromotionConfig, "a PromotionConfig")
    artifact_uri = artifact_uri or DEFAULT_ARTIFACT_URI
    check_storage_uri(artifact_uri)
    retry = retry_config or RetryConfig()

    backend = None
    if tracking_store is None or artifact_store is None:
        backend = get_backend(scheme_of(artifact_uri))
    if artifact_store is None:
        assert backend is not None
        artifact_store = _artifact_store(backend, artifact_uri, storage_options, retry)
    if tracking_store is None:
        assert backend is not None
        tracking_store = _tracking_store(backend, tracking_uri, retry)
    model_format = model_format or (
        backend.default_model_format if backend is not None else "state_dict"
    )
    get_codec(model_format)  # unknown formats fail here, before anything is written
    settings = Settings(
        main_metric=main_metric,
        plugin_name=plugin_name,
        is_loss=is_loss,
        n_top_runs=n_top_runs,
        keep=keep,
        model_format=model_format,
        model_factory=model_factory,
        params_type=params_type,
        requirements=tuple(requirements) if requirements else None,
        lease_seconds=lease_seconds,
        retry=retry,
        tracking_uri=getattr(tracking_store, "uri", tracking_uri),
        promotion=promotion or PromotionConfig.from_env(),
    )
    stores = Stores.wrap(tracking_store, artifact_store, retry)
    return Tracker(stores, settings, accumulators=accumulators, clock=clock)
