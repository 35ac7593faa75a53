"""Run leases: one worker trains a run at a time, and a dead worker's run is resumed.

A run's identity is its params (the same params in the same iteration are the same run), so
two workers given the same params find the same run. The lease decides which of them trains
it. It is stored with the run, in the tracking store, in two parts:

- **the claim**, a write-once param ``tracker.lease.<epoch>`` = ``"<owner> <expires_ms>"``.
  Params cannot change once logged (the tracking store refuses a different value for an
  existing key), so of two workers claiming the same epoch exactly one succeeds: the store's
  unique key is the arbiter, not a read-then-write race. Each takeover claims the next epoch.
- **the heartbeat**, a tag ``tracker.lease`` = ``"<epoch> <owner> <expires_ms>"`` that the
  holder renews every ``ttl / 3`` seconds from a background thread, or ``"<epoch> <owner>
  released"`` when it lets go without ending the run (an interrupt, an implicit end).

A lease is *live* while the heartbeat of its newest epoch has not expired (or, before the
first heartbeat of that epoch lands, while the claim's own expiry has not passed). A run with
no claim yet is live for ``ttl`` after it was created, so a run being set up is never taken
over. A terminal run (FINISHED, FAILED, KILLED) holds no lease.

Clocks: expiry times are written by the holder's clock and read by another worker's, so the
hosts' clocks must agree to well within the TTL (NTP does).

A holder that was paused longer than its TTL (a stalled host) may find its run taken over; its
heartbeat thread notices the newer epoch and the manager's next call for that run raises
:class:`~tracker_core.errors.LeaseLostError`.

Twins: two workers creating a params set's run at once create two runs of one name. The lease
of each is claimed separately, so the claim alone cannot stop both being trained. The run of a
name is the one a worker *took* first (:func:`is_taken`: claimed or ended), and a worker that
claims a run nobody took before looks for a taken twin after its claim landed: if there is
one, its own run is a twin to delete. Of two such claimants, the one that looks last sees both
claims, so at most one of them trains.

This module holds the rules, read from a run's record at a given time; taking, renewing and
releasing a lease is :mod:`tracker_core.lease`.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Mapping

import attrs

from tracker_core.tags import LEASE_CLAIM_PREFIX, TAG_LEASE
from tracker_core.values import RunRecord

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "LEASE_CLAIM_PREFIX",
    "TAG_LEASE",
    "LeaseState",
    "claim_params",
    "is_abandoned",
    "is_taken",
    "lease_state",
    "new_owner_id",
    "release_tag",
    "run_is_live",
]

log = logging.getLogger(__name__)

#: default lease time to live: a killed worker's run can be resumed this long after its death
DEFAULT_LEASE_SECONDS = 60.0
_RELEASED = "released"


def new_owner_id() -> str:
    """``host:pid:random``: unique per holder, and tells a person where the holder runs."""
    host = socket.gethostname().replace(" ", "_") or "host"
    return f"{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@attrs.frozen
class LeaseState:
    """The lease of a run as read from its record. ``epoch`` 0: never claimed."""

    epoch: int
    owner: str | None
    expires_ms: int | None
    released: bool

    def is_live(self, at_ms: int) -> bool:
        return not self.released and self.expires_ms is not None and self.expires_ms > at_ms


def _claims(params: Mapping[str, str]) -> dict[int, tuple[str, int]]:
    out: dict[int, tuple[str, int]] = {}
    for key, value in params.items():
        if not key.startswith(LEASE_CLAIM_PREFIX):
            continue
        try:
            epoch = int(key[len(LEASE_CLAIM_PREFIX) :])
            owner, expires = value.rsplit(" ", 1)
            out[epoch] = (owner, int(expires))
        except ValueError:
            log.warning("ignoring malformed lease claim %s=%r", key, value)
    return out


def _heartbeat(tags: Mapping[str, str]) -> tuple[int, str, int | None] | None:
    """``(epoch, owner, expires_ms or None if released)`` from the heartbeat tag."""
    text = tags.get(TAG_LEASE)
    if not text:
        return None
    try:
        epoch, owner, expires = text.split(" ")
        return int(epoch), owner, None if expires == _RELEASED else int(expires)
    except ValueError:
        log.warning("ignoring malformed lease tag %r", text)
        return None


def lease_state(run: RunRecord, ttl_ms: int) -> LeaseState:
    """The lease of ``run`` (see the module docstring for the rules)."""
    claims = _claims(run.params)
    if not claims:
        # not claimed yet: a run being created counts as held for one TTL
        return LeaseState(0, None, run.start_time_ms + ttl_ms, released=False)
    epoch = max(claims)
    owner, expires = claims[epoch]
    beat = _heartbeat(run.tags)
    if beat is not None and beat[0] == epoch and beat[1] == owner:
        if beat[2] is None:
            return LeaseState(epoch, owner, None, released=True)
        expires = max(expires, beat[2])
    return LeaseState(epoch, owner, expires, released=False)


def run_is_live(run: RunRecord, ttl_ms: int, at_ms: int) -> bool:
    """Whether a live worker holds ``run`` at ``at_ms``: it is not terminal and its lease has
    not expired. ``ttl_ms`` only matters for a run whose lease was never claimed (a run being
    created)."""
    if run.status.is_terminal:
        return False
    return lease_state(run, ttl_ms).is_live(at_ms)


def is_abandoned(run: RunRecord, ttl_ms: int, at_ms: int) -> bool:
    """Whether ``run`` was created and left by its creator: not ended, never claimed (epoch
    0) and past its creation's grace. No worker trained it: it holds no model and no metric
    but its creation marker. What a creator killed after ``create_run`` leaves, or the twin
    an attempt whose answer was lost created."""
    if run.status.is_terminal:
        return False
    state = lease_state(run, ttl_ms)
    return state.epoch == 0 and not state.is_live(at_ms)


def is_taken(run: RunRecord) -> bool:
    """Whether a worker ever took ``run``: it ended, or its lease was claimed at least once.
    Of the runs of one name, a taken one is the run; the others are twins."""
    return run.status.is_terminal or bool(_claims(run.params))


def claim_params(epoch: int, owner: str, expires_ms: int) -> tuple[dict[str, str], dict[str, str]]:
    """``(params, tags)`` that claim ``epoch`` for ``owner``: log them in one batch."""
    return (
        {f"{LEASE_CLAIM_PREFIX}{epoch}": f"{owner} {expires_ms}"},
        {TAG_LEASE: f"{epoch} {owner} {expires_ms}"},
    )


def release_tag(epoch: int, owner: str) -> dict[str, str]:
    return {TAG_LEASE: f"{epoch} {owner} {_RELEASED}"}
