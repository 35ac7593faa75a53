"""The metrics queue's sender and a caller queueing fast (tracker_core/metrics.py).

The store-facing guarantees (nothing lost or doubled, flushes, back-pressure, failures) are
in the behaviour suite (``suite_metrics.py``, every backend). These tests pin *when* the
sender sends, with a plain recording ``send``: a due batch waits for the caller's pause, and a
caller that never pauses is still sent for, before the queue is full.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from tracker_core.metrics import MetricsQueue
from tracker_core.values import MetricValue

#: a liveness bound for a background send, not a timing claim
DEADLINE = 60.0


class Recorder:
    """``send``: records each batch and how many values were queued when it went out."""

    def __init__(self) -> None:
        self.queue: MetricsQueue | None = None
        self.batches: list[list[float]] = []
        self.queued_at_send: list[int] = []
        self.sent = threading.Condition()

    def __call__(self, run_id: str, batch: Sequence[MetricValue]) -> None:
        assert run_id == "run"
        assert self.queue is not None
        with self.sent:
            self.queued_at_send.append(len(self.queue))
            self.batches.append([value.value for value in batch])
            self.sent.notify_all()

    def wait_for(self, batches: int) -> None:
        with self.sent:
            assert self.sent.wait_for(lambda: len(self.batches) >= batches, DEADLINE)


def _queue(**options: float) -> tuple[MetricsQueue, Recorder]:
    recorder = Recorder()
    queue = MetricsQueue(recorder, **options)  # type: ignore[arg-type]
    recorder.queue = queue
    queue.start("run")
    return queue, recorder


def _queue_steadily(queue: MetricsQueue, until: Callable[[], bool]) -> tuple[int, int]:
    """Queue a value a millisecond, never pausing, until ``until()`` (or the deadline).
    Returns the values queued and the most that were waiting at once."""
    queued = most = 0
    deadline = time.monotonic() + DEADLINE
    while not until() and time.monotonic() < deadline:
        queue.add(MetricValue("loss", float(queued)))
        most = max(most, len(queue))
        queued += 1
        time.sleep(0.001)
    return queued, most


def test_a_burst_is_sent_in_the_callers_pause() -> None:
    """5,000 values queued at once (longer than the interpreter's switch interval), batches of
    100: no batch goes out until the burst ended."""
    queue, recorder = _queue(batch_size=100, yield_seconds=0.5)
    try:
        for i in range(5000):
            queue.add(MetricValue("loss", float(i)))
        recorder.wait_for(50)
        assert recorder.queued_at_send[0] == 5000
        assert [v for batch in recorder.batches for v in batch] == [float(i) for i in range(5000)]
        assert len(queue) == 0
    finally:
        queue.close()


def test_a_caller_that_never_pauses_is_sent_for_before_the_queue_is_full() -> None:
    """One value a millisecond, never a pause of ``yield_seconds``: batches still go out
    while the caller queues (past half the bound), and the caller never waits for room."""
    queue, recorder = _queue(batch_size=10, max_pending=4000, yield_seconds=0.02)
    try:
        queued, most = _queue_steadily(queue, lambda: len(recorder.batches) >= 3)
        assert len(recorder.batches) >= 3, "the sender starved behind a busy caller"
        assert most < queue.max_pending, "the caller waited for room"
        queue.flush()
        assert [v for batch in recorder.batches for v in batch] == [float(k) for k in range(queued)]
    finally:
        queue.close()


def test_values_waiting_max_age_are_sent_though_the_caller_is_busy() -> None:
    """The UI's freshness bound holds for a caller that never pauses, far below the bound."""
    queue, recorder = _queue(
        batch_size=10, max_pending=10**6, yield_seconds=0.02, max_age_seconds=0.2
    )
    try:
        _queue_steadily(queue, lambda: bool(recorder.batches))
        assert recorder.batches, "no batch was sent while the caller kept queueing"
        assert recorder.queued_at_send[0] < queue.max_pending // 2
    finally:
        queue.close()
