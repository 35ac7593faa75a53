"""The one retry policy around every store call, declared once per store method.

:class:`RetryingTrackingStore` and :class:`RetryingArtifactStore` implement the store ABCs
over a store a backend made: each method runs the inner one under the retry policy of its
*operation* (the names :class:`~tracker_core.retry.RetryConfig` is keyed by), so the code
that uses a store never names a policy. :class:`Stores` is the pair a manager's services
share. Which operation a method is:

=====================================================  ===================================
``get_*``, ``search_*``, ``get_metric_history``        ``search``
``create_experiment``, ``create_run``                  ``create``
``delete_experiment``, ``delete_run``                  ``delete``
``set_experiment_tag``, ``delete_tag``, tag-only batch ``tag``
``set_terminated``                                     ``finish_run``
``log_batch`` claiming or beating a lease              ``lease``
``log_batch`` with params / with metrics               ``log_params`` / ``log_metric``
``upload_dir`` / ``download_dir`` / ``delete_tree``    ``upload_model`` / ``download_model`` /
                                                       ``delete_model``
``exists``, ``find_dirs``, ``check_root``,             ``exists``, ``find_models``,
``list_incomplete_uploads``, ``abort_upload``          ``check_root``, ``list_uploads``,
                                                       ``abort_upload``
registry: ``get_version``, ``get_version_by_alias``,   ``search``
``search_versions``
registry: ``ensure_registered_model``,                 ``create``
``create_version``
registry: ``set_alias``, ``set_version_tags``          ``tag``
registry: ``delete_version``                           ``delete``
=====================================================  ===================================

``set_tags`` and ``has_runs`` call the inner store's own (a store may do them in one call);
``iter_experiments`` pages through ``search_experiments``, each page retried. Anything else
a backend's store offers (``display_uri``, ``fs``...) is reached through the wrapper
unchanged. The registry (:mod:`tracker_core.registry_store`) is optional: :attr:`Stores.registry`
is None when the tracking store offers none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs

from tracker_core import tags as T
from tracker_core.registry_store import ModelVersion, RegistryStore
from tracker_core.retry import Retrier, RetryConfig, RetryParams
from tracker_core.stores import (
    ArtifactStore,
    ExperimentQuery,
    IncompleteUpload,
    ProgressCallback,
    RunQuery,
    TrackingStore,
)
from tracker_core.values import ExperimentRecord, MetricValue, RunRecord, RunStatus

__all__ = [
    "RetryingArtifactStore",
    "RetryingRegistryStore",
    "RetryingTrackingStore",
    "Stores",
    "batch_operation",
]

R = TypeVar("R")
W = TypeVar("W")

#: one attempt, no wait: what a store call gets at interpreter exit
_ONCE = RetryConfig(RetryParams(max_attempts=1, wait_time_seconds=0))


def batch_operation(
    metrics: Sequence[MetricValue], params: Mapping[str, str] | None, tags: Mapping[str, str] | None
) -> str:
    """The operation a ``log_batch`` is, by what it carries (see the module docstring)."""
    if any(k.startswith(T.LEASE_CLAIM_PREFIX) for k in params or {}) or T.TAG_LEASE in (tags or {}):
        return "lease"
    if params:
        return "log_params"
    if metrics:
        return "log_metric"
    return "tag"


class _Retrying:
    """What both wrappers share: the inner store, its retrier, attribute pass-through."""

    def __init__(self, inner: Any, config: RetryConfig) -> None:
        self._inner = inner
        self._config = config
        self._retrier = Retrier(config).with_classifiers(inner.classify_error)

    @property
    def inner(self) -> Any:
        """The store the backend made (no retries)."""
        return self._inner

    def wrap(self, wrapper: Callable[[Any], W]) -> W:
        """Put ``wrapper(inner store)`` between the retry policy and the store, for every
        service at once (fault-injection tests, the chaos soak); returns it."""
        wrapped = wrapper(self._inner)
        self._inner = wrapped
        self._retrier = Retrier(self._config).with_classifiers(self._inner.classify_error)
        return wrapped

    def _call(self, operation: str, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        return self._retrier.call(operation, fn, *args, **kwargs)

    def single_attempt(self) -> None:
        """From now on every call is tried once (interpreter exit: nothing is worth a wait)."""
        self._retrier = Retrier(_ONCE).with_classifiers(self._inner.classify_error)

    def classify_error(self, exc: BaseException) -> bool | None:
        verdict: bool | None = self._inner.classify_error(exc)
        return verdict

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_inner", "_retrier", "_config"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._inner!r})"


class RetryingTrackingStore(_Retrying, TrackingStore):
    """A :class:`TrackingStore` whose every call runs under the retry policy."""

    _inner: TrackingStore

    def __init__(self, inner: TrackingStore, config: RetryConfig) -> None:
        super().__init__(inner, config)
        self.uri = getattr(inner, "uri", "")

    def get_experiment(self, experiment_id: str) -> ExperimentRecord | None:
        return self._call("search", self._inner.get_experiment, experiment_id)

    def get_experiment_by_name(self, name: str) -> ExperimentRecord | None:
        return self._call("search", self._inner.get_experiment_by_name, name)

    def create_experiment(
        self, name: str, artifact_location: str, tags: Mapping[str, str]
    ) -> ExperimentRecord:
        return self._call("create", self._inner.create_experiment, name, artifact_location, tags)

    def search_experiments(
        self, query: ExperimentQuery, max_results: int, page_token: str | None = None
    ) -> tuple[list[ExperimentRecord], str | None]:
        inner = self._inner.search_experiments
        return self._call("search", inner, query, max_results, page_token)

    def delete_experiment(self, experiment_id: str) -> None:
        self._call("delete", self._inner.delete_experiment, experiment_id)

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        self._call("tag", self._inner.set_experiment_tag, experiment_id, key, value)

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> RunRecord:
        return self._call("create", self._inner.create_run, experiment_id, run_name, tags)

    def get_run(self, run_id: str) -> RunRecord | None:
        return self._call("search", self._inner.get_run, run_id)

    def search_runs(self, query: RunQuery) -> list[RunRecord]:
        return self._call("search", self._inner.search_runs, query)

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[MetricValue] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        operation = batch_operation(metrics, params, tags)
        self._call(operation, self._inner.log_batch, run_id, metrics, params, tags)

    def get_metric_history(self, run_id: str, key: str) -> list[MetricValue]:
        return self._call("search", self._inner.get_metric_history, run_id, key)

    def set_terminated(self, run_id: str, status: RunStatus) -> None:
        self._call("finish_run", self._inner.set_terminated, run_id, status)

    def delete_run(self, run_id: str) -> None:
        self._call("delete", self._inner.delete_run, run_id)

    def delete_tag(self, run_id: str, key: str) -> None:
        self._call("tag", self._inner.delete_tag, run_id, key)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self._call(batch_operation((), None, tags), self._inner.set_tags, run_id, tags)

    def has_runs(self, experiment_id: str, statuses: Sequence[RunStatus]) -> bool:
        return self._call("search", self._inner.has_runs, experiment_id, statuses)


class RetryingArtifactStore(_Retrying, ArtifactStore):
    """An :class:`ArtifactStore` whose every call runs under the retry policy."""

    _inner: ArtifactStore

    def __init__(self, inner: ArtifactStore, config: RetryConfig) -> None:
        super().__init__(inner, config)
        self.root = inner.root
        self.has_directories = inner.has_directories

    def upload_dir(
        self, local_dir: Path, uri: str, progress: ProgressCallback | None = None
    ) -> None:
        self._call("upload_model", self._inner.upload_dir, local_dir, uri, progress)

    def download_dir(
        self,
        uri: str,
        local_dir: Path,
        progress: ProgressCallback | None = None,
        *,
        files: Mapping[str, int] | None = None,
    ) -> None:
        inner = self._inner.download_dir
        self._call("download_model", inner, uri, local_dir, progress, files=files)

    def delete_tree(self, uri: str) -> bool:
        return self._call("delete_model", self._inner.delete_tree, uri)

    def exists(self, uri: str) -> bool:
        return self._call("exists", self._inner.exists, uri)

    def find_dirs(self, uri: str, name: str, max_depth: int) -> list[str]:
        return self._call("find_models", self._inner.find_dirs, uri, name, max_depth)

    def check_root(self) -> None:
        self._call("check_root", self._inner.check_root)

    def list_incomplete_uploads(self, uri: str) -> list[IncompleteUpload]:
        return self._call("list_uploads", self._inner.list_incomplete_uploads, uri)

    def abort_upload(self, upload: IncompleteUpload) -> None:
        self._call("abort_upload", self._inner.abort_upload, upload)

    def remove_empty_folders(self, uri: str, stop: str) -> None:
        self._inner.remove_empty_folders(uri, stop)  # best effort: never retried

    def experiment_location(self, experiment_name: str, unique: str) -> str:
        location: str = self._inner.experiment_location(experiment_name, unique)
        return location

    def owns(self, uri: str) -> bool:
        owned: bool = self._inner.owns(uri)
        return owned


class RetryingRegistryStore(_Retrying, RegistryStore):
    """A :class:`RegistryStore` whose every call runs under the retry policy."""

    _inner: RegistryStore

    def __init__(self, inner: RegistryStore, config: RetryConfig) -> None:
        super().__init__(inner, config)
        self.uri = getattr(inner, "uri", "")

    def ensure_registered_model(self, name: str, tags: Mapping[str, str]) -> None:
        self._call("create", self._inner.ensure_registered_model, name, tags)

    def create_version(
        self, name: str, source: str, run_id: str | None, tags: Mapping[str, str]
    ) -> ModelVersion:
        return self._call("create", self._inner.create_version, name, source, run_id, tags)

    def get_version(self, name: str, version: str) -> ModelVersion | None:
        return self._call("search", self._inner.get_version, name, version)

    def search_versions(self, name: str, run_id: str | None = None) -> list[ModelVersion]:
        return self._call("search", self._inner.search_versions, name, run_id)

    def get_version_by_alias(self, name: str, alias: str) -> ModelVersion | None:
        return self._call("search", self._inner.get_version_by_alias, name, alias)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._call("tag", self._inner.set_alias, name, alias, version)

    def set_version_tags(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        self._call("tag", self._inner.set_version_tags, name, version, tags)

    def delete_version(self, name: str, version: str) -> None:
        self._call("delete", self._inner.delete_version, name, version)


@attrs.frozen
class Stores:
    """The stores of a manager, each behind the one retry policy; what its services share (a
    value: nothing swaps a store under a service's feet). ``registry`` is None when the
    tracking store offers no model registry."""

    tracking: RetryingTrackingStore
    artifacts: RetryingArtifactStore
    registry: RetryingRegistryStore | None = None

    @classmethod
    def wrap(
        cls, tracking: TrackingStore, artifacts: ArtifactStore, retry: RetryConfig | None = None
    ) -> Stores:
        """Stores calling ``tracking``, ``artifacts`` and the tracking store's registry (if
        it offers one) under ``retry``."""
        config = retry or RetryConfig()
        opener = getattr(tracking, "open_registry", None)  # a duck-typed store may have none
        registry = opener() if callable(opener) else None
        return cls(
            RetryingTrackingStore(tracking, config),
            RetryingArtifactStore(artifacts, config),
            None if registry is None else RetryingRegistryStore(registry, config),
        )

    def single_attempt(self) -> None:
        """Every call tried once from now on (interpreter exit)."""
        self.tracking.single_attempt()
        self.artifacts.single_attempt()
        if self.registry is not None:
            self.registry.single_attempt()

    def close(self) -> None:
        self.tracking.close()
        self.artifacts.close()
        if self.registry is not None:
            self.registry.close()
