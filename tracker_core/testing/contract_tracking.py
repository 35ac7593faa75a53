"""The tracking-store contract: what :class:`~tracker_core.stores.TrackingStore` promises and
the six invariants (DESIGN.md) rely on, checked on the store itself, on every tracking backend.

- experiments: names freed by deletion and created again (cleanup, invariant 3), a racing
  create returns the one experiment, searches filter by tags, names and creation time,
  newest first, in pages (iterations and "previous", invariant 3);
- runs: searches filter by status, tags, params, name and metric, ordered by a metric with
  the runs without it last (ranking, invariant 1); deleted runs are gone (twins, invariant 2);
- logging: batches of any size; metrics idempotent (a retried batch counts once,
  invariant 5); params write-once, and of two writers of one new key exactly one wins (the
  lease arbiter, invariant 2); tags set and deleted;
- one store serves many threads (invariant 4); errors are typed and a refusal is not
  transient (invariants 5-6).

Each test takes the ``tracking_store`` fixture (defined here, from a ``tracking_backend``
fixture that yields a :class:`~tracker_core.testing.harness.BackendUnderTest` on the tracking
store under test; its artifact side does not matter)::

    from tracker_core.testing.contract_tracking import *  # noqa: F403
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tracker_core.errors import TrackingStoreError, TransientError
from tracker_core.retry import Retrier
from tracker_core.stores import ExperimentQuery, RunQuery, TrackingStore
from tracker_core.testing.harness import FAST_RETRY, BackendUnderTest
from tracker_core.values import MetricValue, RunStatus

__all__ = ["tracking_store"]  # completed at the end


@pytest.fixture
def tracking_store(tracking_backend: BackendUnderTest) -> Iterator[TrackingStore]:
    """The tracking store of ``tracking_backend``, as its backend makes it (no retries)."""
    with tracking_backend.stores() as (store, _):
        yield store


def unique(prefix: str = "exp") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_experiment(store: TrackingStore, tmp_path: Path, **tags: str) -> str:
    name = unique()
    return store.create_experiment(
        name, (tmp_path / "artifacts" / name).as_uri(), tags
    ).experiment_id


# -- experiments ----------------------------------------------------------------------------
def test_create_get_delete_and_recreate(tracking_store: TrackingStore, tmp_path: Path) -> None:
    store = tracking_store
    name, location = unique(), (tmp_path / "a").as_uri()
    created = store.create_experiment(name, location, {"k": "v"})
    assert created.name == name and created.tags["k"] == "v"
    assert created.artifact_location == location and created.lifecycle_stage == "active"
    assert store.get_experiment(created.experiment_id) == created
    assert store.get_experiment_by_name(name) == created

    store.delete_experiment(created.experiment_id)
    store.delete_experiment(created.experiment_id)  # idempotent
    assert store.get_experiment_by_name(name) is None
    deleted = store.get_experiment(created.experiment_id)
    assert deleted is not None and deleted.lifecycle_stage == "deleted"
    assert deleted.name == f"{name} (deleted {created.experiment_id})"

    again = store.create_experiment(name, (tmp_path / "b").as_uri(), {})
    assert again.experiment_id != created.experiment_id and again.name == name
    assert store.get_experiment("999999999") is None


def test_racing_create_returns_the_existing_experiment(
    tracking_store: TrackingStore, tmp_path: Path
) -> None:
    name, location = unique(), (tmp_path / "a").as_uri()
    with ThreadPoolExecutor(8) as pool:
        ids = set(
            pool.map(
                lambda _: tracking_store.create_experiment(name, location, {}).experiment_id,
                range(8),
            )
        )
    assert len(ids) == 1


def test_search_experiments(tracking_store: TrackingStore, tmp_path: Path) -> None:
    store = tracking_store
    group = unique("group")
    created = [
        store.create_experiment(unique(), (tmp_path / str(i)).as_uri(), {"group": group})
        for i in range(5)
    ]
    store.create_experiment(unique(), (tmp_path / "x").as_uri(), {"group": "other"})
    newest_first = [e.experiment_id for e in reversed(created)]

    query = ExperimentQuery(tags={"group": group})
    page, token = store.search_experiments(query, 10)
    assert [e.experiment_id for e in page] == newest_first and token is None

    paged = list(store.iter_experiments(query, page_size=2))
    assert [e.experiment_id for e in paged] == newest_first

    page, token = store.search_experiments(query, 2)
    assert len(page) == 2 and token

    excluded = ExperimentQuery(
        tags={"group": group}, exclude_names=(created[0].name, created[4].name)
    )
    assert [e.experiment_id for e in store.iter_experiments(excluded)] == newest_first[1:4]

    cutoff = created[2].creation_time_ms
    before = list(
        store.iter_experiments(ExperimentQuery(tags={"group": group}, created_before_ms=cutoff))
    )
    assert all(e.creation_time_ms < cutoff for e in before)
    assert {e.experiment_id for e in before} <= {c.experiment_id for c in created[:2]}

    store.delete_experiment(created[1].experiment_id)
    remaining = [e.experiment_id for e in store.iter_experiments(query)]
    assert created[1].experiment_id not in remaining and len(remaining) == 4


@pytest.mark.parametrize("value", ["it's", 'say "hi"', "both ' and \"", "back\\slash\\"])
def test_search_experiments_quoting(
    tracking_store: TrackingStore, tmp_path: Path, value: str
) -> None:
    store = tracking_store
    group = unique("group")
    match = store.create_experiment(unique(), (tmp_path / "m").as_uri(), {"q": value, "g": group})
    store.create_experiment(unique(), (tmp_path / "n").as_uri(), {"q": "plain", "g": group})
    found = list(store.iter_experiments(ExperimentQuery(tags={"q": value, "g": group})))
    assert [e.experiment_id for e in found] == [match.experiment_id]


def test_experiment_tag_is_set_and_overwritten(
    tracking_store: TrackingStore, tmp_path: Path
) -> None:
    experiment_id = make_experiment(tracking_store, tmp_path, k="old")
    tracking_store.set_experiment_tag(experiment_id, "k", "new")
    tracking_store.set_experiment_tag(experiment_id, "other", "x")
    found = tracking_store.get_experiment(experiment_id)
    assert found is not None and found.tags["k"] == "new" and found.tags["other"] == "x"


# -- runs ---------------------------------------------------------------------------------
@pytest.fixture
def runs(tracking_store: TrackingStore, tmp_path: Path) -> dict[str, Any]:
    """Five runs of one experiment (statuses, metric ``m``, params, tags) and a deleted one."""
    store = tracking_store
    exp = make_experiment(store, tmp_path)
    spec = {
        "a": (RunStatus.FINISHED, 1.0, {"lr": "0.1"}, {"kind": "x"}),
        "b": (RunStatus.FAILED, 3.0, {"lr": "0.2"}, {"kind": "y"}),
        "c": (RunStatus.RUNNING, None, {"lr": "0.1"}, {"kind": "x"}),
        "d": (RunStatus.KILLED, 2.0, {"lr": "it's"}, {"kind": "x"}),
        "e": (RunStatus.FINISHED, 0.5, {"lr": "0.3"}, {"kind": "z"}),
    }
    ids: dict[str, str] = {}
    for name, (status, metric, params, tags) in spec.items():
        run = store.create_run(exp, name, tags)
        metrics = [MetricValue("m", metric, step=0)] if metric is not None else []
        store.log_batch(run.run_id, metrics, params)
        if status != RunStatus.RUNNING:
            store.set_terminated(run.run_id, status)
        ids[name] = run.run_id
    deleted = store.create_run(exp, "deleted", {"kind": "x"})
    store.log_batch(deleted.run_id, [MetricValue("m", 100.0)])
    store.delete_run(deleted.run_id)
    return {"exp": exp, "ids": ids}


def names(store: TrackingStore, **kw: Any) -> list[str]:
    return [r.run_name for r in store.search_runs(RunQuery(**kw))]


def test_search_runs_filters(tracking_store: TrackingStore, runs: dict[str, Any]) -> None:
    store, exp = tracking_store, (runs["exp"],)
    assert sorted(names(store, experiment_ids=exp)) == ["a", "b", "c", "d", "e"]
    assert sorted(names(store, experiment_ids=exp, statuses=[RunStatus.FINISHED])) == ["a", "e"]
    assert sorted(
        names(store, experiment_ids=exp, statuses=[RunStatus.FAILED, RunStatus.KILLED])
    ) == ["b", "d"]
    every = list(RunStatus)
    assert len(names(store, experiment_ids=exp, statuses=every)) == 5
    assert sorted(names(store, experiment_ids=exp, tags={"kind": "x"})) == ["a", "c", "d"]
    assert sorted(names(store, experiment_ids=exp, params={"lr": "0.1"})) == ["a", "c"]
    assert names(store, experiment_ids=exp, params={"lr": "it's"}) == ["d"]
    assert names(store, experiment_ids=exp, run_name="b") == ["b"]
    assert sorted(names(store, experiment_ids=exp, has_metric="m")) == ["a", "b", "d", "e"]
    assert names(store, experiment_ids=exp, has_metric="nope") == []
    assert names(
        store,
        experiment_ids=exp,
        tags={"kind": "x"},
        params={"lr": "0.1"},
        statuses=[RunStatus.FINISHED],
        run_name="a",
        has_metric="m",
    ) == ["a"]
    assert store.has_runs(runs["exp"], [RunStatus.KILLED])
    assert not store.has_runs(runs["exp"], [RunStatus.SCHEDULED])
    assert store.search_runs(RunQuery(())) == []


def test_search_runs_order_and_limit(tracking_store: TrackingStore, runs: dict[str, Any]) -> None:
    store, exp = tracking_store, (runs["exp"],)
    assert names(store, experiment_ids=exp, order_by_metric="m") == ["b", "d", "a", "e", "c"]
    assert names(store, experiment_ids=exp, order_by_metric="m", ascending=True) == [
        "e",
        "a",
        "d",
        "b",
        "c",
    ]  # runs without the metric come last in both directions
    assert names(store, experiment_ids=exp, order_by_metric="m", max_results=2) == ["b", "d"]
    assert names(
        store,
        experiment_ids=exp,
        order_by_metric="m",
        ascending=True,
        max_results=1,
        statuses=[RunStatus.FINISHED, RunStatus.FAILED],
    ) == ["e"]
    assert len(names(store, experiment_ids=exp, max_results=3)) == 3
    assert names(store, experiment_ids=exp, max_results=0) == []


def test_get_run_and_record(tracking_store: TrackingStore, runs: dict[str, Any]) -> None:
    store = tracking_store
    record = store.get_run(runs["ids"]["a"])
    assert record is not None
    assert record.run_name == "a" and record.status == RunStatus.FINISHED
    assert record.metrics == {"m": 1.0} and record.params == {"lr": "0.1"}
    assert record.tags["kind"] == "x" and record.end_time_ms is not None
    assert record.experiment_id == runs["exp"] and record.start_time_ms > 0
    assert store.get_run(uuid.uuid4().hex) is None
    store.delete_run(runs["ids"]["e"])
    assert store.get_run(runs["ids"]["e"]) is None
    assert "e" not in names(store, experiment_ids=(runs["exp"],))


# -- logging --------------------------------------------------------------------------------
def test_log_batch_of_any_size(tracking_store: TrackingStore, tmp_path: Path) -> None:
    store = tracking_store
    run = store.create_run(make_experiment(store, tmp_path), "big", {})
    metrics = [MetricValue("loss", float(i), step=i, timestamp_ms=1_000 + i) for i in range(2500)]
    metrics += [MetricValue(f"k{i}", 1.0) for i in range(10)]
    params = {f"p{i}": str(i) for i in range(150)}
    tags = {f"t{i}": str(i) for i in range(120)}
    store.log_batch(run.run_id, metrics, params, tags)
    history = store.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(i, float(i)) for i in range(2500)]
    record = store.get_run(run.run_id)
    assert record is not None
    assert record.metrics["loss"] == 2499.0 and len(record.params) == 150
    assert all(record.tags[f"t{i}"] == str(i) for i in range(120))


def test_log_batch_is_idempotent(tracking_store: TrackingStore, tmp_path: Path) -> None:
    """A retried batch (or one repeating values) records each value once: invariant 5."""
    store = tracking_store
    run = store.create_run(make_experiment(store, tmp_path), "dup", {})
    batch = [MetricValue("acc", 0.5 + i / 10, step=i) for i in range(3)]
    batch.append(MetricValue("no_step", 1.0))
    store.log_batch(run.run_id, batch)
    store.log_batch(run.run_id, batch)  # a retried request
    store.log_batch(run.run_id, [*batch, *batch])  # duplicates inside one request
    history = store.get_metric_history(run.run_id, "acc")
    assert [(m.step, m.value, m.timestamp_ms) for m in history] == [
        (m.step, m.value, m.timestamp_ms) for m in batch[:3]
    ]
    assert [m.step for m in store.get_metric_history(run.run_id, "no_step")] == [0]


def test_metric_history_is_in_step_order(tracking_store: TrackingStore, tmp_path: Path) -> None:
    """A resumed run logs the steps after the ones its dead worker logged: the history reads
    in step order, whatever order the batches came in."""
    store = tracking_store
    run = store.create_run(make_experiment(store, tmp_path), "steps", {})
    store.log_batch(run.run_id, [MetricValue("loss", 0.5, step=2, timestamp_ms=3_000)])
    store.log_batch(run.run_id, [MetricValue("loss", 0.9, step=0, timestamp_ms=1_000)])
    store.log_batch(run.run_id, [MetricValue("loss", 0.7, step=1, timestamp_ms=2_000)])
    history = store.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.7), (2, 0.5)]
    assert store.get_metric_history(run.run_id, "never") == []


def test_params_are_write_once(tracking_store: TrackingStore, tmp_path: Path) -> None:
    store = tracking_store
    run = store.create_run(make_experiment(store, tmp_path), "params", {})
    params = {"lr": "0.001", "layers": "[1, 2]", "name": 'it\'s "quoted"', "empty": ""}
    store.log_batch(run.run_id, params=params)
    store.log_batch(run.run_id, params=params)  # same values again: fine
    record = store.get_run(run.run_id)
    assert record is not None and dict(record.params) == params
    with pytest.raises(TrackingStoreError) as info:
        store.log_batch(run.run_id, params={"lr": "0.5"})
    assert "log_batch" in str(info.value)
    assert not Retrier().with_classifiers(store.classify_error).is_transient(info.value)
    record = store.get_run(run.run_id)
    assert record is not None and record.params["lr"] == "0.001"


def test_one_of_two_writers_of_a_new_param_wins(
    tracking_store: TrackingStore, tmp_path: Path
) -> None:
    """Workers racing to write one new param (a lease claim, ``lease.claim:<epoch>``), each
    through the retry policy: exactly one succeeds, every other one is refused for good,
    and the param holds the winner's value. Leases rely on it (invariant 2)."""
    store = tracking_store
    retrier = Retrier(FAST_RETRY).with_classifiers(store.classify_error)
    experiment = make_experiment(store, tmp_path)
    for attempt in range(3):
        run = store.create_run(experiment, f"claimed-{attempt}", {})
        barrier = threading.Barrier(4)

        def claim(worker: int, run_id: str = run.run_id, barrier: Any = barrier) -> str | None:
            barrier.wait()
            try:
                retrier.call("log_batch", store.log_batch, run_id, (), {"claim": f"w{worker}"})
            except TrackingStoreError as exc:
                assert not isinstance(exc, TransientError), exc
                return None
            return f"w{worker}"

        with ThreadPoolExecutor(4) as pool:
            winners = [w for w in pool.map(claim, range(4)) if w is not None]
        assert len(winners) == 1, winners
        record = store.get_run(run.run_id)
        assert record is not None and record.params["claim"] == winners[0]


