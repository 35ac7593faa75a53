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
- **streaming in bounded memory**: a file over 5 MiB is one resumable upload of
  :data:`DEFAULT_BLOCK_SIZE` requests whose bodies are read from the file as they are sent
  (gcsfs reads each chunk into memory, the next one before the last is freed: 46 MB held
  for a 40 MiB file); downloads stream to disk (:mod:`tracker_core.transfers`): one GET
  up to :data:`DEFAULT_DOWNLOAD_PART_SIZE` (gcsfs first asks for the object's metadata, a
  round trip of its own), a bigger object's first part from that same response and the
  others by ranged GETs pinned to its generation, :data:`DEFAULT_DOWNLOAD_CONCURRENCY` at a
  time, each written to its place in the file as it arrives (gcsfs's prefetcher holds
  2 x 4 x 16 MiB).
- **no listing cache**: another worker may have written or deleted a model since we last
  listed.

Endpoint: ``storage_options["endpoint_url"]``, else ``$STORAGE_EMULATOR_HOST`` (then with
anonymous credentials unless a token is given), else Google's. Credentials: ``token`` as
gcsfs takes it (service-account file path or info dict, ``"google_default"``, ...), else
Application Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud, metadata server).
"""

from __future__ import annotations

import contextlib
import mimetypes
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from fsspec.callbacks import NoOpCallback
from gcsfs.core import GCSFileSystem, initiate_upload
from gcsfs.retry import validate_response

from tracker_core.errors import ConfigurationError, TransientError
from tracker_core.fsspec_store import FsspecArtifactStore
from tracker_core.retry import Retrier
from tracker_core.stores import ArtifactStore
from tracker_core.transfers import FileRange, Stream, download_to_file
from tracker_core_gcs.errors import classify_gcs_error
from tracker_core_mlflow.backend import MlflowBackend

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_DOWNLOAD_CONCURRENCY",
    "DEFAULT_DOWNLOAD_PART_SIZE",
    "READ_TIMEOUT",
    "GCSBackend",
    "TrackerGCSFileSystem",
    "gcs_filesystem",
    "gcs_root_uri",
    "secrets_of",
]

#: resumable-upload chunk (GCS wants a multiple of 256 KiB)
DEFAULT_BLOCK_SIZE = 16 * 2**20
#: largest object downloaded in one GET (gcsfs's threshold for concurrent downloads); bigger
#: ones in evened ranges of at most this size
DEFAULT_DOWNLOAD_PART_SIZE = 100 * 2**20
#: ranges of one object in flight (gcsfs's default concurrency)
DEFAULT_DOWNLOAD_CONCURRENCY = 4
#: files of a model in flight (fsspec's ``batch_size``; gcsfs's concurrency default). The GCS
#: emulator is a single-threaded HTTP/1.0 server that queues 6 connections: 8 at once stall
#: for a TCP retransmission (1 s), 16 get connections reset
DEFAULT_BATCH_SIZE = 4
#: files under this size are one simple upload (gcsfs's threshold), bigger ones resumable
_SIMPLE_UPLOAD = 5 * 2**20
#: seconds to open a connection / to wait for data on it
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 60


def _undecorated(fn: Any) -> Any:
    """The function under gcsfs's ``@retry_request`` (``decorator`` keeps it as ``__wrapped__``)."""
    return getattr(fn, "__wrapped__", fn)


