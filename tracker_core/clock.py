"""Time as a parameter: leases, heartbeats and waits read the time and sleep through a
:class:`Clock`, so tests step time instead of sleeping (``tracker_core.testing.clock``).

``now_ms`` is the wall clock: lease expiries are written by one host and read by another,
so hosts' clocks must agree to well within a lease's time to live (NTP does). ``monotonic``
measures durations within one process.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]


class Clock(Protocol):
    """What tracker-core asks of time."""

    def now_ms(self) -> int:
        """Wall-clock milliseconds since the epoch."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (durations in this process)."""

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Wait until ``event`` is set (True) or ``seconds`` passed (False)."""


class SystemClock:
    """The real time of this machine."""

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.wait(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK: Clock = SystemClock()
