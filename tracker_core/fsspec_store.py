"""An :class:`~tracker_core.stores.ArtifactStore` over any fsspec filesystem.

Local disk, S3 and GCS differ only in the filesystem they hand to :class:`FsspecArtifactStore`
and in how they classify their errors; the transfer logic is written once here. A folder's
files move :data:`PARALLEL_FILES` at a time through the filesystem's ``put_file`` /
``get_file``, which stream (see :mod:`tracker_core.transfers`), with one progress in bytes
over the folder. On an asynchronous filesystem (S3, GCS) every file of the folder is one
task on fsspec's event loop (as fsspec's own batch ``get(list, list)``); a synchronous one
(the local disk) uses threads. A download given the model's manifest lists nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.asyn import AsyncFileSystem, sync
from fsspec.callbacks import Callback
from fsspec.implementations.local import LocalFileSystem

from tracker_core.errors import ArtifactStoreError, ModelNotFoundError, redact
from tracker_core.stores import ArtifactStore, ProgressCallback
from tracker_core.transfers import gather_or_cancel

__all__ = ["PARALLEL_FILES", "FsspecArtifactStore"]

log = logging.getLogger(__name__)


#: files of one folder in flight at once, unless the filesystem sets fsspec's ``batch_size``
PARALLEL_FILES = 8


class _Progress:
    """One ``(done, total)`` progress over the files of a folder, moving in parallel."""

    def __init__(self, progress: ProgressCallback | None, total: int) -> None:
        self._progress, self._total = progress, total
        self._done: dict[str, int] = {}
        self._lock = threading.Lock()

    def update(self, name: str, done: int) -> None:
        if self._progress is None:
            return
        with self._lock:
            self._done[name] = done
            total_done = sum(self._done.values())
        self._progress(total_done, self._total)

    def callback(self, name: str) -> dict[str, Any]:
        """``put_file``/``get_file`` keyword arguments reporting ``name``'s bytes."""
        return {"callback": _FileBytes(self, name)} if self._progress is not None else {}


class _FileBytes(Callback):  # type: ignore[misc]
    """fsspec's per-file callback, feeding a folder's :class:`_Progress`."""

    def __init__(self, folder: _Progress, name: str) -> None:
        super().__init__()
        self._folder, self._name = folder, name

    def call(self, *args: Any, **kwargs: Any) -> None:
        self._folder.update(self._name, self.value or 0)


Job = tuple[str, str, int]


def _each(fn: Callable[[Job], None], jobs: list[Job], limit: int) -> None:
    """``fn`` on every job, ``limit`` at a time in threads; the first error is raised (after
    the others ended, so nothing is left writing)."""
    if len(jobs) <= 1 or limit <= 1:
        for job in jobs:
            fn(job)
        return
    with ThreadPoolExecutor(min(limit, len(jobs)), "tracker-core-transfer") as pool:
        futures = [pool.submit(fn, job) for job in jobs]
    for future in futures:
        future.result()


async def _each_async(fn: Callable[[Job], Awaitable[None]], jobs: list[Job], limit: int) -> None:
    """``await fn(job)`` for every job, ``limit`` at a time on one event loop; on the first
    error the others are cancelled, and it is raised once they ended."""
    slots = asyncio.Semaphore(max(1, limit))

    async def one(job: Job) -> None:
        async with slots:
            await fn(job)

    await gather_or_cancel([asyncio.ensure_future(one(job)) for job in jobs])


