"""The worker's side of a task's child process: start it, relay its progress, stop it.

:class:`ChildProcess` wraps one ``multiprocessing`` child running
:func:`tracker_core.service.child.child_main`. Children come from a *forkserver*: a clean,
single-threaded process that the worker starts once (:func:`warm_up`) and that has imported
tracker-core, MLflow and torch, so a task's process starts in a fraction of a second instead
of importing them again. The forkserver never runs a method, never touches a GPU, and exits
with its worker; every child is still its own process (its own GPU memory, killable).

:meth:`ChildProcess.wait` relays progress and returns how the child ended (an
:class:`Outcome`). :meth:`ChildProcess.request_stop` asks the iteration to stop at its next
safe point; if the child has not ended ``grace`` seconds later it gets SIGTERM (which the child
turns into a stop), and SIGKILL ``kill_after`` seconds after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from tracker_core.service.child import ChildSpec, child_main
from tracker_core.service.logs import log_once

__all__ = ["ChildProcess", "Outcome"]

log = logging.getLogger(__name__)

_POLL = 0.05
#: imported once by the forkserver (a missing one is skipped)
_PRELOAD = [
    "tracker_core.service.child",
    "tracker_core.connect",
    "tracker_core.finetune",
    "tracker_core_mlflow",
    "mlflow.tracking",
    "torch",
]


#: the MLflow tracking store each kind of tracking URI imports on first use
_TRACKING_STORES = {
    "http": "mlflow.store.tracking.rest_store",
    "https": "mlflow.store.tracking.rest_store",
    "databricks": "mlflow.store.tracking.rest_store",
}
_SQL_STORE = "mlflow.store.tracking.sqlalchemy_store"


def stores_to_preload(tracking_uri: str, artifact_uri: str) -> list[str]:
    """The modules a child imports on its first ``connect`` for these URIs (the MLflow
    tracking store, the artifact backend): importing them once in the forkserver saves each
    job's process seconds. Found without importing anything."""
    from tracker_core.registry import BACKEND_GROUP, scheme_of

    modules = [_TRACKING_STORES.get(tracking_uri.split(":", 1)[0].lower(), _SQL_STORE)]
    try:
        scheme = scheme_of(artifact_uri)
    except Exception:  # an invalid URI fails later, where it is used, with its own message
        return modules
    for ep in importlib.metadata.entry_points(group=BACKEND_GROUP):
        if ep.name == scheme:
            modules.append(ep.value.split(":", 1)[0])
    return modules


@functools.cache
def _context() -> multiprocessing.context.ForkServerContext:
    ctx = multiprocessing.get_context("forkserver")
    assert isinstance(ctx, multiprocessing.context.ForkServerContext)
    ctx.set_forkserver_preload(list(_PRELOAD))  # type: ignore[attr-defined]
    return ctx


def preload(modules: list[str]) -> None:
    """Add modules for the forkserver to import (before it starts: call before
    :func:`warm_up` and before the first child)."""
    _PRELOAD.extend(m for m in modules if m not in _PRELOAD)


def warm_up() -> None:
    """Start the forkserver now (it imports the heavy modules); blocking, call it in a thread."""
    _context()
    multiprocessing.forkserver.ensure_running()


@attrs.frozen
class Outcome:
    """How a child ended: ``kind`` is one of the child's final events (``done``, ``failed``,
    ``stopped``, ``retry``, ``error``) or ``crashed`` (it died without saying)."""

    kind: str
    payload: Any = None
    exitcode: int | None = None


class ChildProcess:
    """One job's process (a task's iteration or its plan, one run, or a completion)."""

    def __init__(self, spec: ChildSpec, *, kill_after: float = 5.0) -> None:
        ctx = _context()
        self.spec = spec
        self._control_r, self._control_w = ctx.Pipe(duplex=False)
        self._events_r, self._events_w = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=child_main,
            args=(spec, self._control_r, self._events_w),
            name=f"tracker-core-{spec.kind}-{spec.label}",
            daemon=False,
        )
        self._kill_after = kill_after
        self._stop_deadline: float | None = None
        self._term_deadline: float | None = None
        self._stop_reason: str | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def start(self) -> None:
        """Start the child (blocks until the forkserver has forked it: call it in a thread)."""
        self._process.start()
        # the child holds its own copies; closing ours lets EOF mean "the other side died"
        self._control_r.close()
        self._events_w.close()

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def request_stop(self, reason: str, grace: float) -> None:
        """Ask the iteration to stop at its next safe point; force it after ``grace`` s."""
        if self._stop_reason is not None:
            # a second request may only shorten the grace period
            deadline = time.monotonic() + grace
            if self._stop_deadline is None or deadline < self._stop_deadline:
                self._stop_deadline = deadline
            return
        self._stop_reason = reason
        self._stop_deadline = time.monotonic() + grace
        with contextlib.suppress(OSError):  # a broken pipe: it is ending anyway
            self._control_w.send("stop")

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        if self._term_deadline is None:
            if self._stop_deadline is not None and now >= self._stop_deadline:
                log.warning(
                    "%s %s: no safe point within the grace period; terminating pid %s",
                    self.spec.kind,
                    self.spec.label,
                    self.pid,
                )
                self._process.terminate()
                self._term_deadline = now + self._kill_after
        elif now >= self._term_deadline:
            log.warning("%s %s: killing pid %s", self.spec.kind, self.spec.label, self.pid)
            self._process.kill()
            self._term_deadline = float("inf")

    async def wait(self, on_progress: Callable[[dict[str, Any]], Awaitable[None]]) -> Outcome:
        """Relay progress until the child ends; how it ended."""
        final: tuple[str, Any] | None = None
        try:
            while True:
                while self._events_r.poll():
                    try:
                        kind, payload = self._events_r.recv()
                    except (EOFError, OSError):
                        break
                    if kind == "progress":
                        await on_progress(payload)
                    elif kind == "notice":
                        log_once(payload)
                    else:
                        final = (kind, payload)
                if self._process.exitcode is not None:
                    # drain what it sent just before exiting
                    while final is None and self._events_r.poll():
                        try:
                            kind, payload = self._events_r.recv()
                        except (EOFError, OSError):
                            break
                        if kind == "notice":
                            log_once(payload)
                        elif kind != "progress":
                            final = (kind, payload)
                    break
                self._enforce_deadlines()
                await asyncio.sleep(_POLL)
        finally:
            if self._process.exitcode is None:  # we are being torn down: never leave it behind
                self.kill_now()
        exitcode = self._process.exitcode
        self.close()
        if final is not None:
            return Outcome(final[0], final[1], exitcode)
        if self._stop_reason is not None:
            return Outcome("stopped", f"terminated ({self._stop_reason})", exitcode)
        return Outcome(
            "crashed",
            f"the training process died without a result (exit code {exitcode})",
            exitcode,
        )

    def kill_now(self) -> None:
        """SIGKILL the child and reap it (last resort, e.g. the worker's event loop is ending)."""
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join(timeout=5)

    def close(self) -> None:
        for conn in (self._control_w, self._events_r):
            with contextlib.suppress(OSError):
                conn.close()
        with contextlib.suppress(ValueError):
            self._process.close()
