"""What the API accepts, checked before any handler (or the database) sees a request.

:class:`InputLimits` is an ASGI middleware; every refusal is a 4xx whose ``detail`` names the
field and the rule (``"metadata.a: text must not contain NUL (U+0000)"``), also given apart as
``field`` and ``rule``, and one log line. The rules:

- a request body is at most :data:`MAX_BODY_BYTES`, counted while it streams in, whatever its
  framing (413), and never held past the limit: the rest is read and dropped, up to
  :data:`DRAIN_BYTES` (so that a client still sending gets its 413; past that, or with a
  larger ``Content-Length``, the 413 is sent at once and the connection closed);
- a JSON body (:func:`check_json`) is UTF-8 JSON (400), without ``NaN``/``Infinity`` (400),
  nests at most :data:`MAX_JSON_DEPTH` levels, has integers of at most :data:`MAX_INT_DIGITS`
  digits and finite numbers, and its text (keys too) is valid Unicode without NUL, which
  PostgreSQL cannot store (422);
- the URL path and query carry no control character (U+0000-U+001F, U+007F) (422).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "DRAIN_BYTES",
    "MAX_BODY_BYTES",
    "MAX_INT_DIGITS",
    "MAX_JSON_DEPTH",
    "InputLimits",
    "Refusal",
    "check_json",
    "check_text",
    "shown",
]

log = logging.getLogger(__name__)

#: the largest request body, in bytes
MAX_BODY_BYTES = 1024 * 1024
#: how much of a body over the limit is read (and dropped) before the connection is closed
DRAIN_BYTES = 8 * MAX_BODY_BYTES
#: the deepest nesting of a JSON body (the body itself is level 1)
MAX_JSON_DEPTH = 32
#: the most digits of a JSON integer
MAX_INT_DIGITS = 64
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SHOWN = 40  # characters of an offending value shown in a message


@attrs.frozen
class Refusal(Exception):
    """An input the API refuses: the HTTP ``status``, the ``field`` and the ``rule``."""

    status: int
    field: str
    rule: str

    @property
    def detail(self) -> str:
        return f"{self.field}: {self.rule}"

    def as_json(self) -> dict[str, Any]:
        return {"detail": self.detail, "field": self.field, "rule": self.rule}


def shown(value: str) -> str:
    """``value`` as a message shows it: escaped (NUL, controls, surrogates), shortened."""
    text = json.dumps(value)[1:-1]
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _quoted(value: str) -> str:
    return f'"{shown(value)}"'


def check_text(value: str, field: str, *, controls: bool = False) -> None:
    """Text PostgreSQL can store: valid Unicode (no lone surrogate), no NUL; with
    ``controls`` no control character at all (URL parts)."""
    if controls and _CONTROL.search(value):
        raise Refusal(422, field, f"must not contain control characters: {_quoted(value)}")
    if "\x00" in value:
        raise Refusal(422, field, "text must not contain NUL (U+0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Refusal(
            422, field, f"must be valid Unicode text (no lone surrogate): {_quoted(value)}"
        ) from None


# ---------------------------------------------------------------------- JSON bodies
@attrs.frozen
class _Bad:
    """What the parser's hooks put in place of a value the rules refuse (the walk that
    follows knows where it is, and names the field)."""

    status: int
    rule: str


def _int(text: str) -> int | _Bad:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        return _Bad(422, f"an integer of {digits} digits; the limit is {MAX_INT_DIGITS}")
    return int(text)


def _float(text: str) -> float | _Bad:
    value = float(text)
    if not math.isfinite(value):
        return _Bad(422, f"the number {shown(text)} is out of range")
    return value


def _constant(name: str) -> _Bad:
    return _Bad(400, f"{name} is not valid JSON (no NaN or Infinity)")


def _path(parts: tuple[str | int, ...]) -> str:
    out = ""
    for part in parts[:8]:
        out += f"[{part}]" if isinstance(part, int) else (f".{shown(part)}" if out else shown(part))
    return (out or "body") + ("..." if len(parts) > 8 else "")


def check_json(body: bytes) -> Any:
    """The JSON document ``body``, parsed, if it passes the rules of the module docstring;
    else :class:`Refusal`. Runs in time linear in ``body`` (call it in a thread)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refusal(400, "body", f"is not UTF-8 text (byte {exc.start})") from None
    try:
        doc = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise Refusal(422, _too_deep(text), f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise Refusal(400, "body", f"is not valid JSON: {exc}") from None
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(doc, ())]
    while stack:
        value, where = stack.pop()
        if isinstance(value, _Bad):
            raise Refusal(value.status, _path(where), value.rule)
        if isinstance(value, str):
            check_text(value, _path(where))
        elif isinstance(value, dict | list):
            if len(where) >= MAX_JSON_DEPTH:
                raise Refusal(422, _path(where), f"nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(value, dict):
                for key, item in value.items():
                    check_text(key, _path((*where, key)))
                    stack.append((item, (*where, key)))
            else:
                stack.extend((item, (*where, i)) for i, item in enumerate(value))
    return doc


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:]')


