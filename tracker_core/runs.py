"""The current run of a manager: find or create it, hold its lease, queue its metrics, end it.

A run is found by name (the params' id) in its iteration, created if missing. Before training
it, a worker claims its lease (:mod:`tracker_core.leases`): one worker trains a run at a time,
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
touches only the stores.
"""

from __future__ import annotations

import logging
import math
import random
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import attrs

from tracker_core import leases
from tracker_core import tags as T
from tracker_core.accumulators import MetricsAccumulator
from tracker_core.errors import (
    InvalidMetricError,
    LeaseLostError,
    ModelNotSavedError,
    NoActiveRunError,
    RunInUseError,
    RunNotFoundError,
    TrackerError,
    TrackingStoreError,
)
from tracker_core.metrics import MetricsQueue
from tracker_core.params import FineTuningParams
from tracker_core.remote import Remote
from tracker_core.stores import RunQuery
from tracker_core.values import MetricValue, RunRecord, RunStatus

__all__ = ["EndedRun", "RunTracker", "looked_up_again"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: how many times a run is looked up when the one found is deleted as it is taken
LOOKUPS = 5


def looked_up_again(take: Callable[[], _T], what: str) -> _T:
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
            time.sleep(random.uniform(0.0, 0.1 * attempt))
    raise AssertionError("unreachable")


@attrs.frozen
class EndedRun:
    """A run this worker ended: its record, how it ended, and whether it holds a model that
    was ranked (saved with ``best_only``, or found marked when the run was taken)."""

    run: RunRecord
    status: RunStatus
    holds_model: bool
    ranked: bool


def _when(ms: int | None) -> str:
    if ms is None:
        return "?"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def _precedence(run: RunRecord) -> tuple[bool, int, str]:
    """Of runs of one name, the one that counts sorts first (see :meth:`RunTracker.first`)."""
    return (not leases.is_taken(run), run.start_time_ms, run.run_id)


class RunTracker:
    """The run a manager is working on, and run lookups by name and id."""

    def __init__(
        self,
        remote: Remote,
        main_metric: str,
        accumulators: Iterable[MetricsAccumulator] = (),
        *,
        lease_seconds: float = leases.DEFAULT_LEASE_SECONDS,
    ) -> None:
        self._remote = remote
        self.main_metric = main_metric
        self.lease_seconds = lease_seconds
        self.owner = leases.new_owner_id()
        self.metrics = MetricsQueue(self._send_metrics, accumulators)
        self.run: RunRecord | None = None
        self.params: FineTuningParams | None = None
        self._epoch = 0
        self._heartbeat: leases.Heartbeat | None = None
        self._has_main = False
        self._resumed = False
        self._model: tuple[bool, bool] = (False, False)  # (holds a model, ranked)
        self._save_failed: str | None = None

    @property
    def ttl_ms(self) -> int:
        return int(self.lease_seconds * 1000)

    # ------------------------------------------------------------------ lookups
    def get(self, run_id: str) -> RunRecord | None:
        """The run with that id, or None."""
        return self._remote.track("search", self._remote.tracking.get_run, run_id)

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
        runs = self._remote.track(
            "search", self._remote.tracking.search_runs, RunQuery((experiment_id,), **query)
        )
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
        deleted (by its creator here, or after its claim: :meth:`_yield_to_taken_twin`).

        A run found without its ``params`` gets them: its creator died between creating it
        and logging them, or it is the twin an earlier attempt of this call created (the
        answer to ``create_run`` was lost, so the retry created a second run)."""
        existing = self.first(experiment_id, run_name=run_name)
        if existing is not None:
            self._drop_twins(existing)
            return self._with_params(existing, params), False
        tracking = self._remote.tracking
        created = self._remote.track("create", tracking.create_run, experiment_id, run_name, tags)
        winner = self.first(experiment_id, run_name=run_name) or created
        if winner.run_id != created.run_id:
            log.info("run %r was created concurrently; using %s", run_name, winner.run_id)
            self._remote.track("delete", tracking.delete_run, created.run_id)
            return self._with_params(winner, params), False
        first_metric = [MetricValue(T.METRIC_MODEL_UPLOADED, 0.0, step=0)]
        self._log_params(created, params or {}, first_metric)
        return created, True

    def _twins(self, run: RunRecord) -> list[RunRecord]:
        """The other active runs of ``run``'s name in its iteration."""
        query = RunQuery((run.experiment_id,), run_name=run.run_name)
        runs = self._remote.track("search", self._remote.tracking.search_runs, query)
        return [r for r in runs if r.run_id != run.run_id]

    def _drop_twins(self, winner: RunRecord) -> None:
        """Delete the other runs of ``winner``'s name that a creator left behind: it was
        killed between creating its twin and deleting it (after a lost ``create_run`` answer,
        or racing another creator). Only twins never claimed and past their creation's grace
        (:mod:`tracker_core.leases`) go: within it, a live creator may still be about to
        claim its run (creation times are the clients', so "oldest" can change meanwhile)."""
        now = leases.now_ms()
        for twin in self._twins(winner):
            if not leases.is_abandoned(twin, self.ttl_ms, now):
                continue
            log.info("deleting run %s, a twin of %s its creator left", twin.run_id, winner.run_id)
            self._remote.track("delete", self._remote.tracking.delete_run, twin.run_id)

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
        tracking = self._remote.tracking
        try:
            self._remote.track("log_params", tracking.log_batch, run.run_id, metrics or (), params)
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
        FAILED or KILLED): there is nothing to train. Otherwise its lease is claimed first:
        if a live worker holds it, wait up to ``wait`` seconds for it to end or let go, then
        raise :class:`RunInUseError`. ``hold_terminal`` claims the lease of an ended run too
        (to rewrite its model)."""
        if self.run is not None:
            raise TrackerError("a run is already current: end it first")
        if not run.status.is_terminal or hold_terminal:
            acquired = self._acquire(run, created=created, wait=wait, hold=hold_terminal)
            if acquired.status.is_terminal and not hold_terminal:
                self._stop_heartbeat()
            run = acquired
        self.run, self.params = run, params
        self._resumed = not created
        self.metrics.start(run.run_id)
        self._has_main = self.main_metric in run.metrics
        marked = run.tags.get(T.TAG_MODEL_UPLOADED) == T.TRUE
        self._model = (marked, marked)
        return run.status.is_terminal

    def _acquire(self, run: RunRecord, *, created: bool, wait: float, hold: bool) -> RunRecord:
        tracking = self._remote.tracking
        deadline = time.monotonic() + wait
        poll = min(max(self.lease_seconds / 10, 0.05), 5.0)
        while True:
            state = leases.lease_state(run, self.ttl_ms)
            mine = state.owner == self.owner
            if not created and not mine and state.is_live(leases.now_ms()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RunInUseError(
                        f"run {run.run_id} ({run.run_name}) is being trained by another worker "
                        f"({state.owner or 'being created'}; its lease runs until "
                        f"{_when(state.expires_ms)} unless renewed): skip it, or wait for it "
                        "with set_run(params, wait=seconds)",
                        run_id=run.run_id,
                        owner=state.owner or "",
                        expires_ms=state.expires_ms or 0,
                    )
                time.sleep(min(poll, remaining) if math.isfinite(remaining) else poll)
                run = self.get_existing(run.run_id)
                if run.status.is_terminal and not hold:
                    return run  # its holder ended it: nothing left to train
                continue
            epoch = state.epoch if mine and not state.released else state.epoch + 1
            expires = leases.now_ms() + self.ttl_ms
            params, tags = leases.claim_params(epoch, self.owner, expires)
            if epoch == state.epoch:
                params = {}  # this manager's own claim: renew it
            try:
                self._remote.track("lease", tracking.log_batch, run.run_id, (), params, tags)
            except TrackingStoreError:
                # params are write-once: did another worker claim this epoch first?
                key = f"{leases.LEASE_CLAIM_PREFIX}{epoch}"
                fresh = self.get_existing(run.run_id)
                if not params or key not in fresh.params:
                    raise  # refused for another reason
                if fresh.params[key] != params[key]:
                    log.info("run %s was claimed by another worker first", run.run_id)
                    run, created = fresh, False
                    continue
                # our claim landed; the error came after it
            break
        self._epoch = epoch
        self._heartbeat = leases.Heartbeat(
            self._renewer(run.run_id, epoch),
            self.lease_seconds,
            expires,
            name=f"tracker-core-lease-{run.run_id[:8]}",
        )
        log.debug("run %s: lease %d held by %s", run.run_id, epoch, self.owner)
        if epoch == 1 and not run.status.is_terminal:
            self._yield_to_taken_twin(run)
        if not created:
            # the record the claim was decided on may be old (a search retried for longer
            # than a lease): its holder may have ended the run and let go meanwhile, so
            # that the claim of the next epoch landed. What to do is read after the claim.
            try:
                run = self.get_existing(run.run_id)
            except RunNotFoundError:
                self._stop_heartbeat()
                raise
        return run

    def _yield_to_taken_twin(self, run: RunRecord) -> None:
        """After the first claim of ``run``: if another run of its name was taken (see
        :mod:`tracker_core.leases`, "Twins"), ``run`` is a twin nobody trained. Delete it
        and raise :class:`RunNotFoundError`, so that the lookup is made again."""
        taken = [t for t in self._twins(run) if leases.is_taken(t)]
        if not taken:
            return
        self._stop_heartbeat()
        log.info("run %s is a twin of %s, taken first; deleting it", run.run_id, taken[0].run_id)
        self._remote.track("delete", self._remote.tracking.delete_run, run.run_id)
        raise RunNotFoundError(f"run {run.run_id} was a twin of {taken[0].run_id}: deleted")

    def _renewer(self, run_id: str, epoch: int) -> Callable[[int], bool | None]:
        """The heartbeat's renewal; it holds the tracker weakly, so a forgotten manager's
        heartbeat stops instead of keeping its run locked forever."""
        ref = weakref.ref(self)

        def renew(expires_ms: int) -> bool | None:
            tracker = ref()
            if tracker is None:
                return None  # its manager is gone
            remote, owner, ttl = tracker._remote, tracker.owner, tracker.ttl_ms
            del tracker
            fresh = remote.track("lease", remote.tracking.get_run, run_id)
            if fresh is None or fresh.status.is_terminal:
                return None  # deleted or ended: nothing left to hold
            state = leases.lease_state(fresh, ttl)
            if state.epoch != epoch or state.owner != owner or state.released:
                return False
            tag = {leases.TAG_LEASE: f"{epoch} {owner} {expires_ms}"}
            remote.track("lease", remote.tracking.set_tags, run_id, tag)
            return True

        return renew

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    def require(self) -> RunRecord:
        """The current run; raises if there is none or its lease was taken over."""
        if self.run is None:
            raise NoActiveRunError("no active run: call set_run(params) first")
        if self._heartbeat is not None and self._heartbeat.lost:
            run_id = self.run.run_id
            self.forget()
            raise LeaseLostError(
                f"run {run_id}: this worker's lease expired or was taken over by another "
                "worker; its queued metrics were dropped and the run is the other worker's now"
            )
        return self.run

    def check_lease(self, fresh: RunRecord) -> None:
        """Raise :class:`LeaseLostError` if ``fresh`` (just read) shows another holder."""
        if self._epoch == 0:
            return
        state = leases.lease_state(fresh, self.ttl_ms)
        if state.epoch != self._epoch or state.owner != self.owner:
            self.forget()
            raise LeaseLostError(
                f"run {fresh.run_id}: lease {self._epoch} was taken over by {state.owner} "
                f"(lease {state.epoch})"
            )

    # ------------------------------------------------------------------ metrics
    def add_metric(self, value: MetricValue) -> None:
        """Queue a value (sent in the background, see :mod:`tracker_core.metrics`)."""
        self.require()
        queued = self.metrics.add(value)
        if not self._has_main and any(v.name == self.main_metric for v in queued):
            self._has_main = True  # queued; every way a run ends sends it first

    def _send_metrics(self, run_id: str, values: Sequence[MetricValue]) -> None:
        """Send one batch (the queue's sender thread, or ``flush``)."""
        if self._heartbeat is not None and self._heartbeat.lost:
            raise LeaseLostError(f"run {run_id}: the lease was lost; metrics not sent")
        self._remote.track("log_metric", self._remote.tracking.log_batch, run_id, values)

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
        self._stop_heartbeat()
        self._remote.track("finish_run", self._remote.tracking.set_terminated, run.run_id, status)
        if self._resumed:  # its creator may have died leaving a twin (see _drop_twins)
            try:
                self._drop_twins(run)
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
        run, epoch, heartbeat = self.run, self._epoch, self._heartbeat
        self.forget()
        if run is None or heartbeat is None or epoch == 0:
            return
        try:
            tag = leases.release_tag(epoch, self.owner)
            self._remote.track("lease", self._remote.tracking.set_tags, run.run_id, tag)
        except Exception as exc:  # the lease then expires on its own
            level = logging.DEBUG if at_exit else logging.WARNING
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.log(level, "could not release the lease of run %s: %s", run.run_id, text)

    def forget(self) -> None:
        """Drop the current run as a crash would: no status change, no release."""
        self._stop_heartbeat()
        self._reset()

    def close(self) -> None:
        """Stop the metrics sender (call after the run ended)."""
        self.metrics.close()

    def _reset(self) -> None:
        self.metrics.reset()
        self.run = None
        self.params = None
        self._epoch = 0
        self._has_main = False
        self._resumed = False
        self._model = (False, False)
        self._save_failed = None
