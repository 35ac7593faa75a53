"""Behaviour suite: one worker trains a run at a time (the run's lease, invariant 2).

- a worker asking for a run another live worker holds is told so or waits, and takes it
  once it is let go; a heartbeat keeps a long run held;
- a dead or stalled worker's lease expires and the run resumes elsewhere; the stalled worker
  is told; a killed process's run resumes after its lease;
- two creators of one params set's run agree on one run through the store (twins).

Lease times and waits run on the stepped ``clock`` (:data:`LEASE`, a real worker's lease),
except where real processes are killed.
"""

from __future__ import annotations

import math
import os
import uuid
from typing import Any

import pytest

from tracker_core.errors import LeaseLostError, RunInUseError, TransientError
from tracker_core.leases import LEASE_CLAIM_PREFIX
from tracker_core.manager import ExperimentsManager
from tracker_core.stores import RunQuery
from tracker_core.testing.clock import SteppedClock
from tracker_core.testing.faults import FaultyProxy
from tracker_core.testing.harness import BackendUnderTest
from tracker_core.testing.support import (
    LEASE,
    Params,
    clock,
    connect,
    iteration,
    processes,
    run_script,
    status_of,
    tiny_model,
    weights,
)
from tracker_core.values import FineTuningIteration, MetricValue, RunStatus

__all__ = ["clock"]  # completed at the end


def two_workers(backend: BackendUnderTest, **kwargs: Any) -> tuple[ExperimentsManager, ...]:
    """Two managers of one new plugin (``kwargs`` as :func:`connect`'s), in one iteration."""
    plugin = f"plugin-{uuid.uuid4().hex[:8]}"
    workers = (connect(backend, plugin, **kwargs), connect(backend, plugin, **kwargs))
    for worker in workers:
        worker.set_iteration(FineTuningIteration(plugin_name=plugin, batch_id="b"))
    return workers


def test_a_live_run_is_not_handed_to_a_second_worker(backend: BackendUnderTest) -> None:
    a, b = two_workers(backend)
    assert a.set_run(Params(lr=0.1)) is False
    with pytest.raises(RunInUseError) as info:
        b.set_run(Params(lr=0.1))
    assert info.value.run_id == a.current_run_id and info.value.owner == a.tracker.leases.owner
    assert b.current_run_id is None
    a.save_metric(MetricValue("quality", 0.5))
    a.finish_run()
    assert b.set_run(Params(lr=0.1), wait=5) is True  # ended: b skips it


def test_waiting_worker_takes_a_released_run(backend: BackendUnderTest) -> None:
    a, b = two_workers(backend)
    a.set_run(Params(lr=0.1))
    run_id = a.current_run_id
    a.abandon_iteration()  # an interrupt: left unfinished, lease released at once
    assert b.set_run(Params(lr=0.1)) is False and b.current_run_id == run_id


class _HolderEndsAfterTheRead(FaultyProxy):
    """A tracking store whose first run search answers, then ``meanwhile`` runs and more than
    a lease passes before the caller gets the answer: a search retried for long."""

    def __init__(self, target: Any, meanwhile: Any) -> None:
        super().__init__(target)
        self.meanwhile: Any = meanwhile

    def search_runs(self, *args: Any, **kwargs: Any) -> Any:
        found = self._target.search_runs(*args, **kwargs)
        if self.meanwhile is not None:
            self.meanwhile, meanwhile = None, self.meanwhile
            meanwhile()
        return found


def test_a_run_ended_while_its_record_was_read_is_not_trained_again(
    backend: BackendUnderTest, clock: SteppedClock
) -> None:
    """Worker b reads a's run, live under a's lease, and gets the answer more than a lease
    later, after a ended the run and let it go: b's claim of the next lease lands, and the
    run must still count as ended, not as a run to train (chaos seed 14: a run trained
    twice, from a starting model deleted meanwhile)."""
    a, b = two_workers(backend, lease_seconds=LEASE, clock=clock)
    assert a.set_run(Params(lr=0.1)) is False
    run_id = a.current_run_id
    a.save_metric(MetricValue("quality", 0.5))

    def a_ends_later() -> None:
        # past the lease the answer shows; a's heartbeat (every third of it) keeps it alive
        clock.advance(1.5 * LEASE, step=LEASE / 4)
        a.finish_run()

    b.tracking.wrap(lambda store: _HolderEndsAfterTheRead(store, a_ends_later))
    assert b.set_run(Params(lr=0.1)) is True  # ended: nothing to train
    assert b.current_run_id == run_id and status_of(b, run_id or "") == RunStatus.FINISHED


