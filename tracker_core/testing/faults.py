"""Fault injection for tests: wrap a *real* store and make chosen calls fail.

DESIGN.md allows exactly this in fault-injection tests: the store underneath is real, the
wrapper only decides when a call raises (before or after the real call ran).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

__all__ = ["FaultyProxy"]


class FaultyProxy:
    """Delegates every attribute to ``target``; methods named in :meth:`fail` raise.

    ``fail("log_batch", times=2, error=TransientError("lost"), after_call=True)`` makes the next
    two ``log_batch`` calls run for real and *then* raise, as when a response is lost after
    the server applied the request. ``calls`` counts every call by method name.
    """

    def __init__(self, target: Any) -> None:
        self._target = target
        self._faults: dict[str, list[tuple[BaseException, bool]]] = {}
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()

    def fail(
        self, method: str, *, error: BaseException, times: int = 1, after_call: bool = False
    ) -> None:
        with self._lock:
            self._faults.setdefault(method, []).extend([(error, after_call)] * times)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr) or name.startswith("__"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
                pending = self._faults.get(name)
                fault = pending.pop(0) if pending else None
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
