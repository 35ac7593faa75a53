"""A clock tests step instead of sleeping: :class:`SteppedClock`.

It reads the machine's time plus an offset that only grows, so the times stores write
themselves (a run's start time) stay in order with it. ``sleep`` returns at once and moves
time on; :meth:`SteppedClock.advance` moves it on from the test. Either returns once every
other thread waiting on the clock that came due (a lease's heartbeat) has done its work and
waits again, so what those threads do at a given time is done before the test goes on.
Give one clock to every manager of a test (``connect(..., clock=clock)``): they then agree on
the time, as workers on NTP-synchronised hosts do.
"""

from __future__ import annotations

import threading
import time

__all__ = ["SteppedClock"]

#: how long a step lets a woken thread take to wait again (a liveness bound for a
#: heartbeat's store write, not a timing claim)
SETTLE_SECONDS = 120.0
_LOOK_AGAIN = 0.02  # Event.set() notifies no condition: waiters look again this often


class SteppedClock:
    """Real time plus an offset that sleeping and :meth:`advance` add to (a
    :class:`~tracker_core.clock.Clock`)."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._changed = threading.Condition()
        self._waiting: dict[threading.Thread, float] = {}  # thread -> its deadline
        self._busy: set[threading.Thread] = set()  # came due, not waiting again yet

    @property
    def offset(self) -> float:
        """Seconds this clock is ahead of the machine's."""
        return self._offset

    def now_ms(self) -> int:
        return int((time.time() + self._offset) * 1000)

    def monotonic(self) -> float:
        return time.monotonic() + self._offset

    def sleep(self, seconds: float) -> None:
        """Move time on by ``seconds`` at once: the caller's wait is over."""
        self._step(seconds)

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Block until ``event`` is set (True) or this clock passed ``seconds`` from now."""
        me = threading.current_thread()
        with self._changed:
            self._busy.discard(me)
            deadline = self._waiting[me] = self.monotonic() + seconds
            self._changed.notify_all()
            try:
                while not event.is_set():
                    left = deadline - self.monotonic()
                    if left <= 0:
                        self._busy.add(me)  # due: it works until it waits again or ends
                        return False
                    self._changed.wait(min(left, _LOOK_AGAIN))
                return True
            finally:
                del self._waiting[me]
                self._changed.notify_all()

    def advance(self, seconds: float, *, step: float | None = None) -> None:
        """Move time on by ``seconds``, in increments of at most ``step`` (each one settled:
        the threads it made due did their work) when given."""
        if seconds < 0:
            raise ValueError(f"time only moves on (got {seconds} s)")
        left = seconds
        while left > 0:
            moved = min(left, step) if step else left
            self._step(moved)
            left -= moved

    def _step(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"time only moves on (got {seconds} s)")
        me = threading.current_thread()
        with self._changed:
            self._offset += seconds
            now = self.monotonic()
            self._changed.notify_all()
            give_up = time.monotonic() + SETTLE_SECONDS
            while pending := self._pending(now, me):
                if time.monotonic() >= give_up:
                    names = sorted(t.name for t in pending)
                    raise RuntimeError(
                        f"threads still busy {SETTLE_SECONDS:.0f}s after a step: {names}"
                    )
                self._changed.wait(_LOOK_AGAIN)

    def _pending(self, now: float, me: threading.Thread) -> list[threading.Thread]:
        """Threads other than ``me`` that came due by ``now`` and have not waited again."""
        self._busy = {t for t in self._busy if t.is_alive()}
        due = [t for t, deadline in self._waiting.items() if deadline <= now]
        return [t for t in {*self._busy, *due} if t is not me and t.is_alive()]

    def __repr__(self) -> str:
        return f"SteppedClock(offset={self._offset:.3f}s)"
