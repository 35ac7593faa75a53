"""Models in a local folder; tracking in MLflow (shared with every shipped backend)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from fsspec.implementations.local import LocalFileSystem

from tracker_core.errors import ConfigurationError
from tracker_core.fsspec_store import FsspecArtifactStore
from tracker_core.retry import Retrier
from tracker_core.stores import ArtifactStore
from tracker_core_mlflow.backend import MlflowBackend


def local_root_uri(artifact_uri: str) -> str:
    """``./models``, ``/abs/models`` or ``file:///abs/models`` -> ``file:///abs/models``."""
    parts = urlsplit(artifact_uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigurationError(f"file URIs must be local, got host {parts.netloc!r}")
        path = Path(unquote(parts.path))
    else:
        path = Path(artifact_uri).expanduser()
    return path.resolve().as_uri()


class LocalBackend(MlflowBackend):
    """``file://`` and plain paths: the laptop default, nothing to start."""

    def artifact_store(
        self, artifact_uri: str, *, storage_options: Mapping[str, Any] | None, retrier: Retrier
    ) -> ArtifactStore:
        fs = LocalFileSystem(auto_mkdir=True, **dict(storage_options or {}))
        return FsspecArtifactStore(fs, local_root_uri(artifact_uri))
