"""Riding out an outage of the task database (PostgreSQL stopped, restarted, unreachable).

- :func:`is_outage`: the one classification of the errors that mean "the database does not
  answer" (a refused or lost connection, a server shutting down or starting up, a pool that
  could not get a connection in time), as opposed to errors retrying cannot fix (a wrong
  password, a missing database, bad SQL or data, a pool we closed);
- :class:`Backoff`: the waits between attempts (a value);
- :class:`Outage`: the database as one process sees it: up, or down since when and why. Past
  ``budget`` seconds down (``--database-outage-seconds``), or past a grace period once the
  process is stopping, the process gives up. Time is a parameter (``clock``);
- :class:`OutageRider`: runs a database operation and, on an outage, runs it again with
  backoff until the database answers or the process gives up (:class:`DatabaseOutageError`).
  An operation is one transaction, retried whole: the task table's transitions are written so
  that one whose commit landed before its connection died changes nothing when run again;
- :class:`RidingConnector`: Procrastinate's connector with every query, and its LISTEN,
  ridden out: a worker's heartbeats, job fetches and job ends wait for the database instead
  of stopping the worker, whose running jobs' children keep training;
- :func:`riding`: the task repository, every call ridden out;
- :func:`probe`: whether the database answers, on a connection of its own;
- :func:`database_age`: how long the PostgreSQL server has been up (a restarted server has
  seen no heartbeat yet).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, LiteralString, TypeVar, cast

import attrs
from procrastinate import PsycopgConnector
from procrastinate.connector import Notify

from tracker_core.service.errors import DatabaseOutageError
from tracker_core.uris import redact_text

__all__ = [
    "Backoff",
    "Outage",
    "OutageRider",
    "RidingConnector",
    "database_age",
    "describe",
    "is_outage",
    "probe",
    "riding",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: SQLSTATEs of an unreachable server: class 08 (connection exception), and a server shutting
#: down (57P01 admin, 57P02 crash), starting up (57P03) or out of connections (53300)
_OUTAGE_STATES = ("08", "57P01", "57P02", "57P03", "53300")
#: what libpq says when a connection is refused for a reason that waiting does not fix (its
#: connection errors carry no SQLSTATE)
_REFUSED = (
    "does not exist",
    "authentication failed",
    "no pg_hba.conf entry",
    "permission denied",
    "no password supplied",
    "invalid connection option",
    "invalid URI",
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the errors it was raised from (Procrastinate wraps psycopg's)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the task database does not answer (now; it may later)."""
    import psycopg
    from psycopg_pool import PoolClosed

    for err in _chain(exc):
        if isinstance(err, PoolClosed):
            return False
        if isinstance(err, psycopg.OperationalError):
            state = err.sqlstate
            if state is None:  # raised by libpq or the pool, not by the server
                return not any(text in str(err) for text in _REFUSED)
            return state.startswith(_OUTAGE_STATES)
        if isinstance(err, psycopg.Error):
            return False
        if isinstance(err, ConnectionError | TimeoutError):
            return True
    return False


def describe(exc: BaseException) -> str:
    """One line saying why the database did not answer (the innermost psycopg error)."""
    import psycopg

    chosen = exc
    for err in _chain(exc):
        if isinstance(err, psycopg.Error | OSError):
            chosen = err
            break
    text = " ".join(str(chosen).split()) or type(chosen).__name__
    return redact_text(text)[:300]


