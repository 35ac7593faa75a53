"""An :class:`~tracker_core.stores.ArtifactStore` over any fsspec filesystem.

Local disk, S3 and GCS differ only in the filesystem they hand to :class:`FsspecArtifactStore`
and in how they classify their errors; the transfer logic is written once here. Transfers
go file by file through ``put_file`` / ``get_file``, which stream (multipart on S3, resumable on
GCS), and report progress in bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.callbacks import Callback

from tracker_core.errors import ArtifactStoreError, ModelNotFoundError, redact
from tracker_core.stores import ArtifactStore, ProgressCallback

__all__ = ["FsspecArtifactStore"]

log = logging.getLogger(__name__)


class _Bytes(Callback):  # type: ignore[misc]
    """Adapts fsspec's per-file callback to one ``(done, total)`` progress over many files."""

    def __init__(self, progress: ProgressCallback, done: int, total: int) -> None:
        super().__init__()
        self._progress, self._base, self._total = progress, done, total

    def call(self, *args: Any, **kwargs: Any) -> None:
        self._progress(self._base + (self.value or 0), self._total)


class FsspecArtifactStore(ArtifactStore):
    """Model files on an fsspec filesystem, below ``root`` (a URI with its scheme).

    ``classifier`` tells transient errors of this filesystem (True), permanent ones (False),
    or has no opinion (None); ``secrets`` are scrubbed from every error message.
    """

    def __init__(
        self,
        fs: AbstractFileSystem,
        root: str,
        *,
        classifier: Callable[[BaseException], bool | None] | None = None,
        secrets: tuple[str | None, ...] = (),
    ) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self._classifier = classifier
        self._secrets = secrets

    # -- helpers ------------------------------------------------------------------------
    def _path(self, uri: str) -> str:
        return str(self.fs._strip_protocol(uri)).rstrip("/")

    def classify_error(self, exc: BaseException) -> bool | None:
        if self._classifier is not None:
            verdict = self._classifier(exc)
            if verdict is not None:
                return verdict
        if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
            return False
        return None

    @contextlib.contextmanager
    def _guard(self, operation: str, uri: str) -> Iterator[None]:
        """Let transient errors through for the retrier; turn the rest into ArtifactStoreError."""
        try:
            yield
        except (ArtifactStoreError, ModelNotFoundError):
            raise
        except Exception as exc:
            if self.classify_error(exc):
                raise
            denied = isinstance(exc, PermissionError)
            hint = " (access denied: check the credentials)" if denied else ""
            message = redact(
                f"{operation} {uri} failed{hint}: {type(exc).__name__}: {exc}", *self._secrets
            )
            raise ArtifactStoreError(message) from exc

    def _files(self, path: str) -> dict[str, int]:
        """Every file under ``path`` with its size."""
        found = self.fs.find(path, detail=True)
        return {
            p: int(info.get("size") or 0)
            for p, info in found.items()
            if info.get("type") != "directory"
        }

    # -- ArtifactStore ------------------------------------------------------------------
    def upload_dir(
        self, local_dir: Path, uri: str, progress: ProgressCallback | None = None
    ) -> None:
        target = self._path(uri)
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        total = sum(p.stat().st_size for p in files)
        with self._guard("upload", uri):
            if self.fs.exists(target):
                # gcsfs raises FileNotFoundError when nothing was left to delete (a retried
                # attempt whose earlier delete landed though its answer was lost): that is done
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(target, recursive=True)
            done = 0
            for path in files:
                rel = path.relative_to(local_dir).as_posix()
                callback = _Bytes(progress, done, total) if progress else None
                kwargs = {"callback": callback} if callback else {}
                self.fs.put_file(os.fspath(path), f"{target}/{rel}", **kwargs)
                done += path.stat().st_size
                if progress:
                    progress(done, total)
        log.debug("uploaded %d file(s), %d bytes to %s", len(files), total, uri)

    def download_dir(
        self, uri: str, local_dir: Path, progress: ProgressCallback | None = None
    ) -> None:
        source = self._path(uri)
        with self._guard("download", uri):
            files = self._files(source)
            if not files:
                raise ModelNotFoundError(f"no model files at {uri}")
            total, done = sum(files.values()), 0
            for remote, size in sorted(files.items()):
                rel = remote[len(source) :].lstrip("/")
                dest = Path(local_dir) / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                callback = _Bytes(progress, done, total) if progress else None
                kwargs = {"callback": callback} if callback else {}
                self.fs.get_file(remote, os.fspath(dest), **kwargs)
                done += size
                if progress:
                    progress(done, total)

    def delete_tree(self, uri: str) -> bool:
        target = self._path(uri)
        with self._guard("delete", uri):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(target, recursive=True)
            self.fs.invalidate_cache(target)
            return not self.fs.exists(target)

    def exists(self, uri: str) -> bool:
        with self._guard("exists", uri):
            self.fs.invalidate_cache(self._path(uri))
            return bool(self.fs.exists(self._path(uri)))

    def find_dirs(self, uri: str, name: str, max_depth: int) -> list[str]:
        base = self._path(uri)
        with self._guard("list", uri):
            try:
                found = self.fs.find(base, maxdepth=max_depth + 1, withdirs=True, detail=True)
            except FileNotFoundError:
                return []
        dirs: set[str] = set()
        for path, info in found.items():
            parts = path[len(base) :].strip("/").split("/")
            # a directory named `name` shows up itself, or (object stores) through its files
            for depth, part in enumerate(parts[:max_depth]):
                if part == name and (depth < len(parts) - 1 or info.get("type") == "directory"):
                    dirs.add("/".join([base, *parts[: depth + 1]]))
                    break
        return sorted(self.fs.unstrip_protocol(d) for d in dirs)
