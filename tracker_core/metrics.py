"""A run's metric values on their way to the tracking store: accumulators, steps, batches.

Values wait here until a batch is due (enough of them, or enough time since the last send),
so logging costs one request per batch, not one per value. Each value keeps the timestamp it
was created with: a batch sent twice (a retry after a lost response) is the same points,
which the store records once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from tracker_core.accumulators import MetricsAccumulator
from tracker_core.values import MetricValue

__all__ = ["FLUSH_EVERY_SECONDS", "FLUSH_EVERY_VALUES", "MetricsBuffer"]

#: MLflow takes at most 1000 metrics per log_batch
FLUSH_EVERY_VALUES = 1000
#: so the MLflow UI shows a long run's progress
FLUSH_EVERY_SECONDS = 10.0


class MetricsBuffer:
    """Pending metric values of the current run. Not thread-safe: the manager's lock guards it."""

    def __init__(
        self,
        accumulators: Iterable[MetricsAccumulator] = (),
        *,
        max_values: int = FLUSH_EVERY_VALUES,
        max_age_seconds: float = FLUSH_EVERY_SECONDS,
    ) -> None:
        self.accumulators = list(accumulators)
        self.max_values = max_values
        self.max_age_seconds = max_age_seconds
        self._pending: list[MetricValue] = []
        self._steps: dict[str, int] = {}
        self._last_sent = time.monotonic()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, value: MetricValue) -> bool:
        """Feed ``value`` to every accumulator and queue what they yield (the value itself
        when no accumulator takes its name), each series with its own step counter unless
        the value names its step. Returns True when a batch is due."""
        pairs: list[tuple[str, float]] = []
        for accumulator in self.accumulators:
            pairs.extend(accumulator.accumulate(value))
        if not any(name == value.name for name, _ in pairs):
            pairs.insert(0, (value.name, value.value))
        for name, number in pairs:
            step = value.step if value.step is not None else self._steps.get(name, -1) + 1
            self._steps[name] = step
            self._pending.append(
                MetricValue(name, number, step=step, timestamp_ms=value.timestamp_ms)
            )
        return (
            len(self._pending) >= self.max_values
            or time.monotonic() - self._last_sent >= self.max_age_seconds
        )

    def pending(self) -> list[MetricValue]:
        """A copy of the queued values, oldest first."""
        self._last_sent = time.monotonic()
        return list(self._pending)

    def sent(self, count: int) -> None:
        """The first ``count`` queued values reached the store."""
        del self._pending[:count]

    def reset(self) -> None:
        """A new run: forget queued values, steps and every accumulator's state."""
        self._pending.clear()
        self._steps.clear()
        for accumulator in self.accumulators:
            accumulator.clear()