class TrackerGCSFileSystem(GCSFileSystem):  # type: ignore[misc]
    """``GCSFileSystem`` trying each request once, uploading in ``default_block_size`` chunks,
    downloading in one GET up to ``download_part_size`` and in ranges above."""

    download_part_size = DEFAULT_DOWNLOAD_PART_SIZE
    download_concurrency = DEFAULT_DOWNLOAD_CONCURRENCY

    _request = _undecorated(GCSFileSystem._request)
    _get_file_request = _undecorated(GCSFileSystem._get_file_request)
    _get_file_concurrent = _undecorated(GCSFileSystem._get_file_concurrent)

    async def _put_file(
        self,
        lpath: str,
        rpath: str,
        *args: Any,
        chunksize: int | None = None,
        callback: Any = None,
        content_type: str | None = None,
        mode: str = "overwrite",
        **kwargs: Any,
    ) -> Any:
        chunksize = int(chunksize or self.default_block_size)
        plain = not args and not any(kwargs.values()) and self.consistency in ("none", None)
        if os.path.isdir(lpath) or not plain or os.path.getsize(lpath) < _SIMPLE_UPLOAD:
            # small (gcsfs reads it whole: bounded), or metadata / consistency checks that
            # gcsfs's own path knows
            return await super()._put_file(
                lpath, rpath, *args, chunksize=chunksize, callback=callback,
                content_type=content_type, mode=mode, **kwargs,
            )  # fmt: skip
        await self._put_resumable(
            lpath, rpath, chunksize, callback or NoOpCallback(), content_type, mode
        )
        self.invalidate_cache(self._parent(rpath))

    async def _put_resumable(
        self,
        lpath: str,
        rpath: str,
        chunksize: int,
        callback: Any,
        content_type: str | None,
        mode: str,
    ) -> None:
        """``lpath`` as one resumable upload of ``chunksize`` requests, each body read from
        the file as it is sent (gcsfs reads each chunk into memory, and the next one before
        the last is freed). A chunk the server kept only part of goes on from where it
        stopped; on failure the upload is cancelled."""
        if content_type is None:
            content_type = mimetypes.guess_type(lpath)[0] or "application/octet-stream"
        bucket, key, generation = self.split_path(rpath)
        if generation:
            raise ValueError("Cannot write to specific object generation")
        size = os.path.getsize(lpath)
        callback.set_size(size)
        location = await initiate_upload(self, bucket, key, content_type, mode=mode)
        offset = 0
        try:
            while offset < size:
                end = min(offset + chunksize, size)
                headers = {
                    "Content-Range": f"bytes {offset}-{end - 1}/{size}",
                    "Content-Type": content_type,
                    "Content-Length": str(end - offset),
                }
                with FileRange(lpath, offset, end - offset) as body:
                    answer, _ = await self._call("POST", location, headers=headers, data=body)
                kept = answer.get("Range")  # all bytes kept so far: "bytes=0-<last>"
                done = int(kept.rsplit("-", 1)[1]) + 1 if kept else end
                if done <= offset:
                    raise TransientError(f"gs://{rpath}: the server kept none of a chunk")
                offset = done
                callback.absolute_update(offset)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._call("DELETE", location.replace("&ifGenerationMatch=0", ""))
            raise

    async def _get_file(self, rpath: str, lpath: str, callback: Any = None, **kwargs: Any) -> None:
        if os.path.isdir(lpath):
            return
        if set(kwargs) - {"concurrency", "chunk_size"} or self.consistency not in ("none", None):
            # headers, generations, consistency checks: gcsfs's own path knows them
            await super()._get_file(rpath, lpath, callback=callback, **kwargs)
            return
        callback = callback or NoOpCallback()
        url = self.url(rpath)
        await self._set_session()
        first = await self._open_download(url, rpath, {})
        encoded = first.headers.get("Content-Encoding", "identity") != "identity"
        length = first.headers.get("Content-Length")
        size = None if encoded or length is None else int(length)
        generation = first.headers.get("x-goog-generation")
        pinned = (
            f"{url}&generation={generation}" if generation and "generation=" not in url else url
        )

        async def open_range(start: int, end: int) -> Stream:
            try:
                response = await self._open_download(
                    pinned, rpath, {"Range": f"bytes={start}-{end - 1}"}
                )
            except FileNotFoundError as exc:
                if pinned == url:
                    raise
                raise TransientError(
                    f"gs://{rpath} was rewritten or deleted while it was being downloaded"
                ) from exc
            if response.status != 206:
                response.release()
                raise TransientError(f"gs://{rpath}: the server ignored a byte range")
            return _ResponseStream(response)

        if size is not None:
            callback.set_size(size)
        await download_to_file(
            lpath,
            _ResponseStream(first),
            size,
            open_range,
            part_size=int(kwargs.get("chunk_size") or self.download_part_size),
            concurrency=int(kwargs.get("concurrency") or self.download_concurrency),
            on_bytes=callback.relative_update,
        )

    async def _open_download(
        self, url: str, rpath: str, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """An open GET of ``url``; HTTP errors raised as gcsfs raises them."""
        response: aiohttp.ClientResponse = await self.session.get(
            url=url,
            params=self._get_params({}),
            headers=self._get_headers(headers),
            timeout=self.requests_timeout,
        )
        if response.status >= 400:
            try:
                content = await response.read()
            finally:
                response.release()
            validate_response(response.status, content, rpath)
        return response


class _ResponseStream:
    """An aiohttp response body as a :class:`~tracker_core.transfers.Stream`."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def read(self, n: int) -> bytes:
        return await self._response.content.read(n)

    def close(self) -> None:
        self._response.release()


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
    options.setdefault("batch_size", DEFAULT_BATCH_SIZE)
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
