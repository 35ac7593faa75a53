"""A fault-injecting HTTP proxy on loopback, in front of one real server.

Clients talk to the proxy as if it were the server (point the tracking URI, the S3 endpoint or
the GCS endpoint at :attr:`FaultProxy.url`). The proxy reads each HTTP/1.1 request, and for a
seeded fraction of them (``rate``, 20% by default) injects one fault instead of passing it
through untouched:

===============  ===================================================================
``reset``        the client's connection is reset (RST) as soon as the request head
                 arrived: the server never sees the request
``reset_after``  the request reaches the server, which applies it; the client's
                 connection is then reset instead of receiving the answer (a lost
                 response)
``timeout``      no answer at all: the proxy holds the connection until the client gives
                 up (its read timeout), the server never sees the request
``timeout_after``  the server applies the request, the client never gets the answer
``http_500``     the server applies the request, the client gets a 500 instead of the
                 answer (the body each server would send: MLflow's JSON error, S3's XML,
                 GCS's JSON)
``http_503``     the client gets a 503 and the server never sees the request
``slow``         passed through, the answer delayed by 0.2-2 s
===============  ===================================================================

Everything else passes through. Each request gets its own upstream connection (with
``Connection: close``), and bodies are buffered: requests and answers are re-framed with a
``Content-Length`` (chunked bodies are de-chunked, ``Expect: 100-continue`` is answered by the
proxy), so the client keeps its keep-alive connection whatever the server does. ``Location``
headers naming the server are rewritten to name the proxy (GCS resumable uploads).

Faults are drawn from ``random.Random(seed)`` in the order requests arrive. Counters
(:meth:`FaultProxy.snapshot`) say how many requests passed and how many faults of each kind
were injected; every fault is also appended to ``log_path`` (time, kind, method, path) so a
failing trial can be read back.

The proxy runs its own asyncio loop in a daemon thread; :class:`ProxySet` runs several on one
loop. Standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

__all__ = ["FAULT_KINDS", "FaultPlan", "FaultProxy", "ProxySet"]

log = logging.getLogger(__name__)

FAULT_KINDS = (
    "reset",
    "reset_after",
    "timeout",
    "timeout_after",
    "http_500",
    "http_503",
    "slow",
)
_HEAD_LIMIT = 1 << 20
_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "te", "trailer"}
)


@attrs.frozen
class FaultPlan:
    """How often and which faults: ``rate`` of requests get a fault, its kind drawn with
    ``weights``; ``slow`` delays by ``slow_seconds``; a hung request is held until the client
    closes, at most ``hang_seconds``."""

    rate: float = 0.2
    weights: Mapping[str, float] = attrs.field(factory=lambda: dict.fromkeys(FAULT_KINDS, 1.0))
    slow_seconds: tuple[float, float] = (0.2, 2.0)
    hang_seconds: float = 60.0

    def draw(self, rng: random.Random) -> str:
        if self.rate <= 0 or rng.random() >= self.rate:
            return "pass"
        kinds = [k for k in FAULT_KINDS if self.weights.get(k, 0) > 0]
        return rng.choices(kinds, weights=[self.weights[k] for k in kinds])[0]


class _Closed(Exception):
    """The peer closed the connection between requests."""


@attrs.define
class _Message:
    start: str  # request or status line
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


async def _read_head(reader: asyncio.StreamReader) -> _Message:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            raise _Closed from None
        raise
    lines = raw[:-4].decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers.append((key.strip(), value.strip()))
    return _Message(lines[0], headers)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def _read_body(reader: asyncio.StreamReader, message: _Message, *, until_eof: bool) -> bytes:
    if "chunked" in (message.header("transfer-encoding") or "").lower():
        return await _read_chunked(reader)
    length = message.header("content-length")
    if length is not None:
        return await reader.readexactly(int(length))
    return await reader.read() if until_eof else b""


def _render(start: str, headers: list[tuple[str, str]], body: bytes, *, length: bool) -> bytes:
    kept = [(k, v) for k, v in headers if k.lower() not in _HOP_HEADERS]
    if length:
        kept.append(("Content-Length", str(len(body))))
    head = "\r\n".join([start, *(f"{k}: {v}" for k, v in kept)]) + "\r\n\r\n"
    return head.encode("latin-1") + body


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST: the client sees 'connection reset by peer'."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _error_body(flavor: str, status: int) -> tuple[str, bytes]:
    """(content type, body) of an error as the server behind would send it."""
    if flavor == "s3":
        code = "InternalError" if status == 500 else "ServiceUnavailable"
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>injected by the chaos proxy</Message>"
            "<RequestId>chaos</RequestId></Error>"
        )
        return "application/xml", xml.encode()
    if flavor == "gcs":
        body = {"error": {"code": status, "message": "injected by the chaos proxy"}}
        return "application/json", json.dumps(body).encode()
    if status == 500:  # MLflow's own answer to an unexpected server error
        body2 = {"error_code": "INTERNAL_ERROR", "message": "injected by the chaos proxy"}
        return "application/json", json.dumps(body2).encode()
    return "text/plain", b"503 Service Unavailable (injected by the chaos proxy)"


class FaultProxy:
    """One proxy: ``127.0.0.1:<free port>`` -> ``upstream`` (``host:port``), see the module doc.

    ``flavor`` (``mlflow``, ``s3``, ``gcs``) shapes the injected error bodies.
    """

    def __init__(
        self,
        name: str,
        upstream: str,
        *,
        flavor: str,
        seed: int,
        plan: FaultPlan | None = None,
        log_path: Path | None = None,
    ) -> None:
        host, _, port = upstream.replace("http://", "").rstrip("/").partition(":")
        self.name, self.flavor = name, flavor
        self.upstream = (host, int(port))
        self.plan = plan or FaultPlan()
        self.log_path = log_path
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[Any]] = set()  # held: the loop keeps weak refs only
        self.port = 0
        self.enabled = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control (any thread) ------------------------------------------------------------
    def reseed(self, seed: int, plan: FaultPlan | None = None) -> None:
        with self._lock:
            self._rng = random.Random(seed)
            if plan is not None:
                self.plan = plan

    def snapshot(self, reset: bool = False) -> dict[str, int]:
        """Requests seen (``requests``), passed (``pass``) and faults by kind."""
        with self._lock:
            out = dict(self._counts)
            if reset:
                self._counts.clear()
        return out

    def _decide(self) -> tuple[str, float]:
        """The fault for the next request, and the delay of a slow answer."""
        with self._lock:
            kind = self.plan.draw(self._rng) if self.enabled else "pass"
            delay = self._rng.uniform(*self.plan.slow_seconds) if kind == "slow" else 0.0
            self._counts["requests"] += 1
            self._counts[kind] += 1
            return kind, delay

    def _note(self, kind: str, request: _Message) -> None:
        if self.log_path is None or kind == "pass":
            return
        line = f"{time.time():.3f} {self.name} {kind} {request.start}\n"
        with self._lock, open(self.log_path, "a") as out:
            out.write(line)

    # -- serving (the loop's thread) ------------------------------------------------------
    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._client, "127.0.0.1", 0, limit=_HEAD_LIMIT, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        try:
            while await self._one(reader, writer):
                pass
        except (_Closed, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception:
            log.exception("%s: proxy error", self.name)
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the client connection is done."""
        request = await _read_head(reader)
        kind, delay = self._decide()
        self._note(kind, request)
        if kind == "reset":
            _abort(writer)
            return False
        if (request.header("expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        request.body = await _read_body(reader, request, until_eof=False)
        client_close = (request.header("connection") or "").lower() == "close"
        if kind == "timeout":
            await self._hang(reader, writer)
            return False
        if kind == "http_503":
            await self._send_error(writer, 503)
            return not client_close
        response = await self._forward(request)
        if kind == "reset_after":
            _abort(writer)
            return False
        if kind == "timeout_after":
            await self._hang(reader, writer)
            return False
        if kind == "http_500":
            await self._send_error(writer, 500)
            return not client_close
        if delay:
            await asyncio.sleep(delay)
        if request.start.split(" ", 1)[0].upper() == "HEAD":
            writer.write(_render_head(response))
        else:
            writer.write(_render(response.start, response.headers, response.body, length=True))
        await writer.drain()
        return not client_close

    async def _forward(self, request: _Message) -> _Message:
        """Send the request to the server on a fresh connection; its complete answer."""
        up_reader, up_writer = await asyncio.open_connection(*self.upstream, limit=_HEAD_LIMIT)
        try:
            up_writer.write(
                _render(
                    request.start,
                    [*request.headers, ("Connection", "close")],
                    request.body,
                    length=bool(request.body) or request.header("content-length") is not None,
                )
            )
            await up_writer.drain()
            while True:
                response = await _read_head(up_reader)
                status = int(response.start.split(" ", 2)[1])
                if status >= 200:
                    break
            method = request.start.split(" ", 1)[0].upper()
            if method != "HEAD" and status not in (204, 304):
                response.body = await _read_body(up_reader, response, until_eof=True)
            response.headers = [self._relocate(k, v) for k, v in response.headers]
            return response
        finally:
            with contextlib.suppress(Exception):
                up_writer.close()

    def _relocate(self, key: str, value: str) -> tuple[str, str]:
        if key.lower() == "location":
            host, port = self.upstream
            for origin in (f"{host}:{port}", f"localhost:{port}"):
                value = value.replace(origin, f"127.0.0.1:{self.port}")
        return key, value

    async def _hang(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer nothing until the client gives up (or ``hang_seconds`` pass)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._drain_until_eof(reader), self.plan.hang_seconds)
        _abort(writer)

    @staticmethod
    async def _drain_until_eof(reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass

    async def _send_error(self, writer: asyncio.StreamWriter, status: int) -> None:
        content_type, body = _error_body(self.flavor, status)
        reason = "Internal Server Error" if status == 500 else "Service Unavailable"
        headers = [("Content-Type", content_type), ("Server", "chaos-proxy")]
        writer.write(_render(f"HTTP/1.1 {status} {reason}", headers, body, length=True))
        await writer.drain()


def _render_head(response: _Message) -> bytes:
    """A HEAD answer: the server's headers (its Content-Length included), no body."""
    kept = [
        (k, v)
        for k, v in response.headers
        if k.lower() not in _HOP_HEADERS or k.lower() == "content-length"
    ]
    head = "\r\n".join([response.start, *(f"{k}: {v}" for k, v in kept)]) + "\r\n\r\n"
    return head.encode("latin-1")


class ProxySet:
    """Several :class:`FaultProxy` on one asyncio loop in a daemon thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="proxy")
        self._thread.start()
        self.proxies: dict[str, FaultProxy] = {}

    def add(self, proxy: FaultProxy) -> FaultProxy:
        asyncio.run_coroutine_threadsafe(proxy.start(), self._loop).result(30)
        self.proxies[proxy.name] = proxy
        return proxy

    def snapshot(self, reset: bool = False) -> dict[str, dict[str, int]]:
        return {name: p.snapshot(reset) for name, p in self.proxies.items()}

    def set_enabled(self, enabled: bool) -> None:
        for proxy in self.proxies.values():
            proxy.enabled = enabled

    def close(self) -> None:
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(proxy.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> ProxySet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
