"""MLflow's Model Registry as a :class:`~tracker_core.registry_store.RegistryStore`.

The registry lives where MLflow puts it: ``$MLFLOW_REGISTRY_URI`` if set, else the tracking
URI (the same database, or the same ``mlflow server``). The store talks to MLflow's registry
*store* directly, never through ``MlflowClient``'s registry methods (which poll, log and, over
HTTP, retry on their own): over HTTP each request is sent once with a timeout, as the tracking
store's are (:mod:`tracker_core_mlflow.rest`), so tracker-core's retry policy is the only one.
Failures become :class:`~tracker_core.errors.TrackingStoreError` (transient ones
:class:`~tracker_core_mlflow.errors.TransientTrackingStoreError`), credentials redacted.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

from tracker_core.errors import redact
from tracker_core.registry_store import ModelVersion, RegistryStore
from tracker_core_mlflow.errors import classify_mlflow_error, error_code, tracking_errors
from tracker_core_mlflow.quiet import quiet

__all__ = ["MlflowRegistryStore"]

F = TypeVar("F", bound=Callable[..., Any])
_PAGE = 1000


def _operation(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: MlflowRegistryStore, *args: Any, **kwargs: Any) -> Any:
        with tracking_errors(f"registry {fn.__name__}", self.display_uri, self._password):
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _version(mv: Any) -> ModelVersion:
    return ModelVersion(
        name=mv.name,
        version=str(mv.version),
        source=mv.source or "",
        run_id=mv.run_id or None,
        tags=dict(mv.tags or {}),
        aliases=tuple(mv.aliases or ()),
        creation_time_ms=int(mv.creation_timestamp or 0),
    )


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class MlflowRegistryStore(RegistryStore):
    """MLflow's Model Registry at ``registry_uri`` (default: ``$MLFLOW_REGISTRY_URI``, else
    ``tracking_uri``). Thread-safe; the MLflow store is made on first use."""

    def __init__(
        self, tracking_uri: str, *, registry_uri: str | None = None, request_timeout: float = 30.0
    ) -> None:
        self.uri = registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri
        self._password = urlsplit(self.uri).password
        self.display_uri = redact(self.uri, self._password)
        self.request_timeout = request_timeout
        self._store: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.display_uri!r})"

    @property
    def store(self) -> Any:
        """MLflow's registry store (REST stores send each request once)."""
        with self._lock:
            if self._store is None:
                from mlflow.store.model_registry.rest_store import RestStore
                from mlflow.tracking._model_registry import utils

                from tracker_core_mlflow.rest import SingleAttemptRegistryRestStore

                with quiet("mlflow.store.db.utils", lambda record: True):
                    store = utils._get_store(self.uri)  # type: ignore[no-untyped-call]
                if type(store) is RestStore:
                    store = SingleAttemptRegistryRestStore(
                        store.get_host_creds, self.request_timeout
                    )
                self._store = store
            return self._store

    def classify_error(self, exc: BaseException) -> bool | None:
        return classify_mlflow_error(exc)

    @_operation
    def ensure_registered_model(self, name: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities.model_registry import RegisteredModelTag

        try:
            self.store.get_registered_model(name)
            return
        except Exception as exc:
            if error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            model_tags = [RegisteredModelTag(k, v) for k, v in tags.items()]  # type: ignore[no-untyped-call]
            self.store.create_registered_model(name, model_tags, None)
        except Exception as exc:  # created meanwhile by another worker
            if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise

    @_operation
    def create_version(
        self, name: str, source: str, run_id: str | None, tags: Mapping[str, str]
    ) -> ModelVersion:
        from mlflow.entities.model_registry import ModelVersionTag

        version_tags = [ModelVersionTag(k, v) for k, v in tags.items()]  # type: ignore[no-untyped-call]
        mv = self.store.create_model_version(name, source, run_id, version_tags, None, None)
        return _version(mv)

    @_operation
    def get_version(self, name: str, version: str) -> ModelVersion | None:
        try:
            return _version(self.store.get_model_version(name, version))
        except Exception as exc:
            if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    @_operation
    def search_versions(self, name: str, run_id: str | None = None) -> list[ModelVersion]:
        query = f"name = {_quote(name)}"
        if run_id is not None:
            query += f" and run_id = {_quote(run_id)}"
        found: list[ModelVersion] = []
        token: str | None = None
        while True:
            page = self.store.search_model_versions(query, _PAGE, None, token)
            found.extend(_version(mv) for mv in page)
            token = page.token or None
            if token is None:
                break
        return sorted(found, key=lambda v: v.number)

    @_operation
    def get_version_by_alias(self, name: str, alias: str) -> ModelVersion | None:
        try:
            return _version(self.store.get_model_version_by_alias(name, alias))
        except Exception as exc:
            code = error_code(exc)
            if code == "RESOURCE_DOES_NOT_EXIST" or (
                code == "INVALID_PARAMETER_VALUE"
                and "alias" in str(exc)
                and "not found" in str(exc)
            ):
                return None  # no such model, or no such alias
            raise

    @_operation
    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.store.set_registered_model_alias(name, alias, version)

    @_operation
    def set_version_tags(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities.model_registry import ModelVersionTag

        for key, value in tags.items():
            tag = ModelVersionTag(key, value)  # type: ignore[no-untyped-call]
            self.store.set_model_version_tag(name, version, tag)

    @_operation
    def delete_version(self, name: str, version: str) -> None:
        try:
            self.store.delete_model_version(name, version)
        except Exception as exc:
            if error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
