"""A private PostgreSQL cluster for tests: ``initdb`` in a temporary folder (about a second),
a server on a free port of 127.0.0.1 and a unix socket, an empty database ``mlflow``.

:func:`postgres` yields its URL; :func:`postgres_cluster` yields the
:class:`PostgresCluster`, which a test can stop and start again (a database outage). As root,
PostgreSQL runs as the ``postgres`` (or ``nobody``) account.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from tracker_core.testing.processes import (
    ADDR_IN_USE,
    DEFAULT_TIMEOUT,
    HOST,
    PORT_ATTEMPTS,
    ServerStartError,
    free_port,
    spawn,
    stop,
    tail,
    wait_ready,
)

__all__ = ["PostgresCluster", "postgres", "postgres_cluster", "postgres_installed"]

_PG_SUPERUSER = "tracker"
_PG_DATABASE = "mlflow"
_UNIX_SOCKET_MAX = 100  # sun_path is 108 bytes, minus "/.s.PGSQL.NNNNN"


def _pg_bindir() -> Path:
    """The directory holding initdb/postgres/pg_isready/createdb of one PostgreSQL install."""
    found = shutil.which("postgres") or shutil.which("initdb")
    if found:
        bindir = Path(os.path.realpath(found)).parent
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise ServerStartError("PostgreSQL binaries (initdb, postgres) not found on PATH")


def postgres_installed() -> bool:
    """Whether PostgreSQL's server binaries are on this machine."""
    try:
        _pg_bindir()
    except ServerStartError:
        return False
    return True


