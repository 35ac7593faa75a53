"""MlflowTrackingStore against in-process SQLite and a real ``mlflow server`` over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import traceback
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mlflow")

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from tracker_core.errors import TrackingStoreError, TransientError
from tracker_core.retry import Retrier
from tracker_core.stores import ExperimentQuery, RunQuery
from tracker_core.testing.servers import free_port, mlflow_server
from tracker_core.values import MetricValue, RunStatus
from tracker_core_mlflow import (
    MlflowBackend,
    MLflowClientWrapper,
    MlflowTrackingStore,
    TransientTrackingStoreError,
    default_tracking_uri,
)
from tracker_core_mlflow.tracking import batches

HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@pytest.fixture(scope="session", autouse=True)
def _mlflow_http_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in HTTP_ENV.items():
            mp.setenv(key, value)
        yield


@pytest.fixture(scope="session")
def mlflow_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture(params=["sqlite", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> MlflowTrackingStore:
    if request.param == "sqlite":
        return MlflowTrackingStore(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return MlflowTrackingStore(request.getfixturevalue("mlflow_server_url"))


def unique(prefix: str = "exp") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_experiment(store: MlflowTrackingStore, tmp_path: Path, **tags: str) -> str:
    name = unique()
    location = (tmp_path / "artifacts" / name).as_uri()
    return store.create_experiment(name, location, tags).experiment_id


# -- experiments ----------------------------------------------------------------------------


def test_create_get_delete_and_recreate(store: MlflowTrackingStore, tmp_path: Path) -> None:
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


def test_create_reuses_name_deleted_by_another_tool(
    store: MlflowTrackingStore, tmp_path: Path
) -> None:
    name = unique()
    old_id = store.client.create_experiment(name, (tmp_path / "a").as_uri())
    store.client.delete_experiment(old_id)  # plain MLflow delete: the name stays taken
    new = store.create_experiment(name, (tmp_path / "b").as_uri(), {})
    assert new.experiment_id != old_id
    old = store.get_experiment(old_id)
    assert old is not None and old.lifecycle_stage == "deleted" and old.name != name


def test_racing_create_returns_the_existing_experiment(
    store: MlflowTrackingStore, tmp_path: Path
) -> None:
    name, location = unique(), (tmp_path / "a").as_uri()
    with ThreadPoolExecutor(8) as pool:
        ids = set(
            pool.map(lambda _: store.create_experiment(name, location, {}).experiment_id, range(8))
        )
    assert len(ids) == 1

    # Deterministic loss of the race: the name looks free, then creation conflicts.
    other = unique()
    winner = store.client.create_experiment(other, location)
    real = store.client.get_experiment_by_name
    calls: list[str] = []

    def stale_once(n: str) -> Any:
        calls.append(n)
        return None if len(calls) == 1 else real(n)

    store.client.get_experiment_by_name = stale_once  # type: ignore[method-assign]
    try:
        assert store.create_experiment(other, location, {}).experiment_id == winner
    finally:
        del store.client.get_experiment_by_name
    assert len(calls) == 2


def test_search_experiments(store: MlflowTrackingStore, tmp_path: Path) -> None:
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
    before = [
        e
        for e in store.iter_experiments(
            ExperimentQuery(tags={"group": group}, created_before_ms=cutoff)
        )
    ]
    assert all(e.creation_time_ms < cutoff for e in before)
    assert {e.experiment_id for e in before} <= {c.experiment_id for c in created[:2]}

    store.delete_experiment(created[1].experiment_id)
    remaining = [e.experiment_id for e in store.iter_experiments(query)]
    assert created[1].experiment_id not in remaining and len(remaining) == 4


@pytest.mark.parametrize("value", ["it's", 'say "hi"', "both ' and \"", "back\\slash\\"])
def test_search_experiments_quoting(store: MlflowTrackingStore, tmp_path: Path, value: str) -> None:
    group = unique("group")
    match = store.create_experiment(unique(), (tmp_path / "m").as_uri(), {"q": value, "g": group})
    store.create_experiment(unique(), (tmp_path / "n").as_uri(), {"q": "plain", "g": group})
    found = list(store.iter_experiments(ExperimentQuery(tags={"q": value, "g": group})))
    assert [e.experiment_id for e in found] == [match.experiment_id]


# -- runs ---------------------------------------------------------------------------------


@pytest.fixture
def runs(store: MlflowTrackingStore, tmp_path: Path) -> dict[str, Any]:
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


def names(store: MlflowTrackingStore, **kw: Any) -> list[str]:
    return [r.run_name for r in store.search_runs(RunQuery(**kw))]


def test_search_runs_filters(store: MlflowTrackingStore, runs: dict[str, Any]) -> None:
    exp = (runs["exp"],)
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


def test_search_runs_order_and_limit(store: MlflowTrackingStore, runs: dict[str, Any]) -> None:
    exp = (runs["exp"],)
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


def test_get_run_and_record(store: MlflowTrackingStore, runs: dict[str, Any]) -> None:
    record = store.get_run(runs["ids"]["a"])
    assert record is not None
    assert record.run_name == "a" and record.status == RunStatus.FINISHED
    assert record.metrics == {"m": 1.0} and record.params == {"lr": "0.1"}
    assert record.tags["kind"] == "x" and record.end_time_ms is not None
    assert record.experiment_id == runs["exp"] and record.artifact_uri.endswith("/artifacts")
    assert store.get_run(uuid.uuid4().hex) is None
    store.delete_run(runs["ids"]["e"])
    assert store.get_run(runs["ids"]["e"]) is None


# -- logging --------------------------------------------------------------------------------


def test_batches_respect_mlflow_limits() -> None:
    metrics = [Metric(f"m{i}", 1.0, 1, 0) for i in range(2500)]
    params = [object()] * 150
    tags = [object()] * 120
    chunks = list(batches(metrics, params, tags))  # type: ignore[arg-type]
    assert sum(len(m) for m, _, _ in chunks) == 2500
    assert sum(len(p) for _, p, _ in chunks) == 150
    assert sum(len(t) for _, _, t in chunks) == 120
    for m, p, t in chunks:
        assert len(m) <= 1000 and len(p) <= 100 and len(t) <= 100
        assert len(m) + len(p) + len(t) <= 1000


def test_log_batch_over_limits(store: MlflowTrackingStore, tmp_path: Path) -> None:
    run = store.create_run(make_experiment(store, tmp_path), "big", {})
    metrics = [MetricValue("loss", float(i), step=i, timestamp_ms=1_000 + i) for i in range(2500)]
    metrics += [MetricValue(f"k{i}", 1.0) for i in range(10)]
    params = {f"p{i}": str(i) for i in range(150)}
    tags = {f"t{i}": str(i) for i in range(120)}
    store.log_batch(run.run_id, metrics, params, tags)
    history = store.client.get_metric_history(run.run_id, "loss")
    assert len(history) == 2500
    record = store.get_run(run.run_id)
    assert record is not None
    assert record.metrics["loss"] == 2499.0 and len(record.params) == 150
    assert all(record.tags[f"t{i}"] == str(i) for i in range(120))


def test_log_batch_is_idempotent(store: MlflowTrackingStore, tmp_path: Path) -> None:
    run = store.create_run(make_experiment(store, tmp_path), "dup", {})
    batch = [MetricValue("acc", 0.5 + i / 10, step=i) for i in range(3)]
    batch.append(MetricValue("no_step", 1.0))
    store.log_batch(run.run_id, batch)
    store.log_batch(run.run_id, batch)  # a retried request
    store.log_batch(run.run_id, [*batch, *batch])  # duplicates inside one request
    history = store.client.get_metric_history(run.run_id, "acc")
    assert sorted((m.step, m.value, m.timestamp) for m in history) == sorted(
        (m.step, m.value, m.timestamp_ms) for m in batch[:3]
    )
    assert [m.step for m in store.client.get_metric_history(run.run_id, "no_step")] == [0]


def test_params_round_trip(store: MlflowTrackingStore, tmp_path: Path) -> None:
    run = store.create_run(make_experiment(store, tmp_path), "params", {})
    params = {"lr": "0.001", "layers": "[1, 2]", "name": 'it\'s "quoted"', "empty": ""}
    store.log_batch(run.run_id, params=params)
    store.log_batch(run.run_id, params=params)  # same values again: fine
    record = store.get_run(run.run_id)
    assert record is not None and dict(record.params) == params
    with pytest.raises(TrackingStoreError) as info:
        store.log_batch(run.run_id, params={"lr": "0.5"})
    assert "log_batch" in str(info.value)
    assert store.classify_error(info.value) is False
    assert not Retrier().with_classifiers(store.classify_error).is_transient(info.value)


def test_tags_and_delete_tag(store: MlflowTrackingStore, tmp_path: Path) -> None:
    run = store.create_run(make_experiment(store, tmp_path), "tags", {"a": "1"})
    store.set_tags(run.run_id, {"b": "2"})
    store.delete_tag(run.run_id, "a")
    store.delete_tag(run.run_id, "a")  # absent: no error
    store.delete_tag(run.run_id, "never")
    record = store.get_run(run.run_id)
    assert record is not None and "a" not in record.tags and record.tags["b"] == "2"
    with pytest.raises(TrackingStoreError):
        store.delete_tag(uuid.uuid4().hex, "a")


# -- errors ---------------------------------------------------------------------------------


def test_dead_server_is_transient_and_password_is_redacted() -> None:
    port = free_port()  # nothing listens there
    dead = MlflowTrackingStore(f"http://user:sentinelpw@127.0.0.1:{port}")
    assert "sentinelpw" not in repr(dead)
    with pytest.raises(TrackingStoreError) as info:
        dead.get_experiment("1")
    err = info.value
    assert isinstance(err, TransientTrackingStoreError) and isinstance(err, TransientError)
    assert dead.classify_error(err) is True
    assert dead.classify_error(err.__cause__) is True  # type: ignore[arg-type]
    assert "get_experiment" in str(err) and f"127.0.0.1:{port}" in str(err)
    assert "sentinelpw" not in str(err)
    assert "sentinelpw" not in "".join(traceback.format_exception(err))

    from tracker_core.errors import MaxAttemptsReachedException
    from tracker_core.retry import RetryConfig, RetryParams

    retrier = Retrier(RetryConfig(RetryParams(max_attempts=2, wait_time_seconds=0)))
    retrier = retrier.with_classifiers(dead.classify_error)
    with pytest.raises(MaxAttemptsReachedException) as exhausted:
        retrier.call("search", dead.get_run, "abc")
    assert exhausted.value.attempts == 2
    assert "sentinelpw" not in "".join(traceback.format_exception(exhausted.value))


def test_bad_request_is_permanent(store: MlflowTrackingStore) -> None:
    with pytest.raises(MlflowException) as raw:
        store.client.search_runs(["0"], filter_string="this is not a filter")
    assert store.classify_error(raw.value) is False
    with pytest.raises(TrackingStoreError) as info:
        store.create_run("987654321", "r", {})
    assert not isinstance(info.value, TransientError)
    assert store.classify_error(info.value) is False


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (RestException({"error_code": "INTERNAL_ERROR", "message": "boom"}), True),
        (RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "x"}), True),
        (RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "x"}), True),
        (RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "x"}), False),
        (RestException({"error_code": "RESOURCE_ALREADY_EXISTS", "message": "x"}), False),
        (RestException({"error_code": "PERMISSION_DENIED", "message": "x"}), False),
        (MlflowException("x", error_code=INVALID_PARAMETER_VALUE), False),
        (MlflowException("API request to endpoint /x failed with error code 502 != 200"), True),
        (MlflowException("API request to endpoint /x failed with error code 429 != 200"), True),
        (MlflowException("API request to endpoint /x failed with error code 404 != 200"), False),
        (MlflowException("some local bug"), None),
        # chaos seed 9: a retried log_batch raced its first attempt, still running on the server
        (
            RestException(
                {
                    "error_code": "BAD_REQUEST",
                    "message": "(raised as a result of Query-invoked autoflush; consider using a "
                    "session.no_autoflush block if this flush is occurring prematurely)\n"
                    "(psycopg.errors.UniqueViolation) duplicate key value violates unique "
                    'constraint "metric_pk"',
                }
            ),
            True,
        ),
        (ValueError("(sqlite3.IntegrityError) UNIQUE constraint failed: params.key, p"), True),
        (RestException({"error_code": "BAD_REQUEST", "message": 'dup "experiment_pk"'}), False),
        (ValueError("x"), None),
    ],
)
def test_classify_error_table(exc: BaseException, expected: bool | None) -> None:
    assert MlflowTrackingStore("sqlite:///:memory:").classify_error(exc) is expected


def test_classify_locked_database() -> None:
    import requests
    from sqlalchemy.exc import OperationalError

    classify = MlflowTrackingStore("sqlite:///:memory:").classify_error
    assert classify(OperationalError("INSERT", {}, Exception("database is locked"))) is True
    assert classify(requests.exceptions.ConnectionError("refused")) is True
    assert classify(requests.exceptions.ReadTimeout("slow")) is True


# -- concurrency ----------------------------------------------------------------------------


def test_two_sqlite_stores_in_two_threads(tmp_path: Path) -> None:
    stores = [MlflowTrackingStore(f"sqlite:///{tmp_path / f'db{i}.db'}") for i in range(2)]
    barrier = threading.Barrier(2)

    def work(i: int) -> list[str]:
        store = stores[i]
        barrier.wait()
        exp = store.create_experiment("shared name", (tmp_path / f"a{i}").as_uri(), {"i": str(i)})
        out = []
        for j in range(5):
            run = store.create_run(exp.experiment_id, f"s{i}-r{j}", {})
            store.log_batch(run.run_id, [MetricValue("m", float(i * 10 + j))], {"i": str(i)})
            out.append(run.run_id)
        return out

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(work, range(2)))
    for i, store in enumerate(stores):
        exp = store.get_experiment_by_name("shared name")
        assert exp is not None and exp.tags["i"] == str(i)
        found = store.search_runs(RunQuery((exp.experiment_id,), order_by_metric="m"))
        assert [r.run_id for r in found] == list(reversed(results[i]))
        assert {r.params["i"] for r in found} == {str(i)}


# -- model format, backend, wrapper ------------------------------------------------------------


def test_mlflow_pytorch_codec_loads_from_runs_uri(
    store: MlflowTrackingStore, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    from tracker_core.codecs import get_codec

    codec = get_codec("mlflow.pytorch")
    run = store.create_run(make_experiment(store, tmp_path), "model", {})
    model_dir = Path(run.artifact_uri.removeprefix("file://")) / "model"
    model_dir.mkdir(parents=True)
    model = torch.nn.Linear(3, 2)
    codec.save(model, model_dir, ["numpy"])
    requirements = (model_dir / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") and "+" not in r for r in requirements)
    assert "numpy" in requirements

    loaded = codec.load(model_dir)
    x = torch.ones(1, 3)
    assert torch.equal(loaded(x), model(x))

    script = (
        "import sys, mlflow.pytorch, torch\n"
        "m = mlflow.pytorch.load_model(sys.argv[1])\n"
        "print(float(m(torch.ones(1, 3)).sum()))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri, **HTTP_ENV}
    out = subprocess.run(
        [sys.executable, "-c", script, f"runs:/{run.run_id}/model"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=tmp_path,
    )
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(model(x).sum().item())


def test_codec_refuses_non_empty_directory(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from tracker_core.errors import ConfigurationError
    from tracker_core_mlflow import MlflowPytorchCodec

    (tmp_path / "junk").write_text("x")
    with pytest.raises(ConfigurationError):
        MlflowPytorchCodec().save(torch.nn.Linear(1, 1), tmp_path)


def test_backend_and_wrapper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tracker_core.registry import Backend
    from tracker_core.retry import RetryConfig, RetryParams

    class Local(MlflowBackend):
        def artifact_store(self, artifact_uri: str, **kw: Any) -> Any:
            raise NotImplementedError

    uri = f"sqlite:///{tmp_path / 'w.db'}"
    backend = Local()
    assert isinstance(backend, Backend) and backend.default_model_format == "mlflow.pytorch"
    assert isinstance(backend.tracking_store(uri, retrier=Retrier()), MlflowTrackingStore)

    config = RetryConfig(RetryParams(max_attempts=2))
    wrapper = MLflowClientWrapper(uri, requirements=["numpy"], retry_config=config)
    assert wrapper.tracking_uri == uri and wrapper.requirements == ["numpy"]
    assert wrapper.retry_config == config
    assert wrapper.tracking_store is wrapper.tracking_store
    assert wrapper.client is wrapper.tracking_store.client
    assert MLflowClientWrapper(uri).retry_config == RetryConfig()

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert default_tracking_uri() == "http://example:5000"
