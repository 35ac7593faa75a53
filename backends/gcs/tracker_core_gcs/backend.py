"""Models on Google Cloud Storage (gcsfs); tracking in MLflow.

The filesystem is gcsfs's JSON-API :class:`gcsfs.core.GCSFileSystem`, tuned for tracker-core:

- **always the classic filesystem.** gcsfs >= 2025.x replaces ``gcsfs.GCSFileSystem`` with an
  experimental ``ExtendedGcsFileSystem`` unless ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``
  is set *before gcsfs is imported*; on first use of each bucket it asks the gRPC
  storage-control API for the bucket type, which against an emulator (or without network
  access to Google) blocks for 60 s per bucket before falling back. We never touch that
  switch (a library must not set process-wide environment variables) and instead build
  ``gcsfs.core.GCSFileSystem`` directly, which reads and writes any bucket (hierarchical
  namespace ones included) through the JSON API and ignores the variable.
- **one retry policy**: gcsfs retries each HTTP request up to 6 times with up to 32 s
  waits (``@retry_request``, not configurable); :class:`TrackerGCSFileSystem` calls the
  undecorated request functions, so tracker-core's tenacity policy is the only one.
- **bounded waits**: connect and read timeouts on every request.
- **streaming in bounded memory**: resumable uploads in :data:`DEFAULT_BLOCK_SIZE` chunks
  (one in memory at a time); downloads stream to disk (ranged and concurrent for files of
  100 MB and more, bounded by gcsfs's prefetcher).
- **no listing cache**: another worker may have written or deleted a model since we last
  listed.

Endpoint: ``storage_options["endpoint_url"]``, else ``$STORAGE_EMULATOR_HOST`` (then with
anonymous credentials unless a token is given), else Google's. Credentials: ``token`` as
gcsfs takes it (service-account file path or info dict, ``"google_default"``, ...), else
Application Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud, metadata server).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from gcsfs.core import GCSFileSystem

from tracker_core.errors import ConfigurationError
from tracker_core.fsspec_store import FsspecArtifactStore
from tracker_core.retry import Retrier
from tracker_core.stores import ArtifactStore
from tracker_core_gcs.errors import classify_gcs_error
from tracker_core_mlflow.backend import MlflowBackend

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_BLOCK_SIZE",
    "READ_TIMEOUT",
    "GCSBackend",
    "TrackerGCSFileSystem",
    "gcs_filesystem",
    "gcs_root_uri",
    "secrets_of",
]

#: resumable-upload chunk (GCS wants a multiple of 256 KiB)
DEFAULT_BLOCK_SIZE = 16 * 2**20
#: seconds to open a connection / to wait for data on it
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 60


def _undecorated(fn: Any) -> Any:
    """The function under gcsfs's ``@retry_request`` (``decorator`` keeps it as ``__wrapped__``)."""
    return getattr(fn, "__wrapped__", fn)


class TrackerGCSFileSystem(GCSFileSystem):  # type: ignore[misc]
    """``GCSFileSystem`` trying each request once, uploading in ``default_block_size`` chunks."""

    _request = _undecorated(GCSFileSystem._request)
    _get_file_request = _undecorated(GCSFileSystem._get_file_request)
    _get_file_concurrent = _undecorated(GCSFileSystem._get_file_concurrent)

    async def _put_file(
        self, lpath: str, rpath: str, *args: Any, chunksize: int | None = None, **kwargs: Any
    ) -> Any:
        if chunksize is None:
            chunksize = int(self.default_block_size)
        return await super()._put_file(lpath, rpath, *args, chunksize=chunksize, **kwargs)


def gcs_root_uri(artifact_uri: str) -> str:
    """``gs://bucket/prefix/`` or ``gcs://bucket/prefix`` -> ``gs://bucket/prefix``.

    MLflow's artifact repositories know ``gs://`` only, so experiments must get ``gs://``
    locations for plain MLflow to read the models.
    """
    parts = urlsplit(artifact_uri)
    if parts.scheme.lower() not in ("gs", "gcs"):
        raise ConfigurationError(f"not a GCS URI: {artifact_uri!r}")
    if not parts.netloc:
        raise ConfigurationError(
            f"GCS URI {artifact_uri!r} names no bucket: use gs://bucket/prefix"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(f"GCS URI {artifact_uri!r} must not carry a query or fragment")
    prefix = parts.path.strip("/")
    return f"gs://{parts.netloc}/{prefix}" if prefix else f"gs://{parts.netloc}"


def gcs_filesystem(storage_options: Mapping[str, Any] | None = None) -> TrackerGCSFileSystem:
    """The GCS filesystem for ``storage_options`` (gcsfs's names), with tracker-core's defaults."""
    options: dict[str, Any] = dict(storage_options or {})
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator and emulator != "default" and not options.get("endpoint_url"):
        if "://" not in emulator:
            emulator = f"http://{emulator}"
        options["endpoint_url"] = emulator.rstrip("/")
        options.setdefault("token", "anon")
    options.setdefault(
        "requests_timeout",
        aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT),
    )
    options.setdefault("block_size", DEFAULT_BLOCK_SIZE)
    options.setdefault("use_listings_cache", False)
    return TrackerGCSFileSystem(**options)


def secrets_of(storage_options: Mapping[str, Any] | None) -> tuple[str | None, ...]:
    """Values in ``storage_options`` that must never show up in a message."""
    token = dict(storage_options or {}).get("token")
    if isinstance(token, Mapping):
        keys = ("private_key", "private_key_id", "refresh_token", "client_secret", "access_token")
        return tuple(str(token[k]) for k in keys if token.get(k))
    return ()


class GCSBackend(MlflowBackend):
    """``gs://bucket/prefix`` and ``gcs://bucket/prefix``: models on GCS, runs in MLflow."""

    def artifact_store(
        self, artifact_uri: str, *, storage_options: Mapping[str, Any] | None, retrier: Retrier
    ) -> ArtifactStore:
        return FsspecArtifactStore(
            gcs_filesystem(storage_options),
            gcs_root_uri(artifact_uri),
            classifier=classify_gcs_error,
            secrets=secrets_of(storage_options),
            buckets=True,
            directories=False,
        )
