"""Models on S3 (s3fs); tracking in MLflow (shared with every shipped backend).

The filesystem is an :class:`s3fs.S3FileSystem` tuned for tracker-core:

- **one retry policy**: s3fs's own retry loop (``retries``) and botocore's
  (``Config(retries=...)``) are reduced to a single attempt, so tracker-core's tenacity
  policy is the only one that retries (invariant 5);
- **bounded waits**: connect and read timeouts, so an unreachable endpoint fails in bounded
  time instead of hanging;
- **streaming in bounded memory**: multipart uploads and ranged downloads in
  :data:`DEFAULT_BLOCK_SIZE` parts, at most :data:`DEFAULT_MAX_CONCURRENCY` in flight, so a
  transfer holds about ``2 x block size x concurrency`` bytes (the parts, and the copies
  botocore/aiohttp make of them: ~70 MB measured with the defaults), whatever the model's
  size. s3fs's own defaults (50 MiB x 10, and ``put_file`` ignoring the block size) would
  hold a 1 GB model's upload at ~1 GB;
- **no listing cache**: another worker may have written or deleted a model since we last
  listed, so listings are always fresh.

Every default can be overridden through ``storage_options`` (s3fs's own names).

Endpoint resolution when ``storage_options`` name none: botocore's ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3``, else ``MLFLOW_S3_ENDPOINT_URL`` (the variable MLflow's S3 artifact
repository reads), so MLflow and tracker-core read the same store. Credentials follow the
standard AWS chain (environment, shared files, instance roles) unless given explicitly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import s3fs

from tracker_core.errors import ConfigurationError
from tracker_core.retry import Retrier
from tracker_core.stores import ArtifactStore
from tracker_core_mlflow.backend import MlflowBackend
from tracker_core_s3.errors import classify_s3_error
from tracker_core_s3.store import S3ArtifactStore

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_MAX_CONCURRENCY",
    "READ_TIMEOUT",
    "S3Backend",
    "TrackerS3FileSystem",
    "s3_filesystem",
    "s3_root_uri",
    "secrets_of",
]

#: multipart part size and ranged-download chunk (S3's minimum part is 5 MiB)
DEFAULT_BLOCK_SIZE = 8 * 2**20
#: parts in flight per file
DEFAULT_MAX_CONCURRENCY = 4
#: seconds to open a connection / to wait for data on it
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 60
_MAX_UPLOAD_PARTS = 10_000
_TRUE = ("1", "true", "yes")


class TrackerS3FileSystem(s3fs.S3FileSystem):  # type: ignore[misc]
    """``S3FileSystem`` that tries each request once and uploads in ``default_block_size`` parts.

    s3fs's ``put_file`` ignores ``default_block_size`` and uses 50 MiB parts, up to
    ``max_concurrency`` of them in memory at once; here the part size follows
    ``default_block_size`` (grown only when a file would need more than 10,000 parts).
    """

    retries = 1  # s3fs's loop runs `retries` attempts: one, tracker-core retries

    async def _put_file(
        self, lpath: str, rpath: str, *args: Any, chunksize: int | None = None, **kwargs: Any
    ) -> Any:
        if chunksize is None:
            size = os.path.getsize(lpath) if os.path.isfile(lpath) else 0
            chunksize = max(int(self.default_block_size), math.ceil(size / _MAX_UPLOAD_PARTS))
        return await super()._put_file(lpath, rpath, *args, chunksize=chunksize, **kwargs)


def s3_root_uri(artifact_uri: str) -> str:
    """``s3://bucket/prefix/`` -> ``s3://bucket/prefix``; ``s3a://`` is accepted as ``s3://``."""
    parts = urlsplit(artifact_uri)
    if parts.scheme.lower() not in ("s3", "s3a"):
        raise ConfigurationError(f"not an S3 URI: {artifact_uri!r}")
    if not parts.netloc:
        raise ConfigurationError(f"S3 URI {artifact_uri!r} names no bucket: use s3://bucket/prefix")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"S3 URI {artifact_uri!r} must not carry a query or fragment")
    prefix = parts.path.strip("/")
    return f"s3://{parts.netloc}/{prefix}" if prefix else f"s3://{parts.netloc}"


def _endpoint_configured(options: Mapping[str, Any]) -> bool:
    client_kwargs = options.get("client_kwargs") or {}
    return bool(
        options.get("endpoint_url")
        or client_kwargs.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
    )


def s3_filesystem(storage_options: Mapping[str, Any] | None = None) -> TrackerS3FileSystem:
    """The S3 filesystem for ``storage_options`` (s3fs's names), with tracker-core's defaults."""
    options: dict[str, Any] = dict(storage_options or {})
    mlflow_endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    if mlflow_endpoint and not _endpoint_configured(options):
        options["endpoint_url"] = mlflow_endpoint
        if os.environ.get("MLFLOW_S3_IGNORE_TLS", "").lower() in _TRUE:
            options["client_kwargs"] = {"verify": False, **(options.get("client_kwargs") or {})}
    config: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT,
        "read_timeout": READ_TIMEOUT,
        # one attempt per request: botocore would otherwise retry 5xx/throttling itself
        "retries": {"total_max_attempts": 1, "mode": "standard"},
        **(options.pop("config_kwargs", None) or {}),
    }
    options.setdefault("default_block_size", DEFAULT_BLOCK_SIZE)
    options.setdefault("max_concurrency", DEFAULT_MAX_CONCURRENCY)
    options.setdefault("use_listings_cache", False)
    return TrackerS3FileSystem(config_kwargs=config, **options)


def secrets_of(storage_options: Mapping[str, Any] | None) -> tuple[str | None, ...]:
    """Values in ``storage_options`` that must never show up in a message."""
    options = dict(storage_options or {})
    client_kwargs = options.get("client_kwargs") or {}
    found = [
        options.get("secret"),
        options.get("password"),
        options.get("token"),
        client_kwargs.get("aws_secret_access_key"),
        client_kwargs.get("aws_session_token"),
        os.environ.get("AWS_SECRET_ACCESS_KEY"),
        os.environ.get("AWS_SESSION_TOKEN"),
    ]
    return tuple(s for s in found if isinstance(s, str) and s)


class S3Backend(MlflowBackend):
    """``s3://bucket/prefix``: models on S3 through s3fs, runs in MLflow."""

    def artifact_store(
        self, artifact_uri: str, *, storage_options: Mapping[str, Any] | None, retrier: Retrier
    ) -> ArtifactStore:
        root = s3_root_uri(artifact_uri)
        return S3ArtifactStore(
            s3_filesystem(storage_options),
            root,
            classifier=classify_s3_error,
            secrets=secrets_of(storage_options),
        )
