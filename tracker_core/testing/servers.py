"""Real servers for tests: MLflow, moto's S3, a GCS emulator and PostgreSQL, as subprocesses.

Every context manager here picks a free port on 127.0.0.1, starts the server bound to
127.0.0.1 only, waits for it to answer (bounded by ``timeout``; a dead or slow server raises
:class:`ServerStartError` carrying the tail of its log), yields its address, and on exit stops
the process it started by PID (SIGTERM to its own process group, wait, then SIGKILL).

Nothing here imports mlflow, moto, boto3, s3fs or gcsfs: the servers run as
``sys.executable -m ...`` subprocesses, so this module is importable from the core package.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

__all__ = [
    "DEFAULT_TIMEOUT",
    "PostgresCluster",
    "ServerStartError",
    "free_port",
    "gcs_emulator",
    "mlflow_server",
    "moto_server",
    "postgres",
    "postgres_cluster",
    "postgres_installed",
]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
#: Seconds a server may take to become ready. MLflow's server needs ~5-10 s on 2 cores.
DEFAULT_TIMEOUT = 120.0
_STOP_GRACE = 15.0
_PORT_ATTEMPTS = 3
_ADDR_IN_USE = ("address already in use", "errno 98", "could not bind", "could not create listen")


class ServerStartError(RuntimeError):
    """A test server died or did not become ready before its deadline."""


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, http.client.HTTPException, OSError):
        return False


#: set by coverage.py (make coverage) to measure every Python process it starts; the servers
#: here run no tracker-core code, and tracing them would only slow every request they answer
_COVERAGE_VARS = ("COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START")


def _server_env(env: Mapping[str, str] | None) -> dict[str, str]:
    server_env = dict(os.environ if env is None else env)
    for var in _COVERAGE_VARS:
        server_env.pop(var, None)
    return server_env


def _spawn(
    cmd: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
) -> subprocess.Popen[bytes]:
    logger.debug("starting %s (log: %s)", " ".join(cmd), log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_server_env(env),
            cwd=cwd,
            user=user,
            start_new_session=True,  # own process group: workers die with the server
        )


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        proc.send_signal(sig)


def _stop(proc: subprocess.Popen[bytes], name: str, stop_signal: int = signal.SIGTERM) -> None:
    """Stop the process we started (and its process group): signal, wait, then kill."""
    if proc.poll() is None:
        logger.debug("stopping %s (pid %d)", name, proc.pid)
        _signal(proc, stop_signal)
        try:
            proc.wait(timeout=_STOP_GRACE)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) ignored signal %d; killing it", name, proc.pid, stop_signal)
            _signal(proc, signal.SIGKILL)
            proc.wait(timeout=_STOP_GRACE)
    # Reap any worker left in the group (e.g. uvicorn's child if the parent died first).
    _signal(proc, signal.SIGKILL)


def _wait_ready(
    proc: subprocess.Popen[bytes],
    name: str,
    log_path: Path,
    probe: Callable[[], bool],
    timeout: float,
) -> float:
    """Poll ``probe`` until it is true; return the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    delay = 0.05
    while True:
        if probe():
            return time.monotonic() - started
        code = proc.poll()
        if code is not None:
            raise ServerStartError(
                f"{name} exited with code {code} before it was ready; "
                f"last lines of {log_path}:\n{_tail(log_path)}"
            )
        if time.monotonic() >= deadline:
            raise ServerStartError(
                f"{name} was not ready after {timeout:.0f}s; last lines of {log_path}:\n"
                f"{_tail(log_path)}"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


@contextlib.contextmanager
def _serve(
    name: str,
    make_cmd: Callable[[int], Sequence[str]],
    make_probe: Callable[[int], Callable[[], bool]],
    log_dir: Path,
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
    stop_signal: int = signal.SIGTERM,
) -> Iterator[int]:
    """Start ``make_cmd(port)`` on a free port, wait for ``make_probe(port)``, yield the port.

    A port taken between :func:`free_port` and the bind is retried on a new port.
    """
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        port = free_port()
        log_path = log_dir / f"{name}-{port}.log"
        proc = _spawn(make_cmd(port), log_path, env=env, cwd=cwd, user=user)
        try:
            elapsed = _wait_ready(proc, name, log_path, make_probe(port), timeout)
        except ServerStartError:
            _stop(proc, name, stop_signal)
            lost_race = any(s in _tail(log_path).lower() for s in _ADDR_IN_USE)
            if lost_race and attempt < _PORT_ATTEMPTS:
                logger.warning("%s lost port %d to another process; retrying", name, port)
                continue
            raise
        except BaseException:
            _stop(proc, name, stop_signal)
            raise
        logger.info("%s ready on %s:%d in %.1fs (pid %d)", name, HOST, port, elapsed, proc.pid)
        try:
            yield port
        finally:
            _stop(proc, name, stop_signal)
        return
    raise AssertionError("unreachable")  # pragma: no cover


def _log_dir(workdir: Path | None) -> Path:
    if workdir is not None:
        return workdir
    return Path(tempfile.gettempdir()) / "tracker-core-servers"


# --------------------------------------------------------------------------- MLflow


@contextlib.contextmanager
def mlflow_server(
    workdir: Path,
    backend_store_uri: str | None = None,
    *,
    default_artifact_root: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Iterator[str]:
    """An ``mlflow server`` on 127.0.0.1; yields ``http://127.0.0.1:PORT``.

    The backend store defaults to ``sqlite:///<workdir>/mlflow.db``. Artifacts are *not* proxied
    (``--no-serve-artifacts``): new experiments get ``<default_artifact_root>/<experiment_id>``
    (default ``<workdir>/artifacts``), and clients read and write that location directly.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    store = backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    artifact_root = default_artifact_root or str(workdir / "artifacts")
    server_env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}

    def cmd(port: int) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--host", HOST,
            "--port", str(port),
            "--workers", "1",
            "--backend-store-uri", store,
            "--default-artifact-root", artifact_root,
            "--no-serve-artifacts",
        ]  # fmt: skip

    def probe(port: int) -> Callable[[], bool]:
        return lambda: _http_ok(f"http://{HOST}:{port}/health")

    with _serve(
        "mlflow", cmd, probe, workdir, timeout=timeout, env=server_env, cwd=workdir
    ) as port:
        yield f"http://{HOST}:{port}"


# --------------------------------------------------------------------------- S3 (moto)


@contextlib.contextmanager
def moto_server(workdir: Path | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> Iterator[str]:
    """moto's S3-compatible server on 127.0.0.1; yields its endpoint ``http://127.0.0.1:PORT``.

    Clients need ``endpoint_url`` (or ``AWS_ENDPOINT_URL``/``MLFLOW_S3_ENDPOINT_URL``) and any
    credentials (e.g. ``AWS_ACCESS_KEY_ID=testing``).
    """
    log_dir = _log_dir(workdir)

    def cmd(port: int) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]

    def probe(port: int) -> Callable[[], bool]:
        return lambda: _http_ok(f"http://{HOST}:{port}/moto-api/")

    with _serve("moto", cmd, probe, log_dir, timeout=timeout, cwd=workdir) as port:
        yield f"http://{HOST}:{port}"


# --------------------------------------------------------------------------- GCS emulator


@contextlib.contextmanager
def gcs_emulator(workdir: Path | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> Iterator[str]:
    """``gcp-storage-emulator`` (in memory) on 127.0.0.1; yields ``http://127.0.0.1:PORT``.

    For gcsfs use ``endpoint_url=<url>, token="anon"`` and set
    ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` before importing gcsfs; for google-cloud-storage
    set ``STORAGE_EMULATOR_HOST=<url>``.
    """
    log_dir = _log_dir(workdir)
    exe = shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent))
    base = [exe] if exe else [sys.executable, "-m", "gcp_storage_emulator"]

    def cmd(port: int) -> list[str]:
        return [*base, "start", "--host", HOST, "--port", str(port), "--in-memory"]

    def probe(port: int) -> Callable[[], bool]:
        return lambda: _http_ok(f"http://{HOST}:{port}/")

    with _serve("gcs-emulator", cmd, probe, log_dir, timeout=timeout, cwd=workdir) as port:
        yield f"http://{HOST}:{port}"


# --------------------------------------------------------------------------- PostgreSQL

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
            f"{cmd[0]} failed with code {code}; last lines of {log_path}:\n{_tail(log_path)}"
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
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = self.port or free_port()
            log_path = self.log_dir / f"postgres-{port}.log"
            proc = _spawn(self._cmd(port), log_path, env=self.env, cwd=self.base, user=self.user)
            try:
                _wait_ready(proc, "postgres", log_path, self._probe(port), timeout)
            except ServerStartError:
                _stop(proc, "postgres", signal.SIGINT)
                lost_race = any(s in _tail(log_path).lower() for s in _ADDR_IN_USE)
                if lost_race and not self.port and attempt < _PORT_ATTEMPTS:
                    continue
                raise
            except BaseException:
                _stop(proc, "postgres", signal.SIGINT)
                raise
            self.port, self.proc = port, proc
            return

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (SIGINT: clients are disconnected, a clean shutdown) or
        ``immediate`` (SIGQUIT: as a crash, recovered at the next start)."""
        if self.proc is not None:
            sig = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
            _stop(self.proc, "postgres", sig)
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
