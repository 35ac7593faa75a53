"""The servers every test shares: an MLflow server (on SQLite), moto's S3 and the GCS emulator.

Under pytest-xdist (``make test``) the controller starts the three once, side by side, before
the test processes start, and hands their addresses down in environment variables
(:func:`start_for_test_processes`, called from ``tests/conftest.py``): one of each for the
whole run instead of one per test process (each MLflow server costs ~10 s of CPU to start).
A test process that finds no address (``pytest -n 0``, a single module run by hand) starts
its own at first use and stops it at exit (:func:`address`).

Tests never see each other's data on them: each test has its own plugin name, bucket or prefix.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import threading
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


def _variable(name: str) -> str:
    return f"TRACKER_CORE_TEST_{name.upper()}_URL"


def _start(name: str, stack: contextlib.ExitStack) -> str:
    workdir = Path(tempfile.mkdtemp(prefix=f"tracker-core-{name}-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    return stack.enter_context(_FACTORIES[name](workdir))


def address(name: str) -> str:
    """The address of the shared server ``name`` (``"mlflow"``, ``"moto"`` or ``"gcs"``):
    the one the controller started, else this process's own, started at the first call."""
    handed_down = os.environ.get(_variable(name))
    if handed_down:
        return handed_down
    with _lock:
        if name not in _started:
            _started[name] = _start(name, _stack)
        return _started[name]


def start_for_test_processes(stack: contextlib.ExitStack) -> None:
    """Start every shared server at once (the controller of a pytest-xdist run, before it
    starts the test processes, which inherit the addresses); ``stack`` stops them, at once
    too (a server may take its stop grace to end)."""
    own = {name: contextlib.ExitStack() for name in _FACTORIES}
    stack.callback(_close_all, list(own.values()))
    with ThreadPoolExecutor(len(own)) as pool:
        futures = {name: pool.submit(_start, name, own[name]) for name in own}
    for name, future in futures.items():
        os.environ[_variable(name)] = future.result()


def _close_all(stacks: list[contextlib.ExitStack]) -> None:
    with ThreadPoolExecutor(len(stacks)) as pool:
        for done in [pool.submit(s.close) for s in stacks]:
            done.result()
