"""The two stores of a manager and the one retry policy around every call to them.

Every part of a manager (iterations, runs, models) calls the stores through one :class:`Remote`,
so swapping a store (tests wrap one to inject faults) reaches every part at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from tracker_core.retry import Retrier, RetryConfig, RetryParams
from tracker_core.stores import ArtifactStore, TrackingStore

__all__ = ["Remote"]

T = TypeVar("T")


class Remote:
    """``track(operation, fn, *args)`` / ``art(...)``: a store call under the retry policy of
    ``operation`` (see :class:`~tracker_core.retry.RetryConfig`). Thread-safe."""

    def __init__(self, tracking: TrackingStore, artifacts: ArtifactStore, retrier: Retrier) -> None:
        self.tracking = tracking
        self.artifacts = artifacts
        self._t = retrier.with_classifiers(tracking.classify_error)
        self._a = retrier.with_classifiers(artifacts.classify_error)

    def single_attempt(self) -> None:
        """From now on, every call is tried once (interpreter exit: nothing is worth a wait)."""
        once = RetryConfig(RetryParams(max_attempts=1, wait_time_seconds=0))
        self._t = Retrier(once, self._t.classifiers[:-1])
        self._a = Retrier(once, self._a.classifiers[:-1])

    def track(self, operation: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._t.call(operation, fn, *args, **kwargs)

    def art(self, operation: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._a.call(operation, fn, *args, **kwargs)
