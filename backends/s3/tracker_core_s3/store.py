"""The S3 artifact store: the fsspec store plus S3's incomplete multipart uploads.

A file over two parts is uploaded as a multipart upload: ``CreateMultipartUpload``, parts,
then ``CompleteMultipartUpload``. s3fs aborts the upload when a part fails, but a writer
killed in between (``kill -9``, a lost host) leaves it open: its parts are stored and billed,
yet no object listing shows them, and a folder deleted by gc takes none of them along.
:meth:`S3ArtifactStore.list_incomplete_uploads` finds them (``ListMultipartUploads`` under a
prefix) and :meth:`S3ArtifactStore.abort_upload` frees them (``AbortMultipartUpload``).
A bucket lifecycle rule (``AbortIncompleteMultipartUpload``) does the same after some days;
gc does it now.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import Any

from fsspec.asyn import sync

from tracker_core.fsspec_store import FsspecArtifactStore
from tracker_core.stores import IncompleteUpload

__all__ = ["S3ArtifactStore"]


def _epoch_ms(value: Any) -> int | None:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return int(value.timestamp() * 1000)
    return None


class S3ArtifactStore(FsspecArtifactStore):
    """Model files on S3 (s3fs); lists and aborts incomplete multipart uploads."""

    def __init__(self, fs: Any, root: str, **kwargs: Any) -> None:
        kwargs.setdefault("buckets", True)
        kwargs.setdefault("directories", False)
        super().__init__(fs, root, **kwargs)

    def _bucket_key(self, uri: str) -> tuple[str, str]:
        bucket, _, key = self._path(uri).lstrip("/").partition("/")
        return bucket, key

    def list_incomplete_uploads(self, uri: str) -> list[IncompleteUpload]:
        """Multipart uploads open under ``uri`` (one ``ListMultipartUploads`` page per 1,000)."""
        bucket, key = self._bucket_key(uri)
        prefix = f"{key}/" if key else ""
        found: list[IncompleteUpload] = []
        markers: dict[str, str] = {}
        with self._guard("list uploads", uri):
            while True:
                page = self.fs.call_s3(
                    "list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers
                )
                for upload in page.get("Uploads") or []:
                    found.append(
                        IncompleteUpload(
                            uri=f"s3://{bucket}/{upload['Key']}",
                            upload_id=str(upload["UploadId"]),
                            initiated_ms=_epoch_ms(upload.get("Initiated")),
                        )
                    )
                if not page.get("IsTruncated"):
                    break
                markers = {
                    "KeyMarker": page.get("NextKeyMarker") or "",
                    "UploadIdMarker": page.get("NextUploadIdMarker") or "",
                }
        return found

    def abort_upload(self, upload: IncompleteUpload) -> None:
        bucket, key = self._bucket_key(upload.uri)
        # NoSuchUpload (FileNotFoundError): completed or aborted meanwhile
        with self._guard("abort upload", upload.uri), contextlib.suppress(FileNotFoundError):
            self.fs.call_s3(
                "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload.upload_id
            )

    def exists(self, uri: str) -> bool:
        """One ``ListObjectsV2`` of the level ``uri`` sits at (s3fs's ``exists`` of a folder
        is a ``HeadObject`` that finds no such key, then a listing: two round trips)."""
        bucket, key = self._bucket_key(uri)
        if not key:
            return super().exists(uri)
        key = key.rstrip("/")
        marker: dict[str, str] = {}
        with self._guard("exists", uri):
            while True:
                page = sync(
                    self.fs.loop, self.fs._call_s3, "list_objects_v2",
                    Bucket=bucket, Prefix=key, Delimiter="/", **marker,
                )  # fmt: skip
                if any(o.get("Key") == key for o in page.get("Contents") or []) or any(
                    p.get("Prefix") == f"{key}/" for p in page.get("CommonPrefixes") or []
                ):
                    return True
                if not page.get("IsTruncated"):
                    return False
                marker = {"ContinuationToken": page["NextContinuationToken"]}
