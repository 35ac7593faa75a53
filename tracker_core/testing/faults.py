"""Fault injection for tests: wrap a *real* store and make chosen calls fail.

DESIGN.md allows exactly this in fault-injection tests: the store underneath is real, the
wrapper only decides when a call raises (before or after the real call ran).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

__all__ = ["FaultyProxy", "Killed"]


class Killed(BaseException):
    """Stands for the process dying at that point (a kill, an OOM): a ``BaseException``, so no
    retry policy or ``except Exception`` catches it and nothing after it runs."""


class FaultyProxy:
    """Delegates every attribute to ``target``; methods named in :meth:`fail` raise.

    ``fail("log_batch", times=2, error=TransientError("lost"), after_call=True)`` makes the next
    two ``log_batch`` calls run for real and *then* raise, as when a response is lost after
    the server applied the request; ``heal("log_batch")`` drops the faults still pending.
    ``hold("log_batch")`` makes calls wait (a store that does not answer) until the returned
    event is set. ``calls`` counts every call by method name, ``threads`` records the names
    of the threads that made them.
    """

    #: how long a held call waits at most before failing the test
    HOLD_TIMEOUT = 120.0

    def __init__(self, target: Any) -> None:
        self._target = target
        self._faults: dict[str, list[tuple[BaseException, bool]]] = {}
        self._holds: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.threads: dict[str, set[str]] = {}

    def fail(
        self, method: str, *, error: BaseException, times: int = 1, after_call: bool = False
    ) -> None:
        with self._lock:
            self._faults.setdefault(method, []).extend([(error, after_call)] * times)

    def heal(self, method: str) -> None:
        with self._lock:
            self._faults.pop(method, None)

    def hold(self, method: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._holds[method] = event
        return event

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr) or name.startswith("__"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
                self.threads.setdefault(name, set()).add(threading.current_thread().name)
                pending = self._faults.get(name)
                fault = pending.pop(0) if pending else None
                held = self._holds.get(name)
            if held is not None and not held.wait(self.HOLD_TIMEOUT):
                raise AssertionError(
                    f"{name} was held for {self.HOLD_TIMEOUT}s: nobody released it"
                )
            if fault is not None and not fault[1]:
                raise fault[0]
            result = attr(*args, **kwargs)
            if fault is not None:
                raise fault[0]
            return result

        return call

    @property
    def wrapped(self) -> Any:
        return self._target
