"""The servers every test shares: an MLflow server (on SQLite), moto's S3 and the GCS emulator.

Under pytest-xdist (``make test``) the controller starts the three once, side by side, while
the test processes start and collect (:func:`start_for_test_processes`, called from
``tests/conftest.py``): one of each for the whole run instead of one per test process (each
MLflow server costs ~10 s of CPU to start). It hands down, in an environment variable, the
file each server's address will be written to once it answers; the first test that needs it
waits for that file. A test process that finds no such variable (``pytest -n 0``, a single
module run by hand) starts its own at first use and stops it at exit (:func:`address`).

Tests never see each other's data on them: each test has its own plugin name, bucket or prefix.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

from tracker_core.testing import servers

__all__ = ["address", "start_for_test_processes"]

#: how each shared server is started, given a folder for its files and log
_FACTORIES: dict[str, Callable[[Path], AbstractContextManager[str]]] = {
    "mlflow": servers.mlflow_server,
    "moto": servers.moto_server,
    "gcs": servers.gcs_emulator,
}

_lock = threading.Lock()
_stack = contextlib.ExitStack()
_started: dict[str, str] = {}
atexit.register(_stack.close)


#: how long a test process waits for the controller's server to answer (a start under the
#: load of the whole suite takes ~10-30 s; the factories give up sooner with their own error)
_WAIT_SECONDS = 600.0
_FAILED = "failed: "


def _variable(name: str) -> str:
    return f"TRACKER_CORE_TEST_{name.upper()}_ADDRESS_FILE"


def _start(name: str, stack: contextlib.ExitStack) -> str:
    workdir = Path(tempfile.mkdtemp(prefix=f"tracker-core-{name}-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    return stack.enter_context(_FACTORIES[name](workdir))


def address(name: str) -> str:
    """The address of the shared server ``name`` (``"mlflow"``, ``"moto"`` or ``"gcs"``):
    the one the controller started (waited for until it answers), else this process's own,
    started at the first call."""
    handed_down = os.environ.get(_variable(name))
    if handed_down:
        return _wait_for(name, Path(handed_down))
    with _lock:
        if name not in _started:
            _started[name] = _start(name, _stack)
        return _started[name]


def _wait_for(name: str, path: Path) -> str:
    deadline = time.monotonic() + _WAIT_SECONDS
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the run's {name} server did not answer in {_WAIT_SECONDS:g} s")
        time.sleep(0.1)
    written = path.read_text()
    if written.startswith(_FAILED):
        raise RuntimeError(f"the run's {name} server did not start: {written[len(_FAILED) :]}")
    return written


def start_for_test_processes(stack: contextlib.ExitStack) -> None:
    """Start every shared server at once, in the background (the controller of a
    pytest-xdist run: its test processes start meanwhile and inherit where to find each
    address); ``stack`` waits for the starts, then stops the servers, at once too (a server
    may take its stop grace to end)."""
    folder = Path(tempfile.mkdtemp(prefix="tracker-core-shared-"))
    own = {name: contextlib.ExitStack() for name in _FACTORIES}
    stack.callback(shutil.rmtree, folder, ignore_errors=True)
    stack.callback(_close_all, list(own.values()))
    pool = ThreadPoolExecutor(len(own), thread_name_prefix="shared-server")
    stack.callback(pool.shutdown)  # first: a start still running ends before the stops
    for name in own:
        path = folder / name
        os.environ[_variable(name)] = str(path)
        pool.submit(_publish, name, own[name], path)


def _publish(name: str, stack: contextlib.ExitStack, path: Path) -> None:
    """Start ``name`` and write its address (or why it failed) to ``path`` in one rename, so
    that a reader never sees half of it."""
    try:
        text = _start(name, stack)
    except Exception as exc:
        text = f"{_FAILED}{type(exc).__name__}: {exc}"
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.rename(path)


def _close_all(stacks: list[contextlib.ExitStack]) -> None:
    with ThreadPoolExecutor(len(stacks)) as pool:
        for done in [pool.submit(s.close) for s in stacks]:
            done.result()
