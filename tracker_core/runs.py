"""The current run of a manager: find or create it, hold its lease, queue its metrics, end it.

A run is found by name (the params' id) in its iteration, created if missing. Before training
it, a worker claims its lease (:mod:`tracker_core.lease`): one worker trains a run at a time,
and a worker that died lets the run go when its lease expires. How a run ends:

- :meth:`RunTracker.finish` (``finish_run``): its metrics reach the store first, then its
  status is set. FINISHED needs a value of the main metric, and no failed ``save_model``
  since the last one that succeeded; FAILED needs neither. If the metrics cannot be sent,
  the run is *not* ended (it would otherwise end FINISHED without them).
- :meth:`RunTracker.end_implicitly` (a new run or iteration, ``close``): FINISHED when it
  could be, else the run is left unfinished with its lease released, so the same params
  resume it later.

Both return an :class:`EndedRun` telling whether this worker's run holds a model, so that
the manager settles it (:mod:`tracker_core.models`: a FAILED run's model is deleted, a
FINISHED one's iteration is pruned).
- :meth:`RunTracker.release` (an interrupt, ``abandon_iteration``): left unfinished, lease
  released. A crash leaves it unfinished too, and its lease expires.

Not thread-safe: the manager's lock guards it. The lease heartbeat runs in its own thread and
touches only the tracking store.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import attrs

from tracker_core import leases
from tracker_core import tags as T
from tracker_core.accumulators import MetricsAccumulator
from tracker_core.clock import SYSTEM_CLOCK, Clock
from tracker_core.errors import (
    InvalidMetricError,
    LeaseLostError,
    ModelNotSavedError,
    NoActiveRunError,
    RunNotFoundError,
    TrackerError,
    TrackingStoreError,
)
from tracker_core.lease import Lease, Leases
from tracker_core.metrics import MetricsQueue
from tracker_core.params import FineTuningParams
from tracker_core.stores import RunQuery, TrackingStore
from tracker_core.values import MetricValue, RunRecord, RunStatus

__all__ = ["EndedRun", "RunTracker", "looked_up_again"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: how many times a run is looked up when the one found is deleted as it is taken
LOOKUPS = 5


def looked_up_again(take: Callable[[], _T], what: str, clock: Clock = SYSTEM_CLOCK) -> _T:
    """``take()`` (find a run and take it), again when the run it found was deleted meanwhile
    (:class:`RunNotFoundError`): a twin that its creator, or a worker that claimed it,
    deleted (:meth:`RunTracker.get_or_create`). Each new look waits a short random time, so
    that two claimants that yielded to each other do not meet again."""
    for attempt in range(1, LOOKUPS + 1):
        try:
            return take()
        except RunNotFoundError:
            if attempt == LOOKUPS:
                raise
            log.info("the run of %s was deleted as it was taken; looking again", what)
            clock.sleep(random.uniform(0.0, 0.1 * attempt))
    raise AssertionError("unreachable")


@attrs.frozen
class EndedRun:
    """A run this worker ended: its record, how it ended, and whether it holds a model that
    was ranked (saved with ``best_only``, or found marked when the run was taken)."""

    run: RunRecord
    status: RunStatus
    holds_model: bool
    ranked: bool


def _precedence(run: RunRecord) -> tuple[bool, int, str]:
    """Of runs of one name, the one that counts sorts first (see :meth:`RunTracker.first`)."""
    return (not leases.is_taken(run), run.start_time_ms, run.run_id)


class RunTracker:
    """The run a manager is working on, and run lookups by name and id."""

    def __init__(
        self,
        tracking: TrackingStore,
        leases: Leases,
        main_metric: str,
        accumulators: Iterable[MetricsAccumulator] = (),
    ) -> None:
        self._tracking = tracking
        self.leases = leases
        self.main_metric = main_metric
        self.metrics = MetricsQueue(self._send_metrics, accumulators)
        self.run: RunRecord | None = None
        self.params: FineTuningParams | None = None
        self._lease: Lease | None = None
        self._has_main = False
        self._resumed = False
        self._model: tuple[bool, bool] = (False, False)  # (holds a model, ranked)
        self._save_failed: str | None = None

    @property
    def lease_seconds(self) -> float:
        return self.leases.lease_seconds

    @property
    def ttl_ms(self) -> int:
        return self.leases.ttl_ms

    # ------------------------------------------------------------------ lookups
    def get(self, run_id: str) -> RunRecord | None:
        """The run with that id, or None."""
        return self._tracking.get_run(run_id)

    def get_existing(self, run_id: str) -> RunRecord:
        run = self.get(run_id)
        if run is None:
            raise RunNotFoundError(f"run {run_id} does not exist")
        return run

    def first(self, experiment_id: str, **query: Any) -> RunRecord | None:
        """The run of the experiment matching ``query`` (a :class:`RunQuery`'s fields) that
        counts: the oldest one a worker took (:func:`~tracker_core.leases.is_taken`), else
        the oldest. Creation times are the creating clients' clocks, and a create request
        can land after a younger twin was taken: "oldest" alone is not stable."""
        runs = self._tracking.search_runs(RunQuery((experiment_id,), **query))
        return min(runs, key=_precedence) if runs else None

    def get_or_create(
        self,
        experiment_id: str,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, str] | None = None,
    ) -> tuple[RunRecord, bool]:
        """The run named ``run_name``, created if missing; True if this call created it. Two
        workers racing to create it agree on the one :meth:`first` names; the other is
        deleted (by its creator here, or after its claim: :meth:`Leases.claim`).

        A run found without its ``params`` gets them: its creator died between creating it
        and logging them, or it is the twin an earlier attempt of this call created (the
        answer to ``create_run`` was lost, so the retry created a second run)."""
        existing = self.first(experiment_id, run_name=run_name)
        if existing is not None:
            self.leases.drop_abandoned_twins(existing)
            return self._with_params(existing, params), False
        created = self._tracking.create_run(experiment_id, run_name, tags)
        winner = self.first(experiment_id, run_name=run_name) or created
        if winner.run_id != created.run_id:
            log.info("run %r was created concurrently; using %s", run_name, winner.run_id)
            self._tracking.delete_run(created.run_id)
            return self._with_params(winner, params), False
        first_metric = [MetricValue(T.METRIC_MODEL_UPLOADED, 0.0, step=0)]
        self._log_params(created, params or {}, first_metric)
        return created, True

    def _with_params(self, run: RunRecord, params: Mapping[str, str] | None) -> RunRecord:
        """``run``, with the ``params`` it lacks logged (the same values are accepted twice)."""
        missing = {k: v for k, v in (params or {}).items() if k not in run.params}
        if not missing:
            return run
        log.info("run %s has no params yet; logging them", run.run_id)
        self._log_params(run, missing)
        return self.get_existing(run.run_id)

    def _log_params(
        self, run: RunRecord, params: Mapping[str, str], metrics: list[MetricValue] | None = None
    ) -> None:
        """Log a run's params. Another worker may log the same ones at the same moment (it
        resumes the run its creator left without them); MLflow on PostgreSQL then refuses the
        slower insert (``UniqueViolation`` on ``param_pk``): the params being there with these
        values is what counts."""
        try:
            self._tracking.log_batch(run.run_id, metrics or (), params)
        except TrackingStoreError:
            fresh = self.get_existing(run.run_id)
            if not params or any(fresh.params.get(k) != v for k, v in params.items()):
                raise
            log.info("params of run %s were logged by another worker meanwhile", run.run_id)

    # ------------------------------------------------------------------ taking a run
    def start(
        self,
        run: RunRecord,
        params: FineTuningParams | None,
        *,
        created: bool = False,
        wait: float = 0.0,
        hold_terminal: bool = False,
    ) -> bool:
        """Make ``run`` the current run. Returns True if it had already ended (FINISHED,
        FAILED or KILLED): there is nothing to train. Otherwise its lease is claimed first
        (:meth:`Leases.claim`: a live holder is waited for up to ``wait`` seconds, then
        :class:`~tracker_core.errors.RunInUseError`). ``hold_terminal`` claims the lease of
        an ended run too (to rewrite its model)."""
        if self.run is not None:
            raise TrackerError("a run is already current: end it first")
        if not run.status.is_terminal or hold_terminal:
            run, lease = self.leases.claim(run, created=created, wait=wait, hold=hold_terminal)
            if lease is not None and run.status.is_terminal and not hold_terminal:
                lease.stop()
                lease = None
            self._lease = lease
        self.run, self.params = run, params
        self._resumed = not created
        self.metrics.start(run.run_id)
        self._has_main = self.main_metric in run.metrics
        marked = run.tags.get(T.TAG_MODEL_UPLOADED) == T.TRUE
        self._model = (marked, marked)
        return run.status.is_terminal

    def require(self) -> RunRecord:
        """The current run; raises if there is none or its lease was taken over."""
        if self.run is None:
            raise NoActiveRunError("no active run: call set_run(params) first")
        if self._lease is not None and self._lease.lost:
            run_id = self.run.run_id
            self.forget()
            raise LeaseLostError(
                f"run {run_id}: this worker's lease expired or was taken over by another "
                "worker; its queued metrics were dropped and the run is the other worker's now"
            )
        return self.run

    def check_lease(self, fresh: RunRecord) -> None:
        """Raise :class:`LeaseLostError` if ``fresh`` (just read) shows another holder."""
        if self._lease is None:
            return
        try:
            self._lease.check(fresh, self.ttl_ms)
        except LeaseLostError:
            self.forget()
            raise

    # ------------------------------------------------------------------ metrics
    def add_metric(self, value: MetricValue) -> None:
        """Queue a value (sent in the background, see :mod:`tracker_core.metrics`)."""
        self.require()
        queued = self.metrics.add(value)
        if not self._has_main and any(v.name == self.main_metric for v in queued):
            self._has_main = True  # queued; every way a run ends sends it first

    def _send_metrics(self, run_id: str, values: Sequence[MetricValue]) -> None:
        """Send one batch (the queue's sender thread, or ``flush``)."""
        lease = self._lease
        if lease is not None and lease.lost:
            raise LeaseLostError(f"run {run_id}: the lease was lost; metrics not sent")
        self._tracking.log_batch(run_id, values)

    def flush(self) -> None:
        """Send every queued value now; on failure they stay queued (nothing is lost)."""
        if self.run is None or not len(self.metrics):
            return
        self.require()
        self.metrics.flush()

    def quality(self) -> float:
        run = self.require()
        self.flush()
        fresh = self.get_existing(run.run_id)
        if self.main_metric not in fresh.metrics:
            raise InvalidMetricError(
                f"run {run.run_id} has no value of the main metric {self.main_metric!r}"
            )
        return float(fresh.metrics[self.main_metric])

    # ------------------------------------------------------------------ models
    def model_saved(self, *, ranked: bool) -> None:
        """The current run's model was written and marked (``ranked``: with ``best_only``)."""
        self._model = (True, ranked or self._model[1])
        self._save_failed = None

    def model_not_saved(self, exc: BaseException) -> None:
        """A ``save_model`` of the current run failed: it cannot end FINISHED until a save
        succeeds (see :class:`~tracker_core.errors.ModelNotSavedError`)."""
        self._save_failed = f"{type(exc).__name__}: {exc}"

    # ------------------------------------------------------------------ ending
    def finish(self, status: RunStatus) -> EndedRun | None:
        """End the current run with ``status`` after its metrics reached the store; what
        ended (None if the run had ended already)."""
        run = self.require()
        self.flush()  # raises with the values still queued: the run is not ended
        if run.status.is_terminal:
            self._reset()
            return None
        if status == RunStatus.FINISHED and not self._has_main:
            raise InvalidMetricError(
                f"run {run.run_id} has no value of the main metric {self.main_metric!r}: log it "
                "before finish_run(), or end the run with finish_run(as_failed=True)"
            )
        if status == RunStatus.FINISHED and self._save_failed is not None:
            raise ModelNotSavedError(
                f"run {run.run_id}: save_model failed ({self._save_failed}), so it cannot end "
                "FINISHED: its main metric would stand with no model behind it. Call "
                "save_model again, or end the run with finish_run(as_failed=True)"
            )
        ended = EndedRun(run, status, *self._model)
        if self._lease is not None:
            self._lease.stop()
        self._tracking.set_terminated(run.run_id, status)
        if self._resumed:  # its creator may have died leaving a twin
            try:
                self.leases.drop_abandoned_twins(run)
            except TrackerError as exc:
                log.warning("could not look for twins of run %s: %s", run.run_id, exc)
        self._reset()
        return ended

    def end_implicitly(self) -> EndedRun | None:
        """End the run because the caller moved on: FINISHED if it logged the main metric
        and no ``save_model`` of it failed since the last that succeeded, else left
        unfinished (lease released) so the same params resume it. What ended, if anything."""
        if self.run is None:
            return None
        self.flush()  # raises with the values still queued: the run is not ended
        if self.run.status.is_terminal:
            self._reset()
            return None
        if self._has_main and self._save_failed is None:
            return self.finish(RunStatus.FINISHED)
        why = (
            f"its save_model failed ({self._save_failed})"
            if self._has_main
            else f"without a value of {self.main_metric!r}"
        )
        log.info(
            "run %s ended %s: left unfinished, the same params resume it", self.run.run_id, why
        )
        self.release()
        return None

    def release(self, *, at_exit: bool = False) -> None:
        """Let go of the run without ending it (it stays RUNNING): its lease is released so
        another worker, or this one later, resumes it at once. Queued metrics are dropped
        (flush first to keep them). A failure is logged (at DEBUG ``at_exit``): the lease
        then expires on its own."""
        lease = self._lease
        self.forget()
        if lease is not None:
            lease.release(at_exit=at_exit)

    def forget(self) -> None:
        """Drop the current run as a crash would: no status change, no release."""
        if self._lease is not None:
            self._lease.stop()
        self._reset()

    def close(self) -> None:
        """Stop the metrics sender (call after the run ended)."""
        self.metrics.close()

    def _reset(self) -> None:
        self.metrics.reset()
        self.run = None
        self.params = None
        self._lease = None
        self._has_main = False
        self._resumed = False
        self._model = (False, False)
        self._save_failed = None