def _too_deep(text: str) -> str:
    """The top-level field of ``text`` whose value nests too deep to parse (a scan that
    skips strings; only run once the parser gave up)."""
    depth, last, key = 0, "", "body"
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return key
        elif token in "]}":
            depth -= 1
        elif token == ":" and depth == 1 and last.startswith('"'):
            try:
                key = shown(json.loads(last))
            except ValueError:
                key = "body"
        last = token
    return key


# ---------------------------------------------------------------------- the middleware
def _is_json(scope: Scope) -> bool:
    """Whether the app will parse this request's body as JSON (FastAPI: an
    ``application/json`` or ``+json`` content type, or none)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            kind = bytes(value).split(b";", 1)[0].strip().lower()
            return kind == b"application/json" or kind.endswith(b"+json")
    return True


class InputLimits:
    """ASGI middleware enforcing the rules of the module docstring. ``routes`` (optional)
    are the app's routes, to name the path parameter a bad URL path carries."""

    def __init__(
        self,
        app: ASGIApp,
        routes: Callable[[], Iterable[BaseRoute]] | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.app, self.routes, self.max_body_bytes = app, routes, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ended = [False]  # whether the whole body was received
        try:
            body = await self._read(scope, receive, ended)
            self._check_url(scope)
            if body and _is_json(scope):
                from starlette.concurrency import run_in_threadpool

                await run_in_threadpool(check_json, body)
        except Refusal as refusal:
            await self._refuse(scope, send, refusal, close=not ended[0])
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _check_url(self, scope: Scope) -> None:
        path = str(scope.get("path", ""))
        if _CONTROL.search(path):
            check_text(*self._path_part(scope, path), controls=True)
        query = scope.get("query_string", b"")
        if query:
            from urllib.parse import parse_qsl

            for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
                field = f"query parameter {shown(name)}"
                check_text(name, field, controls=True)
                check_text(value, field, controls=True)

    def _path_part(self, scope: Scope, path: str) -> tuple[str, str]:
        """``(value, field)``: the path parameter holding the control character if a route
        matches, else the whole path."""
        for route in self.routes() if self.routes is not None else ():
            match, child = route.matches(scope)
            if match != Match.NONE:
                for name, value in child.get("path_params", {}).items():
                    if isinstance(value, str) and _CONTROL.search(value):
                        return value, f"path parameter {name}"
        return path, "the URL path"

    async def _read(self, scope: Scope, receive: Receive, ended: list[bool]) -> bytes:
        """The whole body; over the limit, a 413 once the rest is dropped (see the module
        docstring). ``ended[0]`` tells whether the body was received to its end."""
        limit = self.max_body_bytes
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit():
                declared = int(value)
        over = f"is {declared} bytes" if declared is not None else f"is over {limit} bytes"
        too_large = Refusal(413, "body", f"{over}; the limit is {limit}")
        if declared is not None and declared > DRAIN_BYTES:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        while size <= DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            if not message.get("more_body", False):
                ended[0] = True
                break
        if size > limit:
            raise too_large
        return b"".join(chunks)

    async def _refuse(self, scope: Scope, send: Send, refusal: Refusal, *, close: bool) -> None:
        from starlette.responses import JSONResponse

        log.info(
            "refused %s %s: %d %s",
            scope.get("method", "?"),
            shown(str(scope.get("path", ""))),
            refusal.status,
            refusal.detail,
        )
        response = JSONResponse(refusal.as_json(), status_code=refusal.status)
        if close:  # the rest of the body is not read: the connection ends
            response.headers["Connection"] = "close"
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
