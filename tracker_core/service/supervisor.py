"""The worker's side of its child processes: start one, relay its progress, stop it, keep it.

:class:`ChildProcess` wraps one ``multiprocessing`` child running
:func:`tracker_core.service.child.child_main`. Children come from a *forkserver*: a clean,
single-threaded process that the worker starts once (:func:`warm_up`) and that has imported
tracker-core, MLflow, torch and the stores' modules (:func:`stores_to_preload`), so a child
starts in a fraction of a second instead of importing them again. The forkserver never runs a
method, never touches a GPU, and exits with its worker; every child is still its own process
(its own GPU memory, killable).

:meth:`ChildProcess.wait` relays progress and returns the job's outcome.
:meth:`ChildProcess.request_stop` asks the job to stop at its next safe point; if the child has
not answered ``grace`` seconds later it gets SIGTERM (which the child turns into a stop), and
SIGKILL ``kill_after`` seconds after that.

:class:`WarmChildren` keeps the children whose job ended clean (:func:`.protocol.keeps_child`,
no stop requested) for ``keep_seconds``: the next job with the same
:class:`~.protocol.ChildSettings` (the same method, stores and options) goes to one of them,
which skips the process start, the method's import, ``connect`` and MLflow's schema check. A job
of other settings first lets the idle children go (their memory, a GPU's included, is for it).
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
import os
import signal
import time
from collections.abc import Awaitable, Callable

from tracker_core.service.child import child_main
from tracker_core.service.logs import log_once
from tracker_core.service.protocol import (
    ChildSettings,
    Crashed,
    Done,
    Error,
    Failed,
    Job,
    Notice,
    Outcome,
    Planned,
    Progress,
    Ran,
    Release,
    Retry,
    Stop,
    Stopped,
    StopReason,
    keeps_child,
)

__all__ = [
    "ChildProcess",
    "WarmChildren",
    "preload",
    "stop_forkserver",
    "stores_to_preload",
    "warm_up",
]

log = logging.getLogger(__name__)

#: how often a waiting worker enforces a stop's deadlines
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
#: the DB-API module SQLAlchemy imports for a database URI, by dialect[+driver]
_DRIVERS = {
    "postgresql": "psycopg2",
    "postgresql+psycopg": "psycopg",
    "postgresql+psycopg2": "psycopg2",
    "postgresql+pg8000": "pg8000",
    "mysql": "MySQLdb",
    "mysql+pymysql": "pymysql",
    "mysql+mysqldb": "MySQLdb",
    "mssql": "pyodbc",
    "mssql+pyodbc": "pyodbc",
    "mssql+pymssql": "pymssql",
}


def stores_to_preload(tracking_uri: str, artifact_uri: str) -> list[str]:
    """The modules a child imports on its first ``connect`` for these URIs (the MLflow
    tracking store and its database driver, the artifact backend): importing them once in the
    forkserver saves each child seconds. Found without importing anything."""
    from tracker_core.registry import BACKEND_GROUP, scheme_of

    scheme = tracking_uri.split(":", 1)[0].lower()
    modules = [_TRACKING_STORES.get(scheme, _SQL_STORE)]
    if scheme in _DRIVERS:
        modules.append(_DRIVERS[scheme])
    try:
        artifact_scheme = scheme_of(artifact_uri)
    except Exception:  # an invalid URI fails later, where it is used, with its own message
        return modules
    for ep in importlib.metadata.entry_points(group=BACKEND_GROUP):
        if ep.name == artifact_scheme:
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


def stop_forkserver() -> None:
    """End the forkserver with its worker; blocking, call it in a thread. (It ends by itself
    once it sees its worker gone, but only after its imports: on a loaded machine, most of a
    minute after a worker stopped right after it started.)"""
    server = multiprocessing.forkserver._forkserver
    pid = server._forkserver_pid  # type: ignore[attr-defined]
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        server._stop()  # type: ignore[attr-defined]  # closes its pipe, reaps it


class ChildProcess:
    """One child process, running one job at a time (a task's plan or iteration, one run, or
    a completion), and then perhaps the next job of the same settings."""

    def __init__(self, settings: ChildSettings, job: Job, *, kill_after: float = 5.0) -> None:
        ctx = _context()
        self.settings, self.job = settings, job
        self._control_r, self._control_w = ctx.Pipe(duplex=False)
        self._events_r, self._events_w = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=child_main,
            args=(settings, job, self._control_r, self._events_w),
            name=f"tracker-core-{settings.method}",
            daemon=False,
        )
        self._kill_after = kill_after
        self._stop_deadline: float | None = None
        self._term_deadline: float | None = None
        self._stop_reason: StopReason | None = None
        self._last: Outcome | None = None
        self._events_open = True

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def start(self) -> None:
        """Start the child (blocks until the forkserver has forked it: call it in a thread)."""
        self._process.start()
        # the child holds its own copies; closing ours lets EOF mean "the other side died"
        self._control_r.close()
        self._events_w.close()

    def assign(self, job: Job) -> bool:
        """Hand an idle child its next job; False if it is gone."""
        if self._process.exitcode is not None:
            return False
        try:
            self._control_w.send(job)
        except OSError:
            return False
        self.job, self._last = job, None
        return True

    @property
    def stop_reason(self) -> StopReason | None:
        return self._stop_reason

    @property
    def idle_and_clean(self) -> bool:
        """Its job ended with an outcome that keeps it, no stop was asked: it waits for a job."""
        return (
            self._last is not None
            and keeps_child(self._last)
            and self._stop_reason is None
            and self._process.exitcode is None
        )

    def request_stop(self, reason: StopReason, grace: float) -> None:
        """Ask the job to stop at its next safe point; force it after ``grace`` s."""
        if self._stop_reason is not None:
            # a second request may only shorten the grace period
            deadline = time.monotonic() + grace
            if self._stop_deadline is None or deadline < self._stop_deadline:
                self._stop_deadline = deadline
            return
        self._stop_reason = reason
        self._stop_deadline = time.monotonic() + grace
        with contextlib.suppress(OSError):  # a broken pipe: it is ending anyway
            self._control_w.send(Stop(reason))

    def _what(self) -> str:
        return f"{self.job.kind} {self.job.label}"

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        if self._term_deadline is None:
            if self._stop_deadline is not None and now >= self._stop_deadline:
                log.warning(
                    "%s: no safe point within the grace period; terminating pid %s",
                    self._what(),
                    self.pid,
                )
                self._process.terminate()
                self._term_deadline = now + self._kill_after
        elif now >= self._term_deadline:
            log.warning("%s: killing pid %s", self._what(), self.pid)
            self._process.kill()
            self._term_deadline = float("inf")

    async def _drain(self, on_progress: Callable[[Progress], Awaitable[None]]) -> Outcome | None:
        """Relay what the child has sent so far; its outcome, once it came."""
        while self._events_open and self._events_r.poll():
            try:
                message = self._events_r.recv()
            except (EOFError, OSError):
                self._events_open = False
                break
            match message:
                case Progress():
                    await on_progress(message)
                case Notice(line):
                    log_once(line)
                case Done() | Failed() | Planned() | Ran() | Stopped() | Retry() | Error():
                    return message
                case _:
                    log.warning("%s: unexpected message %r ignored", self._what(), message)
        return None

    async def wait(self, on_progress: Callable[[Progress], Awaitable[None]]) -> Outcome:
        """Relay progress until the job's outcome; a child that does not stay for another
        job is reaped first."""
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        watched = [self._events_r.fileno(), self._process.sentinel]
        for fd in watched:
            loop.add_reader(fd, woken.set)
        outcome: Outcome | None = None
        try:
            while outcome is None:
                outcome = await self._drain(on_progress)
                if outcome is not None or self._process.exitcode is not None:
                    break
                if not self._events_open:  # EOF, not exited yet: wake on the exit alone
                    loop.remove_reader(watched[0])
                self._enforce_deadlines()
                woken.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), _POLL)
            if outcome is None:  # it exited: what it sent just before
                outcome = await self._drain(on_progress)
        finally:
            for fd in watched:
                loop.remove_reader(fd)
            if outcome is None and self._process.exitcode is None:
                # we are being torn down: never leave it behind
                self.kill_now()
        self._last = outcome if outcome is not None else self._ended_silently()
        if not self.idle_and_clean:
            await self._reap()
        return self._last

    def _ended_silently(self) -> Outcome:
        exitcode = self._process.exitcode
        if self._stop_reason is not None:
            return Stopped(f"terminated ({self._stop_reason})")
        return Crashed(
            f"the training process died without a result (exit code {exitcode})", exitcode
        )

    async def _reap(self) -> None:
        """Wait for a child that is ending (past ``kill_after``: SIGKILL), then close."""
        deadline = time.monotonic() + self._kill_after
        while self._process.exitcode is None:
            if time.monotonic() >= deadline:
                self.kill_now()
                break
            self._enforce_deadlines()
            await asyncio.sleep(_POLL)
        self.close()

    async def release(self) -> None:
        """Let an idle child go: it exits."""
        with contextlib.suppress(OSError):
            self._control_w.send(Release())
        await self._reap()

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


class WarmChildren:
    """This worker's idle children, each kept ``keep_seconds`` for a job of its settings."""

    def __init__(self, keep_seconds: float) -> None:
        self.keep_seconds = keep_seconds
        self._idle: dict[ChildProcess, asyncio.TimerHandle] = {}
        self._releasing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._idle)

    async def start(self, settings: ChildSettings, job: Job) -> ChildProcess:
        """A child running ``job``: an idle one of the same settings, or a new one (idle
        children of other settings are let go first)."""
        for child in list(self._idle):
            if child.settings != settings:
                self._let_go(child)
        for child in list(self._idle):
            self._idle.pop(child).cancel()
            if child.assign(job):
                log.debug("%s %s: on warm child pid %s", job.kind, job.label, child.pid)
                return child
            self._let_go(child, kept=False)
        child = ChildProcess(settings, job)
        await asyncio.to_thread(child.start)
        return child

    def done(self, child: ChildProcess) -> None:
        """The child's job ended: keep it if it waits for another job, else it is gone."""
        if not child.idle_and_clean:
            return
        if self.keep_seconds <= 0:
            self._let_go(child, kept=False)
            return
        loop = asyncio.get_running_loop()
        self._idle[child] = loop.call_later(self.keep_seconds, self._let_go, child)

    def _let_go(self, child: ChildProcess, kept: bool = True) -> None:
        if kept:
            handle = self._idle.pop(child, None)
            if handle is not None:
                handle.cancel()
        task = asyncio.get_running_loop().create_task(child.release())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def close(self) -> None:
        """Let every idle child go, and wait until they have."""
        for child in list(self._idle):
            self._let_go(child)
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