def test_tags_and_delete_tag(tracking_store: TrackingStore, tmp_path: Path) -> None:
    store = tracking_store
    run = store.create_run(make_experiment(store, tmp_path), "tags", {"a": "1"})
    store.set_tags(run.run_id, {"b": "2"})
    store.set_tags(run.run_id, {"b": "3"})  # tags, unlike params, are overwritten
    store.delete_tag(run.run_id, "a")
    store.delete_tag(run.run_id, "a")  # absent: no error
    store.delete_tag(run.run_id, "never")
    record = store.get_run(run.run_id)
    assert record is not None and "a" not in record.tags and record.tags["b"] == "3"
    with pytest.raises(TrackingStoreError):
        store.delete_tag(uuid.uuid4().hex, "a")


def test_set_terminated_ends_a_run(tracking_store: TrackingStore, tmp_path: Path) -> None:
    store = tracking_store
    run = store.create_run(make_experiment(store, tmp_path), "ends", {})
    assert run.status == RunStatus.RUNNING and run.end_time_ms is None
    store.set_terminated(run.run_id, RunStatus.FAILED)
    ended = store.get_run(run.run_id)
    assert ended is not None and ended.status == RunStatus.FAILED and ended.end_time_ms
    assert ended.status.is_terminal


# -- errors and threads ---------------------------------------------------------------------
def test_refusals_are_typed_and_permanent(tracking_store: TrackingStore) -> None:
    """A request the store refuses (no such experiment) raises a TrackingStoreError that is not
    transient: failures are loud and typed (invariant 6), and not retried (invariant 5)."""
    with pytest.raises(TrackingStoreError) as info:
        tracking_store.create_run("987654321", "r", {})
    assert not isinstance(info.value, TransientError)
    assert tracking_store.classify_error(info.value) is not True
    with pytest.raises(TrackingStoreError):
        tracking_store.log_batch(uuid.uuid4().hex, [MetricValue("m", 1.0)])


def log_runs(store: TrackingStore, experiment_id: str, worker: int, count: int) -> list[str]:
    """The ids of ``count`` new runs of ``worker`` (its tag, param ``i``, a rising ``m``)."""
    made = []
    for j in range(count):
        run = store.create_run(experiment_id, f"w{worker}-r{j}", {"worker": str(worker)})
        metrics = [MetricValue("m", float(worker * 10 + j))]
        store.log_batch(run.run_id, metrics, {"i": str(worker)})
        made.append(run.run_id)
    return made


def test_one_store_serves_many_threads(tracking_store: TrackingStore, tmp_path: Path) -> None:
    """Threads sharing one store each see only what they wrote (invariant 4)."""
    store = tracking_store
    experiment = make_experiment(store, tmp_path)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: log_runs(store, experiment, i, 3), range(4)))
    for i, made in enumerate(results):
        query = RunQuery((experiment,), tags={"worker": str(i)}, order_by_metric="m")
        found = store.search_runs(query)
        assert [r.run_id for r in found] == list(reversed(made))
        assert {r.params["i"] for r in found} == {str(i)}


__all__ = [
    *sorted(name for name in globals() if name.startswith("test_")),
    "runs",
    "tracking_store",
]
