"""Streaming transfers of one file to and from an object store, in bounded memory.

The object-store backends (S3, GCS) move a file's bytes between the local disk and the wire
without holding the file, or a part of it, in memory:

- :class:`FileRange` is a byte range of a local file as a readable, seekable stream: the body
  of one upload request (a whole-file PUT or one multipart part) that the HTTP client reads
  in small chunks, instead of a ``bytes`` copy of the part;
- :func:`download_to_file` writes an object to a file from a GET that is already open: up to
  ``part_size`` it is streamed from that one response; a bigger object is cut into evened
  parts of at most ``part_size``, the first read from the open response and the others by
  ranged GETs, ``concurrency`` at a time, each streamed to its offset in the file. No
  separate request asks for the size (the open response says it) and the first response is
  never thrown away.

Memory per transfer is a few read buffers per stream, whatever the part size, so part sizes
are chosen for the number of requests, not for memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, BinaryIO, Protocol

__all__ = [
    "READ_SIZE",
    "FileRange",
    "Stream",
    "download_to_file",
    "even_parts",
    "gather_or_cancel",
]

#: bytes asked of a response body per read (the client returns what it has, up to this)
READ_SIZE = 2**20


class Stream(Protocol):
    """An open response body: ``await read(n)`` returns up to ``n`` bytes (``b""`` at the
    end); ``close()`` releases the connection."""

    async def read(self, n: int) -> bytes: ...

    def close(self) -> Any: ...


def even_parts(size: int, part_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges covering ``size`` bytes: as few parts as ``part_size`` allows,
    of (nearly) equal length, so no tiny last part costs a request of its own."""
    if size <= part_size or part_size <= 0:
        return [(0, size)]
    count = math.ceil(size / part_size)
    length = math.ceil(size / count)
    return [(start, min(start + length, size)) for start in range(0, size, length)]


class FileRange(io.RawIOBase):
    """Bytes ``[start, start + length)`` of the file at ``path``, as a readable, seekable
    stream of its own (position 0 is ``start``; ``len()`` is ``length``).

    Deliberately without ``fileno()``: HTTP clients would take the whole file's size from it.
    """

    def __init__(self, path: str, start: int = 0, length: int | None = None) -> None:
        super().__init__()
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        end = os.fstat(self._file.fileno()).st_size
        self._start = min(start, end)
        self._length = end - self._start if length is None else min(length, end - self._start)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + offset))
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        left = self._length - self._pos
        size = left if size is None or size < 0 else min(size, left)
        if size <= 0:
            return b""
        self._file.seek(self._start + self._pos)
        data = self._file.read(size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def __len__(self) -> int:
        return self._length

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


async def gather_or_cancel(tasks: Sequence[asyncio.Future[None]]) -> None:
    """Wait for every task; on the first error cancel the others and raise it once they
    ended (so nothing is left writing)."""
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _pump(
    stream: Stream,
    out: BinaryIO,
    start: int,
    end: int | None,
    on_bytes: Callable[[int], Any],
) -> None:
    """Copy bytes ``[start, end)`` of the object from ``stream`` (positioned at ``start``) to
    ``out`` (``end=None``: to the end of the body). A body shorter than announced is a
    broken connection (:class:`ConnectionError`, worth a retry)."""
    position = start
    try:
        while end is None or position < end:
            want = READ_SIZE if end is None else min(READ_SIZE, end - position)
            data = await stream.read(want)
            if not data:
                if end is None:
                    return
                raise ConnectionError(
                    f"response ended after {position - start} of {end - start} bytes"
                )
            # one event loop writes every part: nothing runs between this seek and write
            out.seek(position)
            out.write(data)
            position += len(data)
            on_bytes(len(data))
    finally:
        with contextlib.suppress(Exception):
            stream.close()


async def download_to_file(
    lpath: str,
    first: Stream,
    size: int | None,
    open_range: Callable[[int, int], Awaitable[Stream]],
    *,
    part_size: int,
    concurrency: int,
    on_bytes: Callable[[int], Any] = lambda n: None,
) -> None:
    """Write an object of ``size`` bytes to ``lpath``.

    ``first`` is an open GET of the whole object; ``open_range(start, end)`` opens a GET of
    bytes ``[start, end)`` of the same object (the backend pins it to the version ``first``
    read). Up to ``part_size`` (or when ``size`` is unknown) everything comes from
    ``first``; above, the object is read in :func:`even_parts`, at most ``concurrency`` at a
    time (``first`` counting as one). On any failure the other parts are cancelled, every
    response is closed, the partial file is removed and the first error is raised.
    ``on_bytes(n)`` is called as bytes land.
    """
    parts = [(0, 0)] if size is None else even_parts(size, part_size)
    first_end = None if size is None else parts[0][1]
    out: BinaryIO = open(lpath, "wb", buffering=0)  # noqa: SIM115 - closed below
    try:
        if len(parts) > 1:
            out.truncate(size)
        slots = asyncio.Semaphore(max(1, concurrency - 1))

        async def ranged(start: int, end: int) -> None:
            async with slots:
                stream = await open_range(start, end)
                await _pump(stream, out, start, end, on_bytes)

        tasks = [asyncio.ensure_future(_pump(first, out, 0, first_end, on_bytes))]
        tasks += [asyncio.ensure_future(ranged(start, end)) for start, end in parts[1:]]
        try:
            await gather_or_cancel(tasks)
        finally:
            with contextlib.suppress(Exception):
                first.close()
    except BaseException:
        out.close()
        with contextlib.suppress(OSError):
            os.remove(lpath)
        raise
    out.close()
