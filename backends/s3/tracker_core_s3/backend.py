"""Models on S3 (s3fs); tracking in MLflow (shared with every shipped backend).

The filesystem is an :class:`s3fs.S3FileSystem` tuned for tracker-core:

- **one retry policy**: s3fs's own retry loop (``retries``) and botocore's
  (``Config(retries=...)``) are reduced to a single attempt, so tracker-core's tenacity
  policy is the only one that retries (invariant 5);
- **bounded waits**: connect and read timeouts, so an unreachable endpoint fails in bounded
  time instead of hanging;
- **streaming in bounded memory** (:mod:`tracker_core.transfers`): every request body is
  read from the file as it is sent and every response body written to the file as it
  arrives, so a transfer holds a few read buffers whatever the model's and the parts' sizes
  (s3fs reads each part, or a whole file under 100 MiB, into memory: ~1 GB for a 1 GB model
  with its defaults). A file under two :data:`DEFAULT_BLOCK_SIZE` parts is one ``PutObject``;
  a bigger one a multipart upload of block-size parts, :data:`DEFAULT_MAX_CONCURRENCY` in
  flight (a new part starts as soon as one ends), with CRC32 part checksums that S3 checks.
  A download is one ``GetObject`` up to :data:`DEFAULT_DOWNLOAD_PART_SIZE`; a bigger object
  reads its first part from that same response and the others by ranged GETs pinned to its
  ETag, up to :data:`DEFAULT_MAX_CONCURRENCY` at a time (s3fs asks for the whole object,
  drops that response and starts over in ranges);
- **no listing cache**: another worker may have written or deleted a model since we last
  listed, so listings are always fresh.

Every default can be overridden through ``storage_options`` (s3fs's own names).

Endpoint resolution when ``storage_options`` name none: botocore's ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3``, else ``MLFLOW_S3_ENDPOINT_URL`` (the variable MLflow's S3 artifact
repository reads), so MLflow and tracker-core read the same store. Credentials follow the
standard AWS chain (environment, shared files, instance roles) unless given explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import mimetypes
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import s3fs
from fsspec.callbacks import DEFAULT_CALLBACK, Callback

from tracker_core.errors import ConfigurationError, TransientError
from tracker_core.retry import Retrier
from tracker_core.stores import ArtifactStore
from tracker_core.transfers import FileRange, Stream, download_to_file
from tracker_core_mlflow.backend import MlflowBackend
from tracker_core_s3.errors import classify_s3_error
from tracker_core_s3.store import S3ArtifactStore

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_DOWNLOAD_PART_SIZE",
    "DEFAULT_MAX_CONCURRENCY",
    "READ_TIMEOUT",
    "S3Backend",
    "TrackerS3FileSystem",
    "s3_filesystem",
    "s3_root_uri",
    "secrets_of",
]

#: multipart part size (S3's minimum part is 5 MiB); files under two parts are one PutObject
DEFAULT_BLOCK_SIZE = 8 * 2**20
#: parts (upload) or ranges (download) in flight per file
DEFAULT_MAX_CONCURRENCY = 4
#: largest object downloaded in one GetObject; bigger ones in ranges of about this size
#: (s3fs's own block size: its request pattern, without holding the ranges in memory)
DEFAULT_DOWNLOAD_PART_SIZE = 50 * 2**20
#: seconds to open a connection / to wait for data on it
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 60
_MAX_UPLOAD_PARTS = 10_000
_TRUE = ("1", "true", "yes")


class TrackerS3FileSystem(s3fs.S3FileSystem):  # type: ignore[misc]
    """``S3FileSystem`` that tries each request once and streams ``put_file``/``get_file``.

    ``put_file``: one ``PutObject`` under two ``default_block_size`` parts, else a multipart
    upload of block-size parts (grown only when a file would need more than 10,000 parts),
    ``max_concurrency`` in flight; bodies are read from the file as they are sent.
    ``get_file``: one ``GetObject`` up to ``download_part_size``, else that response's first
    part plus ranged GETs for the others; written to the file as they arrive.
    """

    retries = 1  # s3fs's loop runs `retries` attempts: one, tracker-core retries
    download_part_size = DEFAULT_DOWNLOAD_PART_SIZE

    def __init__(self, *args: Any, download_part_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if download_part_size is not None:
            self.download_part_size = int(download_part_size)

    async def _put_file(
        self,
        lpath: str,
        rpath: str,
        callback: Callback = DEFAULT_CALLBACK,
        chunksize: int | None = None,
        max_concurrency: int | None = None,
        mode: str = "overwrite",
        **kwargs: Any,
    ) -> None:
        if os.path.isdir(lpath):
            await super()._put_file(lpath, rpath, callback=callback, mode=mode, **kwargs)
            return
        bucket, key, _ = self.split_path(rpath)
        size = os.path.getsize(lpath)
        callback.set_size(size)
        if "ContentType" not in kwargs:
            content_type, _ = mimetypes.guess_type(lpath)
            if content_type is not None:
                kwargs["ContentType"] = content_type
        match = {"IfNoneMatch": "*"} if mode == "create" else {}
        part = chunksize or max(int(self.default_block_size), math.ceil(size / _MAX_UPLOAD_PARTS))
        if size < 2 * part:
            with FileRange(lpath) as body:
                await self._call_s3(
                    "put_object", Bucket=bucket, Key=key, Body=body, **kwargs, **match
                )
            callback.relative_update(size)
        else:
            concurrency = max_concurrency or self.max_concurrency
            target = (bucket, key, size, part, concurrency)
            await self._put_multipart(lpath, target, callback, kwargs, match)
        while rpath:
            self.invalidate_cache(rpath)
            rpath = self._parent(rpath)

    async def _put_multipart(
        self,
        lpath: str,
        target: tuple[str, str, int, int, int],
        callback: Callback,
        kwargs: dict[str, Any],
        match: dict[str, str],
    ) -> None:
        """``lpath`` to ``target`` (bucket, key, size, part size, parts in flight) as a
        multipart upload with CRC32 part checksums; on failure the other parts are cancelled
        and the upload aborted (a killed process leaves it open:
        :meth:`S3ArtifactStore.list_incomplete_uploads` finds it)."""
        bucket, key, size, part, concurrency = target
        mpu = await self._call_s3(
            "create_multipart_upload", Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32", **kwargs
        )
        upload_id = mpu["UploadId"]
        slots = asyncio.Semaphore(max(1, concurrency))

        async def upload(number: int, start: int) -> dict[str, Any]:
            async with slots:
                length = min(part, size - start)
                with FileRange(lpath, start, length) as body:
                    out = await self._call_s3(
                        "upload_part", Bucket=bucket, Key=key, UploadId=upload_id,
                        PartNumber=number, Body=body, ChecksumAlgorithm="CRC32",
                    )  # fmt: skip
                callback.relative_update(length)
                done = {"PartNumber": number, "ETag": out["ETag"]}
                if out.get("ChecksumCRC32"):
                    done["ChecksumCRC32"] = out["ChecksumCRC32"]
                return done

        starts = range(0, size, part)
        tasks = [asyncio.ensure_future(upload(n, s)) for n, s in enumerate(starts, 1)]
        try:
            parts = await asyncio.gather(*tasks)
            await self._call_s3(
                "complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": parts}, **match,
            )  # fmt: skip
        except Exception:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._abort_mpu(bucket, key, upload_id)
            raise

    async def _get_file(
        self,
        rpath: str,
        lpath: str,
        callback: Callback = DEFAULT_CALLBACK,
        version_id: str | None = None,
        chunksize: int | None = None,
        max_concurrency: int | None = None,
        **kwargs: Any,
    ) -> None:
        if os.path.isdir(lpath):
            return
        bucket, key, path_version = self.split_path(rpath)
        version = s3fs.core.version_id_kw(version_id or path_version)
        first = await self._call_s3("get_object", Bucket=bucket, Key=key, **version)
        size = int(first["ContentLength"])
        # every range reads the object the first response read, or fails
        pin = version or ({"IfMatch": first["ETag"]} if first.get("ETag") else {})

        async def open_range(start: int, end: int) -> Stream:
            try:
                resp = await self._call_s3(
                    "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **pin
                )
            except OSError as exc:
                if "PreconditionFailed" in str(exc.__cause__ or exc) or "412" in str(exc):
                    raise TransientError(
                        f"s3://{bucket}/{key} was rewritten while it was being downloaded"
                    ) from exc
                raise
            body: Stream = resp["Body"]
            return body

        callback.set_size(size)
        await download_to_file(
            lpath,
            first["Body"],
            size,
            open_range,
            part_size=chunksize or self.download_part_size,
            concurrency=max_concurrency or self.max_concurrency,
            on_bytes=callback.relative_update,
        )


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