def _pg_run_as() -> str | None:
    """PostgreSQL refuses to run as root: pick an unprivileged account when we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise ServerStartError("running as root and no unprivileged user (postgres, nobody) exists")


def _run(
    cmd: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
) -> None:
    with open(log_path, "ab") as log:
        code = subprocess.call(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            user=user,
        )
    if code != 0:
        raise ServerStartError(
            f"{cmd[0]} failed with code {code}; last lines of {log_path}:\n{tail(log_path)}"
        )


@contextlib.contextmanager
def postgres(workdir: Path, *, timeout: float = DEFAULT_TIMEOUT) -> Iterator[str]:
    """A private PostgreSQL cluster on 127.0.0.1 with an empty database for MLflow.

    Yields ``postgresql+psycopg://tracker@127.0.0.1:PORT/mlflow`` (trust auth, psycopg 3),
    usable as MLflow's ``--backend-store-uri`` and by SQLAlchemy. See :func:`postgres_cluster`
    for where it lives (and for a cluster a test can stop and start again).
    """
    with postgres_cluster(workdir, timeout=timeout) as cluster:
        yield cluster.url


class PostgresCluster:
    """A private PostgreSQL cluster that a test can stop (as an outage) and start again on
    the same port; made by :func:`postgres_cluster`. ``url`` stays valid across restarts."""

    def __init__(
        self, bindir: Path, base: Path, log_dir: Path, env: Mapping[str, str], user: str | None
    ) -> None:
        self.bindir, self.base, self.log_dir, self.env, self.user = bindir, base, log_dir, env, user
        self.datadir = base / "pgdata"
        self.sockdir = base / "sock"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        #: fsync stays off (a test machine does not lose power), commits are still durable
        #: across a PostgreSQL crash: ``stop("immediate")`` loses no acknowledged commit
        self.durable = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{_PG_SUPERUSER}@{HOST}:{self.port}/{_PG_DATABASE}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _cmd(self, port: int) -> list[str]:
        sockets = str(self.sockdir) if len(str(self.sockdir)) <= _UNIX_SOCKET_MAX else ""
        return [
            str(self.bindir / "postgres"), "-D", str(self.datadir),
            "-c", f"listen_addresses={HOST}",
            "-c", f"port={port}",
            "-c", f"unix_socket_directories={sockets}",
            "-c", "fsync=off",
            "-c", f"synchronous_commit={'on' if self.durable else 'off'}",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
        ]  # fmt: skip

    def _probe(self, port: int) -> Callable[[], bool]:
        isready = [str(self.bindir / "pg_isready"), "-q", "-h", HOST, "-p", str(port)]
        isready += ["-U", _PG_SUPERUSER, "-d", "postgres"]
        return lambda: subprocess.call(isready, env=dict(self.env), stdin=subprocess.DEVNULL) == 0

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Start the server (on a free port the first time, on the same port after)."""
        assert not self.running, "already running"
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = self.port or free_port()
            log_path = self.log_dir / f"postgres-{port}.log"
            proc = spawn(self._cmd(port), log_path, env=self.env, cwd=self.base, user=self.user)
            try:
                wait_ready(proc, "postgres", log_path, self._probe(port), timeout)
            except ServerStartError:
                stop(proc, "postgres", signal.SIGINT)
                lost_race = any(s in tail(log_path).lower() for s in ADDR_IN_USE)
                if lost_race and not self.port and attempt < PORT_ATTEMPTS:
                    continue
                raise
            except BaseException:
                stop(proc, "postgres", signal.SIGINT)
                raise
            self.port, self.proc = port, proc
            return

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (SIGINT: clients are disconnected, a clean shutdown) or
        ``immediate`` (SIGQUIT: as a crash, recovered at the next start)."""
        if self.proc is not None:
            sig = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
            stop(self.proc, "postgres", sig)
            self.proc = None


@contextlib.contextmanager
def postgres_cluster(
    workdir: Path, *, timeout: float = DEFAULT_TIMEOUT, durable: bool = False
) -> Iterator[PostgresCluster]:
    """A started :class:`PostgresCluster` on 127.0.0.1 with an empty database ``mlflow``,
    stopped (if running) and removed on exit. ``durable``: ``synchronous_commit=on``.

    The cluster lives in ``<workdir>/pg/pgdata``. As root, PostgreSQL runs as the ``postgres``
    (or ``nobody``) account, and the cluster goes to a fresh directory under the system temp
    dir owned by that account (pytest's tmp dirs are mode 0700 root).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    bindir = _pg_bindir()
    user = _pg_run_as()
    private: Path | None = None
    if user is None:
        base = workdir / "pg"
        base.mkdir(exist_ok=True)
    else:
        private = Path(tempfile.mkdtemp(prefix="tracker-core-pg-"))
        entry = pwd.getpwnam(user)
        os.chown(private, entry.pw_uid, entry.pw_gid)
        base = private
    env = {
        **os.environ,
        "LC_ALL": "C",
        "LANG": "C",
        "HOME": str(base),
        "PGTZ": "UTC",
    }
    for var in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGDATA"):
        env.pop(var, None)
    cluster = PostgresCluster(bindir, base, workdir, env, user)
    cluster.durable = durable
    try:
        init_log = workdir / "initdb.log"
        if user is not None:
            dirs = [str(cluster.datadir), str(cluster.sockdir)]
            _run(["install", "-d", "-o", user, "-m", "0700", *dirs], init_log)
        else:
            cluster.sockdir.mkdir(exist_ok=True)
        _run(
            [
                str(bindir / "initdb"), "-D", str(cluster.datadir),
                "--username", _PG_SUPERUSER, "--auth", "trust",
                "--encoding", "UTF8", "--no-locale", "--no-sync",
            ],
            init_log, env=env, cwd=base, user=user,
        )  # fmt: skip
        cluster.start(timeout)
        try:
            _run(
                [
                    str(bindir / "createdb"), "-h", HOST, "-p", str(cluster.port),
                    "-U", _PG_SUPERUSER, _PG_DATABASE,
                ],
                workdir / f"postgres-{cluster.port}.log", env=env,
            )  # fmt: skip
            yield cluster
        finally:
            cluster.stop()
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
