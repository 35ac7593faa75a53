"""A third-party tracker-core backend: models in fsspec's in-process MemoryFileSystem.

Written as a plug-in author would: it builds a filesystem and hands it to the core's
``FsspecArtifactStore``, reuses the MLflow tracking side, and registers itself under the
``memory`` scheme of the ``tracker_core.backends`` entry-point group. The core knows nothing
about it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from fsspec.implementations.memory import MemoryFileSystem

from tracker_core.errors import ConfigurationError
from tracker_core.fsspec_store import FsspecArtifactStore
from tracker_core.retry import Retrier
from tracker_core.stores import ArtifactStore
from tracker_core_mlflow.backend import MlflowBackend

__all__ = ["MemoryBackend"]


class _MemoryFileSystem(MemoryFileSystem):  # type: ignore[misc]
    """URIs in the ``memory://name/path`` form: MLflow rewrites ``memory:///name`` to
    ``memory:/name``, so run artifact URIs would no longer match the store's root."""

    def unstrip_protocol(self, name: str) -> str:
        return f"memory://{name.lstrip('/')}"


class MemoryBackend(MlflowBackend):
    """``memory://name/prefix``: model files in this process's memory, runs in MLflow."""

    default_model_format = "state_dict"

    def artifact_store(
        self, artifact_uri: str, *, storage_options: Mapping[str, Any] | None, retrier: Retrier
    ) -> ArtifactStore:
        parts = urlsplit(artifact_uri)
        if parts.scheme != "memory" or not parts.netloc:
            raise ConfigurationError(f"expected memory://name/prefix, got {artifact_uri!r}")
        fs = _MemoryFileSystem(**dict(storage_options or {}))
        root = fs.unstrip_protocol(fs._strip_protocol(artifact_uri)).rstrip("/")
        # memory folders are real (rmdir refuses a non-empty one): empty ones left by a
        # deletion are removed, as on a local disk
        return FsspecArtifactStore(fs, root, directories=True)
