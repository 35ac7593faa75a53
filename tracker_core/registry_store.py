"""The model registry: registered models, their numbered versions, tags and aliases (MLflow's
Model Registry in the shipped backends).

An optional third store, beside :class:`~tracker_core.stores.TrackingStore` and
:class:`~tracker_core.stores.ArtifactStore`: a tracking store that has a registry offers it
through :meth:`~tracker_core.stores.TrackingStore.open_registry` (the default offers none).
Its only user is promotion (:mod:`tracker_core.promotion`), which calls it through the one
retry policy (:class:`~tracker_core.retrying.RetryingRegistryStore`).

A version only *points at* model files (its ``source``, a run's model folder): the registry
never copies them, so whoever deletes the files breaks the version (promotion keeps the files
of the versions it aliases; see :mod:`tracker_core.promotion`).

Contract shared by every implementation: thread-safe; never retries by itself (remote
failures worth a retry are reported by :meth:`RegistryStore.classify_error`); errors are
:class:`~tracker_core.errors.TrackingStoreError` and never contain credentials.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["ModelVersion", "RegistryStore"]


def _tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value)


def _dict(value: Mapping[str, str] | None) -> dict[str, str]:
    return dict(value or {})


@attrs.frozen
class ModelVersion:
    """One version of a registered model: ``models:/<name>/<version>``."""

    name: str
    version: str
    source: str
    run_id: str | None
    tags: Mapping[str, str] = attrs.field(factory=dict, converter=_dict)
    aliases: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    creation_time_ms: int = 0

    @property
    def number(self) -> int:
        """The version as a number (versions are numbered 1, 2, ... in creation order)."""
        return int(self.version)

    @property
    def uri(self) -> str:
        """``models:/<name>/<version>``: what MLflow's loaders take."""
        return f"models:/{self.name}/{self.version}"


class RegistryStore(abc.ABC):
    """Registered models and their versions. Every method raises
    :class:`~tracker_core.errors.TrackingStoreError` when the registry refuses or fails."""

    uri: str

    @abc.abstractmethod
    def ensure_registered_model(self, name: str, tags: Mapping[str, str]) -> None:
        """Create the registered model ``name`` with ``tags`` unless it exists (then nothing
        changes; two creators at once are no error)."""

    @abc.abstractmethod
    def create_version(
        self, name: str, source: str, run_id: str | None, tags: Mapping[str, str]
    ) -> ModelVersion:
        """A new version of ``name`` pointing at ``source`` (the model's folder). Not
        idempotent: each call makes a version (the caller deduplicates, see
        :mod:`tracker_core.promotion`)."""

    @abc.abstractmethod
    def get_version(self, name: str, version: str) -> ModelVersion | None:
        """The version; None if it does not exist (or was deleted)."""

    @abc.abstractmethod
    def search_versions(self, name: str, run_id: str | None = None) -> list[ModelVersion]:
        """Every version of ``name`` (of ``run_id`` only, if given), oldest first; empty if
        the registered model does not exist."""

    @abc.abstractmethod
    def get_version_by_alias(self, name: str, alias: str) -> ModelVersion | None:
        """The version ``alias`` points at; None if the alias (or the model) does not exist."""

    @abc.abstractmethod
    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``alias`` at ``version`` (moved from whichever version held it)."""

    @abc.abstractmethod
    def set_version_tags(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) tags of a version."""

    @abc.abstractmethod
    def delete_version(self, name: str, version: str) -> None:
        """Delete a version (its files are not touched); no error if it is already gone."""

    def classify_error(self, exc: BaseException) -> bool | None:
        """True if ``exc`` is transient (worth a retry), False if permanent, None if unknown."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default has nothing to release."""
