"""The API's side of a database outage: 503 with ``Retry-After`` while the database is down,
back to normal by itself when it answers again.

:class:`DatabaseGate` keeps an :class:`~tracker_core.service.outage.Outage`. A request that
fails because the database does not answer (:func:`~tracker_core.service.outage.is_outage`)
takes the gate down; while it is down, requests that need the database are refused at once
(:class:`DatabaseUnavailable`, a 503) instead of each waiting for the connection pool, and
:meth:`DatabaseGate.watch` probes the database with backoff; the first probe that goes
through opens the gate again (``recover`` first: drop the pool's dead connections). While up,
``watch`` probes every ``every`` seconds, so an API nobody calls still notices an outage; one longer
than the budget ends the process (:meth:`DatabaseGate.watch` raises
:class:`~tracker_core.service.errors.DatabaseOutageError`).
:meth:`DatabaseGate.answer_errors` installs the answers in the FastAPI app.

A task is created in one transaction with its job, and 201 is answered only once it
committed: a POST lands (201) or is refused (503), and a 201 task is never lost. (If the
connection dies just as the transaction commits, the answer is 503 for a task that exists:
repeating the request with its ``idempotency_key`` returns it.)
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from tracker_core.service.errors import ServiceUnavailableError
from tracker_core.service.outage import Backoff, Outage, is_outage

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

__all__ = ["DatabaseGate", "DatabaseUnavailable"]

log = logging.getLogger(__name__)


class DatabaseUnavailable(ServiceUnavailableError):
    """The task database does not answer: the API answers 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DatabaseGate:
    """Whether the API lets requests reach its database (see the module docstring)."""

    def __init__(
        self,
        probe: Callable[[], Awaitable[None]],
        outage: Outage,
        backoff: Backoff,
        *,
        recover: Callable[[], Awaitable[None]] | None = None,
        every: float = 5.0,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self._probe, self._recover = probe, recover
        self.outage, self.backoff = outage, backoff
        self.every, self._sleep = every, sleep
        self._attempt = 0
        self._woken = asyncio.Event()

    def retry_after(self) -> int:
        """Seconds a client should wait before trying again (the next probe, at least 1)."""
        return max(1, math.ceil(self.backoff.delay(self._attempt)))

    def unavailable(self) -> DatabaseUnavailable:
        return DatabaseUnavailable(
            f"the task database does not answer (for {self.outage.down_for():.0f} s: "
            f"{self.outage.cause}); try again later",
            self.retry_after(),
        )

    def check(self) -> None:
        """Raise :class:`DatabaseUnavailable` while the database is down."""
        if self.outage.down:
            raise self.unavailable()

    def failed(self, exc: BaseException) -> DatabaseUnavailable:
        """A request failed with ``exc``, an outage error: the gate is down; the 503."""
        assert is_outage(exc)
        if not self.outage.down:
            self._attempt = 0
        self.outage.failed(exc)
        self._woken.set()  # probe now: a busy pool, not an outage, reopens the gate at once
        return self.unavailable()

    def answer_errors(self, app: FastAPI) -> None:
        """Make ``app`` answer :class:`DatabaseUnavailable` and outage errors 503 with
        ``Retry-After`` (an outage error takes the gate down), a value the database refused
        422 (the input rules missed it: one warning line), and other database errors 500."""
        import psycopg
        from fastapi.responses import JSONResponse
        from procrastinate.exceptions import ConnectorException

        def unavailable(exc: DatabaseUnavailable) -> JSONResponse:
            return JSONResponse(
                {"detail": str(exc), "status": "unavailable", "database": "down"},
                status_code=503,
                headers={"Retry-After": str(exc.retry_after)},
            )

        async def on_unavailable(_request: Request, exc: Exception) -> JSONResponse:
            assert isinstance(exc, DatabaseUnavailable)
            return unavailable(exc)

        async def on_database_error(request: Request, exc: Exception) -> JSONResponse:
            what = f"{request.method} {request.url.path}"
            if is_outage(exc):
                return unavailable(self.failed(exc))
            if isinstance(exc, psycopg.DataError):
                log.warning("%s: the task database refused a value: %s", what, exc)
                detail = f"a value the task database cannot take: {exc}"
                return JSONResponse({"detail": detail}, status_code=422)
            log.error("%s failed: %s", what, exc, exc_info=exc)
            detail = f"the task database failed: {type(exc).__name__}"
            return JSONResponse({"detail": detail}, status_code=500)

        app.add_exception_handler(DatabaseUnavailable, on_unavailable)
        app.add_exception_handler(psycopg.Error, on_database_error)
        app.add_exception_handler(ConnectorException, on_database_error)

    async def watch(self) -> None:
        """Probe the database for ever (see the module docstring); raises
        :class:`~tracker_core.service.errors.DatabaseOutageError` past the budget."""
        while True:
            self._woken.clear()
            if self.outage.down:  # the backoff decides, whatever the requests do
                await self._sleep(self.backoff.delay(self._attempt))
            else:  # every `every` s, or at once when a request failed
                sleeper = asyncio.ensure_future(self._sleep(self.every))
                woken = asyncio.ensure_future(self._woken.wait())
                await asyncio.wait([sleeper, woken], return_when=asyncio.FIRST_COMPLETED)
                sleeper.cancel()
                woken.cancel()
            try:
                await self._probe()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self.outage.failed(exc)
                self._attempt += 1
                if self.outage.over():
                    raise self.outage.error() from exc
                continue
            if self.outage.down and self._recover is not None:
                await self._recover()
            self.outage.succeeded()
            self._attempt = 0
