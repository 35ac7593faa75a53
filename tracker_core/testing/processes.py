"""Running a test server as a subprocess: a free port on 127.0.0.1, the process started in its
own process group with its log in a file, waited for until it answers (or dead, with the tail
of its log), stopped by PID (SIGTERM to its group, wait, then SIGKILL).

:mod:`tracker_core.testing.servers` (MLflow, moto's S3, a GCS emulator) and
:mod:`tracker_core.testing.postgres` start their servers with it. Nothing here imports a
server's package: servers run as ``sys.executable -m ...`` or as their own binaries.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

__all__ = [
    "ADDR_IN_USE",
    "DEFAULT_TIMEOUT",
    "HOST",
    "PORT_ATTEMPTS",
    "ServerStartError",
    "free_port",
    "http_ok",
    "logs_folder",
    "serve",
    "spawn",
    "stop",
    "tail",
    "wait_ready",
]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
#: Seconds a server may take to become ready. MLflow's server needs ~5-10 s on 2 cores.
DEFAULT_TIMEOUT = 120.0
_STOP_GRACE = 15.0
PORT_ATTEMPTS = 3
ADDR_IN_USE = ("address already in use", "errno 98", "could not bind", "could not create listen")


class ServerStartError(RuntimeError):
    """A test server died or did not become ready before its deadline."""


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def http_ok(url: str) -> bool:
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


def spawn(
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


def stop(proc: subprocess.Popen[bytes], name: str, stop_signal: int = signal.SIGTERM) -> None:
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


def wait_ready(
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
                f"last lines of {log_path}:\n{tail(log_path)}"
            )
        if time.monotonic() >= deadline:
            raise ServerStartError(
                f"{name} was not ready after {timeout:.0f}s; last lines of {log_path}:\n"
                f"{tail(log_path)}"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


@contextlib.contextmanager
def serve(
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
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        log_path = log_dir / f"{name}-{port}.log"
        proc = spawn(make_cmd(port), log_path, env=env, cwd=cwd, user=user)
        try:
            elapsed = wait_ready(proc, name, log_path, make_probe(port), timeout)
        except ServerStartError:
            stop(proc, name, stop_signal)
            lost_race = any(s in tail(log_path).lower() for s in ADDR_IN_USE)
            if lost_race and attempt < PORT_ATTEMPTS:
                logger.warning("%s lost port %d to another process; retrying", name, port)
                continue
            raise
        except BaseException:
            stop(proc, name, stop_signal)
            raise
        logger.info("%s ready on %s:%d in %.1fs (pid %d)", name, HOST, port, elapsed, proc.pid)
        try:
            yield port
        finally:
            stop(proc, name, stop_signal)
        return
    raise AssertionError("unreachable")  # pragma: no cover


def logs_folder(workdir: Path | None) -> Path:
    if workdir is not None:
        return workdir
    return Path(tempfile.gettempdir()) / "tracker-core-servers"