def test_dead_workers_lease_expires_and_run_resumes(
    backend: BackendUnderTest, clock: SteppedClock
) -> None:
    plugin = f"plugin-{uuid.uuid4().hex[:8]}"
    it = FineTuningIteration(plugin_name=plugin, batch_id="b")
    dead = connect(backend, plugin, lease_seconds=LEASE, clock=clock)
    dead.set_iteration(it)
    dead.set_run(Params(lr=0.1))
    run_id = dead.current_run_id
    dead.save_metric(MetricValue("loss", 2.0))
    dead.flush_metrics()
    dead.tracker.runs.forget()  # the process dies: no release, the heartbeat stops
    heir = connect(backend, plugin, lease_seconds=LEASE, clock=clock)
    heir.set_iteration(it)
    assert heir.set_run(Params(lr=0.1), wait=10 * LEASE) is False
    assert heir.current_run_id == run_id
    heir.save_metric(MetricValue("quality", 0.8))
    heir.finish_run()
    assert status_of(heir, run_id or "") == RunStatus.FINISHED


def test_heartbeat_keeps_a_long_run_held(backend: BackendUnderTest, clock: SteppedClock) -> None:
    """A run held longer than its lease time is still not handed over: the heartbeat renews."""
    holder, other = two_workers(backend, lease_seconds=LEASE, clock=clock)
    holder.set_run(Params(lr=0.1))
    clock.advance(2.5 * LEASE, step=LEASE / 4)  # two and a half lifetimes; a beat every third
    with pytest.raises(RunInUseError):
        other.set_run(Params(lr=0.1))
    holder.save_metric(MetricValue("quality", 0.1))
    holder.finish_run()


def test_taken_over_worker_is_told(backend: BackendUnderTest, clock: SteppedClock) -> None:
    """A worker stalled past its lease finds its run taken over: its next call is refused."""
    plugin = f"plugin-{uuid.uuid4().hex[:8]}"
    it = FineTuningIteration(plugin_name=plugin, batch_id="b")
    stalled = connect(backend, plugin, lease_seconds=LEASE, clock=clock)
    stalled.set_iteration(it)
    stalled.set_run(Params(lr=0.1))
    proxy = stalled.tracking.wrap(FaultyProxy)
    proxy.fail("set_tags", error=TransientError("cut off"), times=10_000)  # no renewal lands
    heir = connect(backend, plugin, lease_seconds=LEASE, clock=clock)
    heir.set_iteration(it)
    assert heir.set_run(Params(lr=0.1), wait=10 * LEASE) is False
    heir.save_metric(MetricValue("quality", 0.9))
    with pytest.raises(LeaseLostError):
        stalled.save_metric(MetricValue("quality", 0.1))
    heir.finish_run()
    assert heir.get_run_by_id(heir.get_best_quality()[0] or "") is not None


class _LateClaims:
    """The store under one worker: its next ``times`` lease claims land ``late`` seconds after
    they were sent, as a claim whose write was retried for longer than a lease."""

    def __init__(self, target: Any, clock: SteppedClock, late: float, times: int) -> None:
        self._target, self._clock, self._late, self._times = target, clock, late, times
        self.epochs: list[str] = []  # the epochs of the claims that landed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)

    def log_batch(
        self, run_id: str, metrics: Any = (), params: Any = None, tags: Any = None
    ) -> None:
        claims = [
            k[len(LEASE_CLAIM_PREFIX) :] for k in params or {} if k.startswith(LEASE_CLAIM_PREFIX)
        ]
        if claims and self._times > 0:
            self._times -= 1
            self._clock.advance(self._late)
        self._target.log_batch(run_id, metrics, params, tags)
        self.epochs += claims


def test_a_claim_that_lands_after_its_expiry_is_made_again(
    backend: BackendUnderTest, clock: SteppedClock
) -> None:
    """A claim retried for longer than a lease lands already expired: the worker claims the
    next epoch instead of training under a lease it lost at once (the chaos trial's
    ``LeaseLostError`` at the first metric, 2026-12-04), and holds the run from then on."""
    holder, other = two_workers(backend, lease_seconds=LEASE, clock=clock)
    late = holder.tracking.wrap(lambda store: _LateClaims(store, clock, 1.5 * LEASE, times=1))
    assert holder.set_run(Params(lr=0.1)) is False
    assert late.epochs == ["1", "2"]
    with pytest.raises(RunInUseError):
        other.set_run(Params(lr=0.1))
    holder.save_metric(MetricValue("quality", 0.1))
    clock.advance(2 * LEASE, step=LEASE / 4)  # and the heartbeat keeps the new epoch
    holder.save_metric(MetricValue("quality", 0.2))
    holder.finish_run()
    late_forever = other.tracking.wrap(lambda store: _LateClaims(store, clock, 1.5 * LEASE, 99))
    with pytest.raises(LeaseLostError, match="landed after their expiry"):
        other.set_run(Params(lr=0.2))
    assert late_forever.epochs == ["1", "2", "3"]
    holder.close()
    other.close()


_SAME_PARAMS_STEPS = 20


