"""``tracker-core serve`` and ``tracker-core worker`` as processes: start, run, stop cleanly.

:func:`serve` runs, on one event loop: the embedded PostgreSQL (unless a ``database_url`` is
set), the API (uvicorn), and a worker (unless ``with_worker`` is False). :func:`work` runs a
worker alone. Both stop on SIGINT or SIGTERM: the API stops taking requests, running tasks
stop at their next safe point (``shutdown_grace_seconds``, then their child is terminated)
and go back to ``pending``, and the embedded PostgreSQL is stopped last, so no process is
left behind. A second Ctrl-C skips the grace periods.

They also stop, the same way but with exit status 1 and one line saying why, when a part
fails: the API cannot start (its port is taken), the task database did not answer for
``database_outage_seconds`` (a shorter outage is ridden out:
:mod:`tracker_core.service.outage`), or the embedded layout's data folder was removed.
Whatever ends them, the embedded PostgreSQL they started is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from tracker_core.service.settings import ServiceSettings

if TYPE_CHECKING:
    from tracker_core.service.embedded import EmbeddedPostgres

__all__ = ["serve", "work"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event, on_second: Any = None) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def handle(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("%s again: stopping now", sig.name)
            if on_second is not None:
                on_second()
            return
        log.info("%s: stopping (Ctrl-C again to skip the grace periods)", sig.name)
        stop.set()

    for sig in signals:
        loop.add_signal_handler(sig, handle, sig)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def _kill_children() -> None:
    """Second Ctrl-C: SIGKILL our training processes now (their runs stay resumable)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()


async def _until_first_ends(
    stop: asyncio.Event,
    parts: list[asyncio.Task[Any]],
    on_stop: Callable[[], None] | None = None,
    embedded: EmbeddedPostgres | None = None,
) -> None:
    """Wait for ``stop`` or for a part to end, then stop the others (``stop`` is set, then
    ``on_stop`` called, and the watchers cancelled) and raise the first failure; a data
    folder found gone is said instead (whatever failed first was a consequence)."""
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([stopper, *parts], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    stop.set()
    if on_stop is not None:
        on_stop()
    failure: BaseException | None = None
    for part in parts:
        if part.done() and not part.cancelled() and part.exception() is not None:
            failure = failure or part.exception()
    for part in parts:
        if part.get_name() in _WATCHERS:
            part.cancel()
    results = await asyncio.gather(*parts, return_exceptions=True)
    failures = [
        r
        for r in results
        if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
    ]
    if failure is not None or failures:
        if embedded is not None:
            embedded.check_folder()
        raise failure or failures[0]


#: parts that only watch (they end by raising), cancelled once the service stops
_WATCHERS = ("database", "data folder")


async def work(
    settings: ServiceSettings, conninfo: str, embedded: EmbeddedPostgres | None = None
) -> None:
    """A worker process until SIGINT/SIGTERM (or until a part fails: see the module
    docstring); ``embedded``: the embedded PostgreSQL it runs on, watched."""
    from tracker_core.service.worker import run_worker

    stop = asyncio.Event()
    log.info(
        "tracker-core worker: database: %s, tracking: %s, models: %s",
        settings.redacted_database_url(),
        settings.redacted_tracking_uri(),
        settings.resolved_artifact_uri,
    )
    with _stop_on_signals(stop, _kill_children):
        parts = [asyncio.create_task(run_worker(settings, conninfo, stop), name="worker")]
        if embedded is not None:
            parts.append(asyncio.create_task(embedded.watch(), name="data folder"))
        await _until_first_ends(stop, parts, embedded=embedded)


async def serve(settings: ServiceSettings, *, with_worker: bool = True) -> None:
    """The API (and a worker, and the embedded database) until SIGINT/SIGTERM."""
    import uvicorn

    from tracker_core.service.api import create_app
    from tracker_core.service.auth import startup_notice
    from tracker_core.service.embedded import EmbeddedPostgres
    from tracker_core.service.errors import ServiceUnavailableError
    from tracker_core.service.registry import MethodRegistry
    from tracker_core.service.worker import run_worker

    class _Server(uvicorn.Server):
        # we handle the signals (and stop the worker and the database after the API)
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        def request_exit(self) -> None:
            self.should_exit = True

    stop = asyncio.Event()
    embedded: EmbeddedPostgres | None = None
    with _stop_on_signals(stop, _kill_children):
        if settings.database_url is None:
            embedded = EmbeddedPostgres(settings)
            conninfo = await asyncio.to_thread(embedded.start)
        else:
            conninfo = settings.database_url
        try:
            auth_level, auth_line = await startup_notice(settings, conninfo)
            registry = MethodRegistry(settings.methods)
            app = create_app(settings, conninfo, registry=registry)
            config = uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                log_level="warning",
                log_config=None,  # uvicorn's loggers use ours (time, level, no secret)
                access_log=False,
                lifespan="on",
            )
            server = _Server(config)

            async def api() -> None:
                try:
                    await server.serve()
                except SystemExit as exc:  # uvicorn's way to say it could not start
                    raise ServiceUnavailableError(
                        f"the API on {settings.host}:{settings.port} could not start (see "
                        f"the error above; uvicorn exit status {exc.code})"
                    ) from None
                if not stop.is_set():
                    raise ServiceUnavailableError("the API stopped (see the error above)")

            parts = [
                asyncio.create_task(api(), name="api"),
                asyncio.create_task(app.state.database_gate.watch(), name="database"),
            ]
            if embedded is not None:
                parts.append(asyncio.create_task(embedded.watch(), name="data folder"))
            if with_worker:
                parts.append(
                    asyncio.create_task(
                        run_worker(settings, conninfo, stop, registry=registry), name="worker"
                    )
                )
            log.info(
                "tracker-core service: API on http://%s:%d (docs: /docs), %s, database: %s, "
                "tracking: %s, models: %s",
                settings.host,
                settings.port,
                f"worker with {settings.concurrency} slot(s)" if with_worker else "no worker",
                settings.redacted_database_url(),
                settings.redacted_tracking_uri(),
                settings.resolved_artifact_uri,
            )
            log.log(auth_level, "%s", auth_line)
            await _until_first_ends(stop, parts, on_stop=server.request_exit, embedded=embedded)
        finally:
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)
    log.info("tracker-core service stopped")
