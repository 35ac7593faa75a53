"""The stepped clock the lease tests run on: sleeping moves it on at once, a step lets the
threads it made due do their work first, and a heartbeat on it renews as it is stepped."""

from __future__ import annotations

import threading

import pytest

from tracker_core.lease import Heartbeat
from tracker_core.testing.clock import SteppedClock


def test_sleep_moves_time_on_at_once() -> None:
    clock = SteppedClock()
    before_ms, before = clock.now_ms(), clock.monotonic()
    clock.sleep(3600.0)
    assert clock.offset == 3600.0
    assert clock.now_ms() - before_ms >= 3_600_000 and clock.monotonic() - before >= 3600.0
    with pytest.raises(ValueError, match="moves on"):
        clock.advance(-1.0)


def test_wait_returns_when_the_event_is_set_or_time_passed() -> None:
    clock = SteppedClock()
    done = threading.Event()
    done.set()
    assert clock.wait(done, 3600.0) is True
    assert clock.wait(threading.Event(), 0.0) is False


def test_a_step_lets_the_threads_it_made_due_work_first() -> None:
    clock = SteppedClock()
    stop, seen = threading.Event(), []

    def beat() -> None:
        while not clock.wait(stop, 10.0):
            seen.append(clock.offset)

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        clock.advance(35.0, step=5.0)  # due at 10, 20 and 30: done before advance returns
        assert seen == [10.0, 20.0, 30.0]
    finally:
        stop.set()
        thread.join()


def test_a_heartbeat_renews_as_the_clock_is_stepped() -> None:
    clock = SteppedClock()
    renewals: list[int] = []

    def renew(expires_ms: int) -> bool:
        renewals.append(expires_ms)
        return True

    heartbeat = Heartbeat(renew, 60.0, clock.now_ms() + 60_000, clock=clock)
    try:
        clock.advance(200.0, step=10.0)  # three lifetimes: a beat every 20 s keeps it
        assert len(renewals) == 10 and not heartbeat.lost
    finally:
        heartbeat.stop()
    heartbeat = Heartbeat(lambda _: True, 60.0, clock.now_ms() + 60_000, clock=clock)
    heartbeat.stop()
    clock.advance(61.0)
    assert heartbeat.lost  # stopped: nothing renewed it