@attrs.frozen
class Backoff:
    """Waits between attempts: ``first``, then doubled each time, at most ``cap``."""

    first: float = 0.1
    cap: float = 5.0
    factor: float = 2.0

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt number ``attempt`` (0 for the first)."""
        return float(min(self.cap, self.first * self.factor ** min(attempt, 64)))


@attrs.define
class Outage:
    """The task database as one process sees it (see the module docstring)."""

    budget: float
    clock: Callable[[], float] = time.monotonic
    down_since: float | None = None
    recovered_at: float | None = None
    cause: str = ""
    stop_by: float | None = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def down_for(self) -> float:
        return 0.0 if self.down_since is None else self.clock() - self.down_since

    def failed(self, exc: BaseException) -> None:
        """An operation failed because the database does not answer."""
        from psycopg_pool import PoolTimeout

        # a pool's "couldn't get a connection" hides the reason a first error told
        if not self.cause or not any(isinstance(e, PoolTimeout) for e in _chain(exc)):
            self.cause = describe(exc)
        if self.down_since is None:
            self.down_since = self.clock()
            log.warning(
                "the task database does not answer (%s); waiting for it, at most %g s "
                "(--database-outage-seconds)",
                self.cause,
                self.budget,
            )

    def succeeded(self) -> None:
        """An operation went through: the database is up."""
        if self.down_since is not None:
            now = self.clock()
            log.warning("the task database answers again, after %.1f s", now - self.down_since)
            self.down_since, self.recovered_at, self.cause = None, now, ""

    def stopping(self, grace: float) -> None:
        """The process is stopping: wait for the database at most ``grace`` more seconds."""
        limit = self.clock() + grace
        self.stop_by = limit if self.stop_by is None else min(self.stop_by, limit)

    def deadline(self) -> float | None:
        """When to give up on this outage (None: the database is up)."""
        if self.down_since is None:
            return None
        ends = self.down_since + self.budget
        return ends if self.stop_by is None else min(ends, self.stop_by)

    def over(self) -> bool:
        """Whether to give up now."""
        deadline = self.deadline()
        return deadline is not None and self.clock() >= deadline

    def settled(self, window: float) -> bool:
        """Up, and for at least ``window`` seconds since it last came back."""
        if self.down_since is not None:
            return False
        return self.recovered_at is None or self.clock() - self.recovered_at >= window

    def error(self) -> DatabaseOutageError:
        waited = self.down_for()
        if self.stop_by is not None and waited < self.budget:
            return DatabaseOutageError(
                f"stopped while the task database did not answer ({waited:.0f} s): {self.cause}"
            )
        return DatabaseOutageError(
            f"the task database did not answer for {waited:.0f} s (--database-outage-seconds "
            f"{self.budget:g}): {self.cause}"
        )


class OutageRider:
    """Runs database operations through outages (see the module docstring). ``given_up``
    is set once the process gives up (``on_give_up`` is called then, at once); the
    operations that run after that fail at once."""

    def __init__(
        self,
        outage: Outage,
        backoff: Backoff,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        on_give_up: Callable[[], None] = lambda: None,
    ) -> None:
        self.outage, self.backoff, self._sleep = outage, backoff, sleep
        self._on_give_up = on_give_up
        self.given_up = asyncio.Event()

    async def run(self, operation: Callable[[], Awaitable[T]]) -> T:
        """``await operation()``, again after each outage error until it goes through."""
        attempt = 0
        while True:
            try:
                result = await operation()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self.outage.failed(exc)
                deadline = self.outage.deadline()
                if self.given_up.is_set() or deadline is None or self.outage.over():
                    if not self.given_up.is_set():
                        self.given_up.set()
                        self._on_give_up()
                    raise self.outage.error() from exc
                delay = min(self.backoff.delay(attempt), deadline - self.outage.clock())
                attempt += 1
                await self._sleep(max(0.0, delay))
                continue
            self.outage.succeeded()
            return result

    async def until_given_up(self) -> None:
        """Wait until the process gives up, then raise why."""
        await self.given_up.wait()
        raise self.outage.error()


class RidingConnector(PsycopgConnector):
    """:class:`procrastinate.PsycopgConnector` whose queries and LISTEN ride out outages
    (``rider``). Queries on a caller's connection (inside the caller's transaction) are not
    retried here: the caller retries its whole transaction."""

    def __init__(self, *, rider: OutageRider, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rider = rider

    async def execute_query_async(self, query: LiteralString, **arguments: Any) -> None:
        run = super().execute_query_async
        await self.rider.run(lambda: run(query, **arguments))

    async def execute_query_one_async(
        self, query: LiteralString, **arguments: Any
    ) -> dict[str, Any]:
        run = super().execute_query_one_async
        return await self.rider.run(lambda: run(query, **arguments))

    async def execute_query_all_async(
        self, query: LiteralString, **arguments: Any
    ) -> list[dict[str, Any]]:
        run = super().execute_query_all_async
        return await self.rider.run(lambda: run(query, **arguments))

    async def listen_notify(self, on_notification: Notify, channels: Iterable[str]) -> None:
        listen = super().listen_notify
        await self.rider.run(lambda: listen(on_notification, channels))


class _Riding:
    """A proxy whose coroutine methods are its target's, each run through ``rider``."""

    def __init__(self, target: object, rider: OutageRider) -> None:
        self._target, self._rider = target, rider

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        async def ridden(*args: Any, **kwargs: Any) -> Any:
            return await self._rider.run(lambda: attr(*args, **kwargs))

        return ridden


def riding(target: T, rider: OutageRider) -> T:
    """``target`` (the task repository) with each of its coroutine methods ridden out."""
    return cast(T, _Riding(target, rider))


async def probe(conninfo: str, timeout: float) -> None:
    """Connect to the database at ``conninfo`` on a connection of its own (a pool's may all
    be dead, and a pool waits) and run ``SELECT 1``; raises what psycopg raises."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(
        conninfo, connect_timeout=max(1, math.ceil(timeout)), autocommit=True
    ) as conn:
        await asyncio.wait_for(conn.execute("SELECT 1"), timeout)


async def database_age(connection: Any) -> float:
    """Seconds since the PostgreSQL server on ``connection`` started."""
    cur = await connection.execute(
        "SELECT extract(epoch FROM now() - pg_postmaster_start_time())::float8"
    )
    row = await cur.fetchone()
    return float(row[0]) if row else 0.0
