"""``tracker-core serve`` and ``tracker-core worker`` as processes: start, run, stop cleanly.

:func:`serve` runs, on one event loop: the embedded PostgreSQL (unless a ``database_url`` is
set), the API (uvicorn), and a worker (unless ``with_worker`` is False). :func:`work` runs a
worker alone. Both stop on SIGINT or SIGTERM: the API stops taking requests, running tasks
stop at their next safe point (``shutdown_grace_seconds``, then their child is terminated)
and go back to ``pending``, and the embedded PostgreSQL is stopped last, so no process is
left behind. A second Ctrl-C skips the grace periods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from typing import Any

from tracker_core.service.settings import ServiceSettings

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


async def work(settings: ServiceSettings, conninfo: str) -> None:
    """A worker process until SIGINT/SIGTERM."""
    from tracker_core.service.worker import run_worker

    stop = asyncio.Event()
    log.info(
        "tracker-core worker: database: %s, tracking: %s, models: %s",
        settings.redacted_database_url(),
        settings.redacted_tracking_uri(),
        settings.resolved_artifact_uri,
    )
    with _stop_on_signals(stop, _kill_children):
        await run_worker(settings, conninfo, stop)


async def serve(settings: ServiceSettings, *, with_worker: bool = True) -> None:
    """The API (and a worker, and the embedded database) until SIGINT/SIGTERM."""
    import uvicorn

    from tracker_core.service.api import create_app
    from tracker_core.service.auth import startup_notice
    from tracker_core.service.embedded import EmbeddedPostgres
    from tracker_core.service.registry import MethodRegistry
    from tracker_core.service.worker import run_worker

    class _Server(uvicorn.Server):
        # we handle the signals (and stop the worker and the database after the API)
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

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
            config = uvicorn.Config(
                create_app(settings, conninfo, registry=registry),
                host=settings.host,
                port=settings.port,
                log_level="warning",
                log_config=None,  # uvicorn's loggers use ours (time, level, no secret)
                access_log=False,
                lifespan="on",
            )
            server = _Server(config)
            parts = [asyncio.create_task(server.serve(), name="api")]
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
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait([stopper, *parts], return_when=asyncio.FIRST_COMPLETED)
            stop.set()
            server.should_exit = True
            stopper.cancel()
            results = await asyncio.gather(*parts, return_exceptions=True)
            failures = [
                r
                for r in results
                if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
            ]
            if failures:
                raise failures[0]
        finally:
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)
    log.info("tracker-core service stopped")
