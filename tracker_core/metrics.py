"""A run's metric values on their way to the tracking store: queued by the caller, sent by a
background thread.

``save_metric`` only queues: the caller pays for a step counter and an append, never for a
request. A sender thread (one per manager, started on first use) sends the queue in batches of
at most 1,000 values (MLflow's limit per request) through the one retry policy, as soon as a
batch is full, and at least every :data:`FLUSH_EVERY_SECONDS` so the MLflow UI shows a long
run's progress. While the caller is queueing values in a burst, a due batch waits for its
next pause (checked every :data:`YIELD_SECONDS`), up to half the queue's bound: a send is
Python work that would otherwise take the GIL from the training loop (on SQLite, all of it).
Guarantees:

- **Nothing lost, nothing doubled.** Values leave the queue only once the store accepted them;
  a batch that fails stays at the head of the queue. Each value keeps the timestamp it was
  created with, so a batch sent twice (a retry after a lost response) is the same points,
  which the store records once.
- **Order.** One send at a time, oldest values first; steps count per series in the order the
  caller queued them.
- **Durable at the points that matter.** :meth:`MetricsQueue.flush` sends everything queued,
  in the caller's thread, and raises (values kept) if it cannot: the manager calls it in
  ``finish_run``, ``save_model``, ``get_quality``, ``flush_metrics``, ``close`` and at
  interpreter exit. A background send that fails is logged and retried later; it surfaces as
  a typed error at the next of those calls if the store still refuses.
- **Bounded memory.** At most ``max_pending`` values wait; a caller that gets ahead of the
  store waits for room (back-pressure). If the store is failing and the queue is full,
  ``save_metric`` raises that failure instead of blocking forever.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence

from tracker_core.accumulators import MetricsAccumulator
from tracker_core.values import MetricValue

__all__ = [
    "FLUSH_EVERY_SECONDS",
    "FLUSH_EVERY_VALUES",
    "MAX_PENDING_VALUES",
    "YIELD_SECONDS",
    "MetricsQueue",
]

log = logging.getLogger(__name__)

#: MLflow takes at most 1000 metrics per log_batch
FLUSH_EVERY_VALUES = 1000
#: so the MLflow UI shows a long run's progress
FLUSH_EVERY_SECONDS = 10.0
#: values waiting at most (about 100 bytes each): beyond, the caller waits for the sender
MAX_PENDING_VALUES = 20_000
#: how long the sender looks for a pause in the caller's queueing before it sends a due batch
YIELD_SECONDS = 0.005

#: ``send(run_id, values)``: log one batch, under the retry policy; raises if it cannot
Send = Callable[[str, Sequence[MetricValue]], None]


class MetricsQueue:
    """Pending metric values of the current run and the thread that sends them.

    ``add`` is called by the manager under its lock (one caller at a time); the sender thread
    and ``flush`` share the queue under the queue's own lock, so the caller never waits for a
    request in flight unless it asks to (``flush``) or the queue is full.
    """

    def __init__(
        self,
        send: Send,
        accumulators: Iterable[MetricsAccumulator] = (),
        *,
        batch_size: int = FLUSH_EVERY_VALUES,
        max_age_seconds: float = FLUSH_EVERY_SECONDS,
        max_pending: int = MAX_PENDING_VALUES,
        yield_seconds: float = YIELD_SECONDS,
    ) -> None:
        self.accumulators = list(accumulators)
        self._send = send
        self.batch_size = batch_size
        self.max_age_seconds = max_age_seconds
        self.max_pending = max(max_pending, batch_size)
        self.yield_seconds = yield_seconds
        self._seen = 0  # values queued when the sender last looked (to see the caller busy)
        self._steps: dict[str, int] = {}
        self._pending: collections.deque[MetricValue] = collections.deque()
        self._oldest = 0.0  # monotonic time the oldest pending value was queued
        self._run_id: str | None = None
        self._failure: BaseException | None = None
        self._retry_at = 0.0
        self._closed = False
        self._woken = False  # the sender was told a batch is due and has not run since
        self._lock = threading.Lock()  # ``add`` takes it directly (Condition's is Python code)
        self._cond = threading.Condition(self._lock)
        self._sending = threading.Lock()  # one send at a time, oldest values first
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ the caller's side
    def start(self, run_id: str) -> None:
        """Queue values for ``run_id`` from now on (the queue must be empty)."""
        with self._cond:
            if self._pending:
                raise RuntimeError("metrics of the previous run are still queued")
            self._run_id = run_id
            self._failure = None
        self._steps.clear()
        for accumulator in self.accumulators:
            accumulator.clear()

    def reset(self) -> None:
        """Forget the run: queued values are dropped (flush first to keep them)."""
        with self._sending, self._cond:
            self._pending.clear()
            self._run_id = None
            self._failure = None
            self._cond.notify_all()
        self._steps.clear()
        for accumulator in self.accumulators:
            accumulator.clear()

    def add(self, value: MetricValue) -> list[MetricValue]:
        """Queue ``value`` and what the accumulators derive from it, each series with its own
        step counter unless the value names its step. Returns what was queued."""
        if self.accumulators:
            pairs: list[tuple[str, float]] = []
            for accumulator in self.accumulators:
                pairs.extend(accumulator.accumulate(value))
            if not any(name == value.name for name, _ in pairs):
                pairs.insert(0, (value.name, value.value))
            # a derived series can overflow (a sum of huge values): MLflow takes finite values only
            items = [
                self._stepped(name, number, value)
                for name, number in pairs
                if math.isfinite(number)
            ]
        else:  # the common case, inlined: this is most of what the caller pays per value
            step = value.step
            if step is None:
                step = self._steps.get(value.name, -1) + 1
                value = MetricValue._derived(value.name, value.value, step, value.timestamp_ms)
            self._steps[value.name] = step
            items = [value]
        pending = self._pending
        with self._lock:
            while len(pending) + len(items) > self.max_pending:
                if self._failure is not None:
                    raise self._failure  # the store keeps failing: do not block forever
                self._cond.notify_all()
                self._cond.wait(1.0)
            if not pending:
                self._oldest = time.monotonic()
            pending.extend(items)
            if len(pending) >= self.batch_size and not self._woken:
                self._woken = True
                self._cond.notify_all()
        if self._thread is None:
            self._start_thread()
        return items

    def _stepped(self, name: str, number: float, source: MetricValue) -> MetricValue:
        step = source.step if source.step is not None else self._steps.get(name, -1) + 1
        self._steps[name] = step
        if name == source.name and step == source.step:
            return source
        return MetricValue._derived(name, number, step, source.timestamp_ms)

    def flush(self) -> None:
        """Send every queued value now, in this thread. Raises (values kept) if the store
        refuses after retries."""
        while self._send_head():
            pass

    # ------------------------------------------------------------------ the sender's side
    def _send_head(self) -> list[MetricValue]:
        """Send the oldest batch; remove it from the queue once the store took it."""
        with self._sending:
            with self._cond:
                if not self._pending or self._run_id is None:
                    return []
                batch = [self._pending[i] for i in range(min(self.batch_size, len(self._pending)))]
                run_id = self._run_id
            self._send(run_id, batch)
            with self._cond:
                for _ in batch:
                    self._pending.popleft()
                self._oldest = time.monotonic()
                self._failure = None
                self._cond.notify_all()  # room for a caller waiting on a full queue
            return batch

    def _due(self, now: float) -> float | None:
        """Seconds until the next background send (0: now; None: nothing queued)."""
        if not self._pending or self._run_id is None:
            return None
        if self._failure is not None:
            return max(self._retry_at - now, 0.0)
        if len(self._pending) >= self.batch_size:
            return 0.0
        return max(self._oldest + self.max_age_seconds - now, 0.0)

    def _caller_busy(self, now: float) -> bool:
        """A batch is due: is the caller still queueing (more values than at the sender's
        last look)? Then the batch waits for a pause, unless the queue is half full or its
        values have waited ``max_age_seconds``."""
        queued = len(self._pending)
        busy = queued > self._seen
        self._seen = queued
        return busy and queued < self.max_pending // 2 and now - self._oldest < self.max_age_seconds

    def _start_thread(self) -> None:
        ref = weakref.ref(self)
        self._thread = threading.Thread(
            target=_sender_loop, args=(ref,), name="tracker-core-metrics", daemon=True
        )
        self._thread.start()

    def _step(self) -> bool:
        """One round of the sender: send a batch if one is due, else wait a while (the thread
        returns to its loop between rounds, so a forgotten queue can be collected). False:
        stop."""
        with self._cond:
            self._woken = False
            if self._closed:
                return False
            now = time.monotonic()
            wait = self._due(now)
            if wait != 0.0:
                self._seen = 0
                self._cond.wait(wait if wait is not None else self.max_age_seconds)
                return True
            busy = self._failure is None and self._caller_busy(now)
        if busy:
            time.sleep(self.yield_seconds)  # outside the lock: the caller goes on queueing
            return True
        try:
            self._send_head()
        except Exception as exc:  # kept queued; surfaces at the next flush if it persists
            log.warning(
                "could not send %d queued metric value(s) (%s: %s); retrying in %.0fs",
                len(self._pending),
                type(exc).__name__,
                exc,
                self.max_age_seconds,
            )
            with self._cond:
                self._failure = exc
                self._retry_at = time.monotonic() + self.max_age_seconds
        return True

    def close(self) -> None:
        """Stop the sender thread (queued values stay queued: flush first)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)


def _sender_loop(ref: weakref.ref[MetricsQueue]) -> None:
    """The sender thread: holds its queue weakly, so a forgotten manager's thread ends."""
    while True:
        queue = ref()
        if queue is None or not queue._step():
            return
        del queue