def _same_params_worker(backend: BackendUnderTest, plugin: str, index: int) -> str:
    """A worker process given the same params as the others (module level: picklable)."""
    mgr = connect(backend, plugin)
    mgr.set_iteration(FineTuningIteration(plugin_name=plugin, batch_id="b"))
    try:
        if mgr.set_run(Params(lr=0.1)):
            return "skipped"
    except RunInUseError:
        return "in use"
    for step in range(_SAME_PARAMS_STEPS):
        mgr.save_metric(MetricValue("loss", float(step), step=step))
    mgr.save_metric(MetricValue("quality", float(index)))
    mgr.save_model(tiny_model(index))
    mgr.finish_run()
    mgr.close()
    return f"trained {index}"


def test_same_params_in_several_processes_train_once(backend: BackendUnderTest) -> None:
    if "processes" not in backend.capabilities:
        pytest.skip("the backend's stores are not shared across processes")
    plugin = f"plugin-{uuid.uuid4().hex[:8]}"
    with processes().Pool(4) as pool:
        outcomes = pool.starmap(_same_params_worker, [(backend, plugin, i) for i in range(4)])
    trained = [o for o in outcomes if o.startswith("trained")]
    assert len(trained) == 1, outcomes
    winner = int(trained[0].split()[1])
    mgr = connect(backend, plugin)
    mgr.set_iteration(FineTuningIteration(plugin_name=plugin, batch_id="b"))
    (run,) = mgr.tracking.search_runs(RunQuery((mgr.current_experiment_id or "",)))
    assert len(mgr.tracking.get_metric_history(run.run_id, "loss")) == _SAME_PARAMS_STEPS
    assert run.metrics["quality"] == float(winner)
    assert weights(mgr.download_model_by_run_id(run.run_id)) == weights(tiny_model(winner))


_KILLED_HOLDER = """
import os, pickle, sys
from tracker_core.testing.support import Params, connect
from tracker_core.values import FineTuningIteration, MetricValue
backend = pickle.loads(bytes.fromhex(sys.argv[1]))
mgr = connect(backend, sys.argv[2], lease_seconds=2.0)
mgr.set_iteration(FineTuningIteration(plugin_name=sys.argv[2], batch_id="b"))
mgr.set_run(Params(lr=0.1))
mgr.save_metric(MetricValue("loss", 1.0, step=0))
mgr.flush_metrics()
print(mgr.current_run_id, flush=True)
os.kill(os.getpid(), 9)
"""


def test_killed_holders_run_resumes_after_its_lease(backend: BackendUnderTest) -> None:
    plugin = f"plugin-{uuid.uuid4().hex[:8]}"
    done = run_script(backend, _KILLED_HOLDER, plugin, cwd=os.getcwd())
    assert done.returncode == -9, done.stderr
    run_id = done.stdout.split()[-1]
    heir = connect(backend, plugin, lease_seconds=2.0)
    heir.set_iteration(FineTuningIteration(plugin_name=plugin, batch_id="b"))
    assert heir.set_run(Params(lr=0.1), wait=math.inf) is False  # once the lease expired
    assert heir.current_run_id == run_id
    heir.save_metric(MetricValue("loss", 0.5, step=1))
    heir.save_metric(MetricValue("quality", 0.5))
    heir.finish_run()
    history = heir.tracking.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5)]


def test_run_whose_creator_died_before_its_params_is_resumed(
    backend: BackendUnderTest, clock: SteppedClock
) -> None:
    """A worker killed between creating a run and logging its params leaves a bare run; once
    its creation grace (one lease time) has passed, the same params find it, complete it and
    train it."""
    mgr = connect(backend, f"plugin-{uuid.uuid4().hex[:8]}", lease_seconds=LEASE, clock=clock)
    mgr.set_iteration(iteration(mgr))
    params = Params(lr=0.1)
    bare = mgr.tracking.create_run(mgr.current_experiment_id or "", params.id, {})
    assert mgr.set_run(params, wait=10 * LEASE) is False and mgr.current_run_id == bare.run_id
    run = mgr.get_run_by_id(bare.run_id)
    assert run is not None and Params.from_mlflow(run.params) == params
    mgr.save_metric(MetricValue("quality", 0.5))
    mgr.finish_run()
    assert mgr.get_top_params_by_experiment_id(mgr.current_experiment_id or "") == [params]


class _TwinDeletedByItsCreator(FaultyProxy):
    """A tracking store where the run ``loser`` is deleted just before this worker's first
    write to it, and an ``heir`` run of the same name created: what the worker sees when it
    found the younger of two twins and that twin's creator then saw the older one."""

    def __init__(self, target: Any, loser: str) -> None:
        super().__init__(target)
        self.loser, self.heir = loser, ""

    def log_batch(self, run_id: str, *args: Any, **kwargs: Any) -> Any:
        if run_id == self.loser and not self.heir:
            found = self._target.get_run(run_id)
            self.heir = self._target.create_run(found.experiment_id, found.run_name, {}).run_id
            self._target.delete_run(run_id)
        return self._target.log_batch(run_id, *args, **kwargs)


