"""Taking a run's lease, holding it, and letting go (the rules are :mod:`tracker_core.leases`).

:class:`Leases` is a manager's lease service: its owner id, time to live and clock, and the
tracking store the leases live in. :meth:`Leases.claim` takes a run's lease (waiting for a
live holder if asked), yields to a twin another worker took first, and returns a
:class:`Lease`: the held lease, renewed by a :class:`Heartbeat` thread until it is released,
stopped, or found lost. Every wait and every expiry is read from the service's
:class:`~tracker_core.clock.Clock`.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Callable
from datetime import UTC, datetime

from tracker_core import leases as rules
from tracker_core.clock import SYSTEM_CLOCK, Clock
from tracker_core.errors import LeaseLostError, RunInUseError, RunNotFoundError, TrackingStoreError
from tracker_core.stores import RunQuery, TrackingStore
from tracker_core.tags import LEASE_CLAIM_PREFIX, TAG_LEASE
from tracker_core.values import RunRecord

__all__ = ["Heartbeat", "Lease", "Leases"]

log = logging.getLogger(__name__)

#: a claim landing after its expiry is made again, in the next epoch, this many times at most
_MAX_LATE_CLAIMS = 3


def _when(ms: int | None) -> str:
    if ms is None:
        return "?"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


class Heartbeat:
    """Renews one lease every ``ttl / 3`` seconds in a daemon thread until stopped.

    ``renew(expires_ms)`` writes the heartbeat and returns True, or False if the lease was lost
    (a newer epoch exists), or None if there is nothing left to hold (the run ended, or its
    holder is gone): the thread then stops quietly. Exceptions are logged and retried at the
    next beat. If no renewal succeeded before the lease's expiry, the lease counts as lost too
    (another worker may have taken the run over).
    """

    def __init__(
        self,
        renew: Callable[[int], bool | None],
        ttl_seconds: float,
        expires_ms: int,
        *,
        clock: Clock = SYSTEM_CLOCK,
        name: str = "tracker-core-lease",
    ) -> None:
        self._renew = renew
        self._ttl = ttl_seconds
        self._clock = clock
        self._expires_ms = expires_ms
        # the same expiry on this process's monotonic clock: `lost` is read on every call
        self._deadline = clock.monotonic() + (expires_ms - clock.now_ms()) / 1000
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def lost(self) -> bool:
        if self._lost.is_set():
            return True
        if self._clock.monotonic() >= self._deadline:
            self._lost.set()
            return True
        return False

    def _due(self, interval: float) -> float:
        """Seconds until the next renewal: every ``interval``, and at once when less than
        ``ttl - interval`` of the lease is left (a claim whose retries took most of the TTL)."""
        left = (self._expires_ms - self._clock.now_ms()) / 1000
        return max(0.0, min(interval, left - (self._ttl - interval)))

    def _loop(self) -> None:
        interval = max(self._ttl / 3.0, 0.05)
        delay = self._due(interval)
        while not self._clock.wait(self._stop, delay):
            delay = min(interval, 1.0)  # after a failed beat: soon again, but no busy loop
            expires = self._clock.now_ms() + int(self._ttl * 1000)
            try:
                still_mine = self._renew(expires)
            except Exception as exc:  # a failed beat is retried at the next one
                log.warning("lease heartbeat failed (%s); retrying", type(exc).__name__)
                if self.lost:
                    return
                continue
            if still_mine is None:
                log.debug("lease heartbeat stopped: nothing left to hold")
                return
            if not still_mine:
                log.warning("lease lost: another worker took the run over")
                self._lost.set()
                return
            self._expires_ms = expires
            self._deadline = self._clock.monotonic() + (expires - self._clock.now_ms()) / 1000
            delay = self._due(interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=max(self._ttl, 5.0))

    def __repr__(self) -> str:
        return f"<Heartbeat ttl={self._ttl}s lost={self.lost}>"


class Lease:
    """A run's lease this worker holds: epoch ``epoch`` of ``owner``, renewed by a heartbeat.
    :meth:`release` lets the run go (resumable at once); :meth:`stop` only stops renewing."""

    def __init__(self, leases: Leases, run_id: str, epoch: int, expires_ms: int) -> None:
        self.run_id, self.epoch, self.owner = run_id, epoch, leases.owner
        self._tracking = leases.tracking
        self._heartbeat: Heartbeat | None = Heartbeat(
            _renewer(weakref.ref(self), leases.ttl_ms),
            leases.lease_seconds,
            expires_ms,
            clock=leases.clock,
            name=f"tracker-core-lease-{run_id[:8]}",
        )

    @property
    def lost(self) -> bool:
        """Whether the lease expired unrenewed or another worker took the run over."""
        return self._heartbeat is not None and self._heartbeat.lost

    def check(self, fresh: RunRecord, ttl_ms: int) -> None:
        """Raise :class:`LeaseLostError` if ``fresh`` (just read) shows another holder."""
        state = rules.lease_state(fresh, ttl_ms)
        if state.epoch != self.epoch or state.owner != self.owner:
            self.stop()
            raise LeaseLostError(
                f"run {fresh.run_id}: lease {self.epoch} was taken over by {state.owner} "
                f"(lease {state.epoch})"
            )

    def stop(self) -> None:
        """Stop renewing (the run ended, or was forgotten as a crash would)."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    def release(self, *, at_exit: bool = False) -> None:
        """Let go without ending the run: it is resumable at once. A failure is logged (at
        DEBUG ``at_exit``): the lease then expires on its own."""
        self.stop()
        try:
            self._tracking.set_tags(self.run_id, rules.release_tag(self.epoch, self.owner))
        except Exception as exc:
            level = logging.DEBUG if at_exit else logging.WARNING
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.log(level, "could not release the lease of run %s: %s", self.run_id, text)

    def __repr__(self) -> str:
        return f"<Lease {self.run_id} epoch={self.epoch} owner={self.owner}>"


