"""Metric accumulators: derived series (mean, sliding mean, min, max) computed as values arrive.

Each accumulator does constant work per value: running sums, a bounded window with its own
running sum, running extremes.
"""

from __future__ import annotations

import math
from collections import deque

from tracker_core.errors import ConfigurationError
from tracker_core.values import MetricValue, validate_metric_name

__all__ = ["MetricsAccumulator"]


class MetricsAccumulator:
    """Accumulates the values of one metric and yields the series to log for each new value.

    For a value of metric ``name`` it yields ``(name, value)`` (the last value) and, as asked,
    ``mean_<name>``, ``sliding_<name>`` (mean of the last ``window_size`` values),
    ``min_<name>`` and ``max_<name>``. Values of other metrics yield nothing.

    Not thread-safe: one accumulator belongs to one manager.
    """

    def __init__(
        self,
        name: str,
        calc_mean: bool = False,
        calc_sliding: bool = False,
        calc_min: bool = False,
        calc_max: bool = False,
        window_size: int = 10,
    ) -> None:
        self.name = validate_metric_name(name, "accumulator name")
        if window_size < 1:
            raise ConfigurationError(f"window_size must be >= 1, got {window_size}")
        self.calc_mean = calc_mean
        self.calc_sliding = calc_sliding
        self.calc_min = calc_min
        self.calc_max = calc_max
        self.window_size = window_size
        self._window: deque[float] = deque(maxlen=window_size)
        self.clear()

    def clear(self) -> None:
        """Forget every value (called when a run finishes)."""
        self._count = 0
        self._sum = 0.0
        self._window.clear()
        self._window_sum = 0.0
        self._min = math.inf
        self._max = -math.inf

    def accumulate(self, value: MetricValue) -> list[tuple[str, float]]:
        """Take one value; return ``(metric name, value)`` pairs to log for it."""
        if value.name != self.name:
            return []
        v = value.value
        self._count += 1
        self._sum += v
        if len(self._window) == self.window_size:
            self._window_sum -= self._window[0]
        self._window.append(v)
        self._window_sum += v
        self._min = min(self._min, v)
        self._max = max(self._max, v)

        out = [(self.name, v)]
        if self.calc_mean:
            out.append((f"mean_{self.name}", self._sum / self._count))
        if self.calc_sliding:
            out.append((f"sliding_{self.name}", self._window_sum / len(self._window)))
        if self.calc_min:
            out.append((f"min_{self.name}", self._min))
        if self.calc_max:
            out.append((f"max_{self.name}", self._max))
        return out

    def __repr__(self) -> str:
        flags = [
            f for f in ("calc_mean", "calc_sliding", "calc_min", "calc_max") if getattr(self, f)
        ]
        return (
            f"MetricsAccumulator({self.name!r}, {', '.join(flags)}, window_size={self.window_size})"
        )