def test_run_deleted_as_it_is_taken_is_looked_up_again(
    backend: BackendUnderTest, clock: SteppedClock
) -> None:
    """Two workers that create a params set's run at once keep one run (the older, when
    neither was taken yet); the other one's creator deletes its own. A third worker that
    found that one meanwhile looks again and takes the kept one (a CI failure of the
    4-process test above)."""
    mgr = connect(backend, f"plugin-{uuid.uuid4().hex[:8]}", lease_seconds=LEASE, clock=clock)
    mgr.set_iteration(iteration(mgr))
    params = Params(lr=0.1)
    loser = mgr.tracking.create_run(mgr.current_experiment_id or "", params.id, {})
    proxy = mgr.tracking.wrap(lambda store: _TwinDeletedByItsCreator(store, loser.run_id))
    assert mgr.set_run(params, wait=10 * LEASE) is False
    assert proxy.heir and mgr.current_run_id == proxy.heir
    mgr.save_metric(MetricValue("quality", 0.5))
    mgr.finish_run()
    (run,) = mgr.tracking.search_runs(RunQuery((mgr.current_experiment_id or "",)))
    assert run.run_id == proxy.heir and run.status is RunStatus.FINISHED
    assert Params.from_mlflow(run.params) == params


class _Unseen(FaultyProxy):
    """A tracking store whose searches do not show the runs in ``unseen``: their create
    requests have not landed yet, as this worker sees it."""

    def __init__(self, target: Any) -> None:
        super().__init__(target)
        self.unseen: set[str] = set()

    def search_runs(self, query: RunQuery) -> Any:
        return [r for r in self._target.search_runs(query) if r.run_id not in self.unseen]


class _TwinTakenMeanwhile(FaultyProxy):
    """A tracking store where, once, another worker creates and takes a twin of the run this
    worker just created, without seeing it: right after this worker's ``create_run``
    (``moment="create"``), or just before its lease claim lands (``"claim"``)."""

    def __init__(self, target: Any, moment: str, other: Any) -> None:
        super().__init__(target)
        self.moment, self.other, self.twin = moment, other, ""

    def meanwhile(self, run_id: str) -> None:
        if not self.twin:
            self.twin = self.other(run_id)

    def create_run(self, *args: Any, **kwargs: Any) -> Any:
        run = self._target.create_run(*args, **kwargs)
        if self.moment == "create":
            self.meanwhile(run.run_id)
        return run

    def log_batch(self, run_id: str, *args: Any, **kwargs: Any) -> Any:
        params = args[1] if len(args) > 1 else kwargs.get("params")
        if self.moment == "claim" and any(k.startswith(LEASE_CLAIM_PREFIX) for k in params or {}):
            self.meanwhile(run_id)
        return self._target.log_batch(run_id, *args, **kwargs)


@pytest.mark.parametrize("moment", ["create", "claim"])
def test_a_twin_taken_first_is_the_run(backend: BackendUnderTest, moment: str) -> None:
    """Two workers create a params set's run at once. The first one's run is the older (its
    client's clock), but its create lands after the second worker found no run, created
    its own and took it. Both trained their run (seed 14 of the full-load chaos soak).
    Now the first worker sees the run taken (after its create, or after its claim), deletes
    its own and waits for the other's; one run of the params set remains, trained once."""
    plugin = f"plugin-{uuid.uuid4().hex[:8]}"
    first, second = connect(backend, plugin), connect(backend, plugin)
    first.set_iteration(iteration(first))
    second.set_iteration(iteration(second))
    params = Params(lr=0.1)
    unseen = second.tracking.wrap(_Unseen)

    def other(run_id: str) -> str:
        unseen.unseen.add(run_id)
        assert second.set_run(params) is False  # a new run, to train
        return second.current_run_id or ""

    proxy = first.tracking.wrap(lambda store: _TwinTakenMeanwhile(store, moment, other))
    with pytest.raises(RunInUseError) as info:
        first.set_run(params)  # the second worker holds the run
    assert proxy.twin and info.value.run_id == proxy.twin
    second.save_metric(MetricValue("quality", 0.5))
    second.finish_run()
    assert first.set_run(params) is True  # it ended: nothing to train
    (run,) = first.tracking.search_runs(RunQuery((first.current_experiment_id or "",)))
    assert run.run_id == proxy.twin and run.status is RunStatus.FINISHED
    assert Params.from_mlflow(run.params) == params
    second.close()
    first.close()


__all__ = [*sorted(name for name in globals() if name.startswith("test_")), "clock"]