def _renewer(ref: weakref.ref[Lease], ttl_ms: int) -> Callable[[int], bool | None]:
    """The heartbeat's renewal; it holds the lease weakly, so a forgotten manager's heartbeat
    stops instead of keeping its run locked forever."""

    def renew(expires_ms: int) -> bool | None:
        lease = ref()
        if lease is None:
            return None  # its holder is gone
        tracking, run_id, epoch, owner = lease._tracking, lease.run_id, lease.epoch, lease.owner
        del lease
        fresh = tracking.get_run(run_id)
        if fresh is None or fresh.status.is_terminal:
            return None  # deleted or ended: nothing left to hold
        state = rules.lease_state(fresh, ttl_ms)
        if state.epoch != epoch or state.owner != owner or state.released:
            return False
        tracking.set_tags(run_id, {TAG_LEASE: f"{epoch} {owner} {expires_ms}"})
        return True

    return renew


class Leases:
    """The lease service of one manager: who it is (``owner``), how long its leases live
    (``lease_seconds``), its clock, and the tracking store the leases are written to."""

    def __init__(
        self,
        tracking: TrackingStore,
        *,
        lease_seconds: float = rules.DEFAULT_LEASE_SECONDS,
        clock: Clock = SYSTEM_CLOCK,
        owner: str | None = None,
    ) -> None:
        self.tracking = tracking
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.owner = owner or rules.new_owner_id()

    @property
    def ttl_ms(self) -> int:
        return int(self.lease_seconds * 1000)

    def is_live(self, run: RunRecord) -> bool:
        """Whether a live worker holds ``run`` now (:func:`~tracker_core.leases.run_is_live`)."""
        return rules.run_is_live(run, self.ttl_ms, self.clock.now_ms())

    def is_abandoned(self, run: RunRecord) -> bool:
        """Whether its creator left ``run`` now (see :func:`~tracker_core.leases.is_abandoned`)."""
        return rules.is_abandoned(run, self.ttl_ms, self.clock.now_ms())

    def get_existing(self, run_id: str) -> RunRecord:
        run = self.tracking.get_run(run_id)
        if run is None:
            raise RunNotFoundError(f"run {run_id} does not exist")
        return run

    # ------------------------------------------------------------------ taking a lease
    def claim(
        self, run: RunRecord, *, created: bool, wait: float, hold: bool
    ) -> tuple[RunRecord, Lease | None]:
        """Claim ``run``'s lease: ``(the run as read after the claim, the held lease)``.

        If a live worker holds it, wait up to ``wait`` seconds for it to end or let go, then
        raise :class:`RunInUseError`. A run its holder ended meanwhile is returned with no
        lease (nothing to train), unless ``hold`` (an ended run's lease is taken to rewrite
        its model). A first claim that finds a twin another worker took first deletes its
        own run and raises :class:`RunNotFoundError`: look the run up again."""
        clock = self.clock
        deadline = clock.monotonic() + wait
        poll = min(max(self.lease_seconds / 10, 0.05), 5.0)
        late = 0  # claims of ours that landed after their own expiry
        first = False  # whether a claim of ours was the run's first (epoch 1)
        while True:
            state = rules.lease_state(run, self.ttl_ms)
            mine = state.owner == self.owner
            if not created and not mine and state.is_live(clock.now_ms()):
                remaining = deadline - clock.monotonic()
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
                clock.sleep(min(poll, remaining) if math.isfinite(remaining) else poll)
                run = self.get_existing(run.run_id)
                if run.status.is_terminal and not hold:
                    return run, None  # its holder ended it: nothing to train
                continue
            epoch = state.epoch if mine and not state.released and not late else state.epoch + 1
            expires = clock.now_ms() + self.ttl_ms
            params, tags = rules.claim_params(epoch, self.owner, expires)
            if epoch == state.epoch:
                params = {}  # this manager's own claim: renew it
            try:
                self.tracking.log_batch(run.run_id, (), params, tags)
            except TrackingStoreError:
                # params are write-once: did another worker claim this epoch first?
                key = f"{LEASE_CLAIM_PREFIX}{epoch}"
                fresh = self.get_existing(run.run_id)
                if not params or key not in fresh.params:
                    raise  # refused for another reason
                if fresh.params[key] != params[key]:
                    log.info("run %s was claimed by another worker first", run.run_id)
                    run, created = fresh, False
                    continue
                # our claim landed; the error came after it
            first = first or epoch == 1
            if clock.now_ms() < expires:
                break
            # the claim landed after its own expiry (its write was retried for longer than a
            # lease): it can be neither renewed (the heartbeat counts it lost) nor trusted
            # (another worker may count the run abandoned), so the next epoch is claimed, which
            # only one worker can win (claims are write-once)
            late += 1
            if late >= _MAX_LATE_CLAIMS:
                raise LeaseLostError(
                    f"run {run.run_id}: {late} claims of its lease landed after their expiry "
                    f"(the tracking store answers slower than a lease of "
                    f"{self.lease_seconds:g} s): give the workers a longer lease_seconds"
                )
            log.warning(
                "run %s: the claim of lease %d landed after its expiry (retried for longer "
                "than a lease); claiming the next",
                run.run_id,
                epoch,
            )
            # no longer a run only this worker knows: another worker may have claimed it
            run, created = self.get_existing(run.run_id), False
        lease = Lease(self, run.run_id, epoch, expires)
        log.debug("run %s: lease %d held by %s", run.run_id, epoch, self.owner)
        try:
            if first and not run.status.is_terminal:
                self._yield_to_taken_twin(run)
            if not created:
                # the record the claim was decided on may be old (a search retried for
                # longer than a lease): its holder may have ended the run and let go
                # meanwhile, so that the claim of the next epoch landed. What to do is read
                # after the claim.
                run = self.get_existing(run.run_id)
        except BaseException:
            lease.stop()
            raise
        return run, lease

    # ------------------------------------------------------------------ twins
    def twins(self, run: RunRecord) -> list[RunRecord]:
        """The other active runs of ``run``'s name in its iteration."""
        runs = self.tracking.search_runs(RunQuery((run.experiment_id,), run_name=run.run_name))
        return [r for r in runs if r.run_id != run.run_id]

    def _yield_to_taken_twin(self, run: RunRecord) -> None:
        """After the first claim of ``run``: if another run of its name was taken, ``run`` is
        a twin nobody trained. Delete it and raise :class:`RunNotFoundError`, so that the
        lookup is made again."""
        taken = [t for t in self.twins(run) if rules.is_taken(t)]
        if not taken:
            return
        log.info("run %s is a twin of %s, taken first; deleting it", run.run_id, taken[0].run_id)
        self.tracking.delete_run(run.run_id)
        raise RunNotFoundError(f"run {run.run_id} was a twin of {taken[0].run_id}: deleted")

    def drop_abandoned_twins(self, winner: RunRecord) -> None:
        """Delete the other runs of ``winner``'s name that a creator left behind: it was
        killed between creating its twin and deleting it (after a lost ``create_run``
        answer, or racing another creator). Only twins never claimed and past their
        creation's grace go: within it, a live creator may still be about to claim its run
        (creation times are the clients', so "oldest" can change meanwhile)."""
        for twin in self.twins(winner):
            if not self.is_abandoned(twin):
                continue
            log.info("deleting run %s, a twin of %s its creator left", twin.run_id, winner.run_id)
            self.tracking.delete_run(twin.run_id)