class FsspecArtifactStore(ArtifactStore):
    """Model files on an fsspec filesystem, below ``root`` (a URI with its scheme).

    ``classifier`` tells transient errors of this filesystem (True), permanent ones (False),
    or has no opinion (None); ``secrets`` are scrubbed from every error message.
    ``directories``: whether the filesystem has real folders (default: only the local disk
    does); empty folders left by a deletion are removed only there (an object store's
    ``rmdir`` may delete a bucket). ``buckets``: whether the first segment of a path is a
    bucket that must exist before anything is written (S3, GCS): :meth:`check_root` checks it.
    """

    def __init__(
        self,
        fs: AbstractFileSystem,
        root: str,
        *,
        classifier: Callable[[BaseException], bool | None] | None = None,
        secrets: tuple[str | None, ...] = (),
        directories: bool | None = None,
        buckets: bool = False,
    ) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self._classifier = classifier
        self._secrets = secrets
        self.has_directories = (
            isinstance(fs, LocalFileSystem) if directories is None else directories
        )
        self._buckets = buckets

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

    def _put_file(self, local: str, remote: str, **kwargs: Any) -> None:
        try:
            self.fs.put_file(local, remote, **kwargs)
        except FileNotFoundError:
            if not self.has_directories or not os.path.exists(local):
                raise
            # another worker removed an empty parent folder (see remove_empty_folders)
            # between our mkdir and our write: create it again, once
            self.fs.makedirs(self.fs._parent(remote), exist_ok=True)
            self.fs.put_file(local, remote, **kwargs)

    # -- ArtifactStore ------------------------------------------------------------------
    def _is_async(self) -> bool:
        return isinstance(self.fs, AsyncFileSystem) and getattr(self.fs, "async_impl", False)

    def _parallel_files(self) -> int:
        """Files in flight: one at a time on the local disk (measured: threads only add
        their cost to page-cache copies), else the filesystem's ``batch_size`` (fsspec's
        setting for batch operations) if it has one, else :data:`PARALLEL_FILES`."""
        if isinstance(self.fs, LocalFileSystem):
            return 1
        batch = getattr(self.fs, "batch_size", None)
        return int(batch) if isinstance(batch, int) and batch > 0 else PARALLEL_FILES

    def _each(
        self,
        fn: Callable[[Job], None],
        fn_async: Callable[[Job], Awaitable[None]],
        jobs: list[Job],
    ) -> None:
        """Every job: as tasks on fsspec's event loop for an asynchronous filesystem (S3,
        GCS), in threads otherwise (the local disk)."""
        if self._is_async():
            sync(self.fs.loop, _each_async, fn_async, jobs, self._parallel_files())
        else:
            _each(fn, jobs, self._parallel_files())

    def upload_dir(
        self, local_dir: Path, uri: str, progress: ProgressCallback | None = None
    ) -> None:
        target = self._path(uri)
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        jobs = [
            (os.fspath(p), f"{target}/{p.relative_to(local_dir).as_posix()}", p.stat().st_size)
            for p in files
        ]
        total = sum(size for _, _, size in jobs)
        folder = _Progress(progress, total)

        def put(job: Job) -> None:
            local, remote, size = job
            self._put_file(local, remote, **folder.callback(remote))
            folder.update(remote, size)

        async def put_async(job: Job) -> None:
            local, remote, size = job
            await self.fs._put_file(local, remote, **folder.callback(remote))
            folder.update(remote, size)

        with self._guard("upload", uri):
            if self._is_async() and not self.has_directories:
                sync(self.fs.loop, self._replace_async, target, put_async, jobs)
            else:  # remove what an earlier save left here, then write
                if self.fs.exists(target):
                    with contextlib.suppress(FileNotFoundError):  # see _replace_async
                        self.fs.rm(target, recursive=True)
                _each(put, jobs, self._parallel_files())
        log.debug("uploaded %d file(s), %d bytes to %s", len(files), total, uri)

    async def _replace_async(
        self, target: str, put: Callable[[Job], Awaitable[None]], jobs: list[Job]
    ) -> None:
        """Write every job to the object store while listing, concurrently, what an earlier
        save left under ``target``; then delete the listed files this save did not write (a
        new file of the same name was simply overwritten). One listing, off the critical path.
        """
        listing = asyncio.ensure_future(self._find_async(target))
        try:
            await _each_async(put, jobs, self._parallel_files())
        except BaseException:
            listing.cancel()
            await asyncio.gather(listing, return_exceptions=True)
            raise
        written = {remote for _, remote, _ in jobs}
        stale = sorted(path for path in await listing if path not in written)
        if stale:
            # gcsfs raises FileNotFoundError when nothing was left to delete (a retried
            # attempt whose earlier delete landed though its answer was lost): that is done
            with contextlib.suppress(FileNotFoundError):
                await self.fs._rm(stale)

    async def _find_async(self, path: str) -> list[str]:
        try:
            found = await self.fs._find(path, detail=True)
        except FileNotFoundError:
            return []
        return [p for p, info in found.items() if info.get("type") != "directory"]

    def download_dir(
        self,
        uri: str,
        local_dir: Path,
        progress: ProgressCallback | None = None,
        *,
        files: Mapping[str, int] | None = None,
    ) -> None:
        source = self._path(uri)
        with self._guard("download", uri):
            if files is None:
                found = self._files(source)
                files = {remote[len(source) :].lstrip("/"): size for remote, size in found.items()}
            if not files:
                raise ModelNotFoundError(f"no model files at {uri}")
            jobs = [(f"{source}/{rel}", rel, size) for rel, size in sorted(files.items())]
            folder = _Progress(progress, sum(files.values()))
            for parent in {(Path(local_dir) / rel).parent for _, rel, _ in jobs}:
                parent.mkdir(parents=True, exist_ok=True)

            def get(job: Job) -> None:
                remote, rel, size = job
                self.fs.get_file(remote, os.fspath(Path(local_dir) / rel), **folder.callback(rel))
                folder.update(rel, size)

            async def get_async(job: Job) -> None:
                remote, rel, size = job
                dest = os.fspath(Path(local_dir) / rel)
                await self.fs._get_file(remote, dest, **folder.callback(rel))
                folder.update(rel, size)

            try:
                self._each(get, get_async, jobs)
            except FileNotFoundError as exc:  # a file of the manifest is gone
                raise ModelNotFoundError(f"model files at {uri} are incomplete: {exc}") from exc

    def delete_tree(self, uri: str) -> bool:
        target = self._path(uri)
        with self._guard("delete", uri):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(target, recursive=True)
            self.fs.invalidate_cache(target)
        return not self.exists(uri)

    def exists(self, uri: str) -> bool:
        with self._guard("exists", uri):
            self.fs.invalidate_cache(self._path(uri))
            return bool(self.fs.exists(self._path(uri)))

    def find_dirs(self, uri: str, name: str, max_depth: int) -> list[str]:
        """Folders named ``name`` at most ``max_depth`` levels under ``uri``, from one
        recursive listing. Not fsspec's ``find(maxdepth=...)``: on S3 that walks folder by
        folder and *omits* a folder whose listing failed (``_walk``'s ``on_error="omit"``,
        not passed down its recursion), so a fault hid orphans from ``gc`` (chaos seed 14);
        one flat listing fails whole, and the retry policy retries it."""
        base = self._path(uri)
        with self._guard("list", uri):
            try:
                found = self.fs.find(base, withdirs=True, detail=True)
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

    def check_root(self) -> None:
        """On a store with buckets, raise :class:`ArtifactStoreError` if the root's bucket
        does not exist; a missing prefix (or, on a local disk, folder) is fine: the first
        write creates it."""
        if not self._buckets:
            return
        bucket = self._path(self.root).lstrip("/").split("/", 1)[0]
        with self._guard("check", self.root):
            try:
                self.fs.info(bucket)
            except FileNotFoundError:
                raise ArtifactStoreError(
                    f"bucket {bucket!r} of {self.root} does not exist: check the bucket "
                    "name in the artifact URI, and the endpoint and account it is read with"
                ) from None

    def remove_empty_folders(self, uri: str, stop: str) -> None:
        if not self.has_directories:
            return  # an object store has no folders; its rmdir may delete a bucket
        root = self._path(self.root)
        stop_path = self._path(stop) if self.owns(stop) else root
        path = self._path(uri)
        while path.startswith(stop_path + "/") and path.startswith(root + "/"):
            try:
                self.fs.rmdir(path)
            except FileNotFoundError:
                pass  # already gone: look at its parent
            except OSError:
                return  # not empty (or not ours to remove): stop here
            path = path.rsplit("/", 1)[0]
