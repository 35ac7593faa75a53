"""What only MlflowTrackingStore does, on every tracking store the contract runs on (SQLite in
process, ``mlflow server`` on SQLite and on PostgreSQL: the ``tracking_backend`` fixture):
names MLflow's own client deleted, MLflow's request limits and errors, its model format.
The store contract itself is :mod:`tracker_core.testing.contract_tracking`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

pytest.importorskip("mlflow")

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from tracker_core.errors import ModelNotFoundError, TrackingStoreError, TransientError
from tracker_core.retry import Retrier
from tracker_core.stores import ExperimentQuery, RunQuery
from tracker_core.testing.contract_tracking import log_runs, make_experiment, unique
from tracker_core.testing.harness import BackendUnderTest
from tracker_core.testing.servers import free_port
from tracker_core.values import MetricValue
from tracker_core_mlflow import (
    MlflowBackend,
    MLflowClientWrapper,
    MlflowTrackingStore,
    TransientTrackingStoreError,
    default_tracking_uri,
)
from tracker_core_mlflow.errors import tracking_errors
from tracker_core_mlflow.opening import check_tracking_uri
from tracker_core_mlflow.registry import MlflowRegistryStore
from tracker_core_mlflow.tracking import batches

HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@pytest.fixture(scope="session", autouse=True)
def _mlflow_http_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in HTTP_ENV.items():
            mp.setenv(key, value)
        yield


@pytest.fixture
def store(tracking_backend: BackendUnderTest) -> MlflowTrackingStore:
    return MlflowTrackingStore(tracking_backend.tracking_uri)


# -- experiments ----------------------------------------------------------------------------
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


def test_create_that_loses_the_race_returns_the_winner(
    store: MlflowTrackingStore, tmp_path: Path
) -> None:
    """Deterministic loss of the race (the contract races threads): the name looks free,
    then creation conflicts."""
    location = (tmp_path / "a").as_uri()
    other = unique()  # the contract races threads; here the race is lost for sure
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


# -- searches MLflow's filter language cannot express ------------------------------------------
def test_clauses_mlflow_cannot_quote_are_checked_on_the_answer(
    store: MlflowTrackingStore, tmp_path: Path
) -> None:
    """A value holding both quote kinds has no quoting in MLflow's filter language, nor a key
    holding a backtick: those clauses are checked on the runs (experiments) MLflow returns,
    so a search still finds exactly the matching ones."""
    both = "both ' and \""
    group = unique("group")
    exp = make_experiment(store, tmp_path, g=group)
    match = store.create_run(exp, both, {"t": both})
    store.log_batch(match.run_id, [MetricValue("m", 1.0)], {"p": both})
    other = store.create_run(exp, "plain", {"t": "plain"})
    store.log_batch(other.run_id, [MetricValue("m", 2.0)], {"p": "plain"})

    def names(**kw: Any) -> list[str]:
        return [r.run_name for r in store.search_runs(RunQuery((exp,), **kw))]

    assert names(tags={"t": both}) == [both]
    assert names(params={"p": both}) == [both]
    assert names(run_name=both) == [both]
    # MLflow refuses such keys when they are logged: no run has one
    assert names(tags={"k`x": "v"}) == [] and names(has_metric="k`m") == []
    with pytest.raises(TrackingStoreError, match="cannot order by metric 'k`m': it has a backtick"):
        store.search_runs(RunQuery((exp,), order_by_metric="k`m"))

    odd = store.create_experiment(f"{unique()} {both}", (tmp_path / "odd").as_uri(), {"g": group})
    query = ExperimentQuery(tags={"g": group}, exclude_names=(odd.name,))
    assert [e.experiment_id for e in store.iter_experiments(query)] == [exp]


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


def test_metric_history_skips_nan_values_with_a_warning(
    store: MlflowTrackingStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """MLflow takes NaN from other clients; a MetricValue cannot hold it: skipped, and said."""
    run = store.create_run(make_experiment(store, tmp_path), "nan", {})
    points = [Metric("m", 0.5, 1, 0), Metric("m", float("nan"), 2, 1), Metric("m", 0.7, 3, 2)]
    store.client.log_batch(run.run_id, points, synchronous=True)
    history = store.get_metric_history(run.run_id, "m")
    assert [(v.value, v.step) for v in history] == [(0.5, 0), (0.7, 2)]
    assert f"{run.run_id}: skipped 1 NaN value(s) of metric 'm'" in caplog.text


def test_delete_tag_of_a_deleted_run_is_refused(store: MlflowTrackingStore, tmp_path: Path) -> None:
    run = store.create_run(make_experiment(store, tmp_path), "gone", {"a": "1"})
    store.delete_run(run.run_id)
    with pytest.raises(TrackingStoreError, match="must be in the 'active' state") as info:
        store.delete_tag(run.run_id, "a")
    assert store.classify_error(info.value) is False


# -- errors ---------------------------------------------------------------------------------
def test_an_unopenable_sqlite_database_is_named(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    db = tmp_path / "a-file" / "mlflow.db"
    with pytest.raises(TrackingStoreError) as info:
        MlflowTrackingStore(f"sqlite:///{db}")
    message = str(info.value)
    assert f"cannot open the SQLite tracking database {db}: Not a directory" in message
    assert "check that the path is right" in message


def test_a_plain_path_is_mlflow_s_file_store() -> None:
    for uri in ("./mlruns", "/srv/mlruns", "C:\\mlruns"):
        check_tracking_uri(uri)  # accepted: MLflow reads a path as its file store


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
    assert store.classify_error(info.value) is False  # the contract: not True


def _chained(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (RestException({"error_code": "INTERNAL_ERROR", "message": "boom"}), True),
        (RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "x"}), True),
        (RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "x"}), True),
        (RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "x"}), False),
        (RestException({"error_code": "RESOURCE_ALREADY_EXISTS", "message": "x"}), False),
        (RestException({"error_code": "PERMISSION_DENIED", "message": "x"}), False),
        # codes outside both lists: judged by their HTTP status
        (RestException({"error_code": "RESOURCE_EXHAUSTED", "message": "x"}), True),
        (RestException({"error_code": "ABORTED", "message": "x"}), False),
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
        (requests.exceptions.RetryError("too many 503 error responses"), True),
        (_chained(RuntimeError("wrapped"), TransientError("lost connection")), True),
    ],
)
def test_classify_error_table(exc: BaseException, expected: bool | None) -> None:
    assert MlflowTrackingStore("sqlite:///:memory:").classify_error(exc) is expected


def test_tracking_errors_keep_ours_and_do_not_call_mlflow_s_answer_foreign() -> None:
    ours = TrackingStoreError("already a tracker-core error")
    with pytest.raises(TrackingStoreError) as info, tracking_errors("get_run", "http://h:5000"):
        raise ours
    assert info.value is ours  # not wrapped twice
    # an MLflow error body cut short (not valid JSON): still MLflow's, not a foreign page
    body = '{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Run \'abc\' not fo'
    answer = MlflowException(
        "API request to endpoint /api/2.0/mlflow/runs/get failed with error code 404 != 200. "
        f"Response body: '{body}'"
    )
    with pytest.raises(TrackingStoreError) as info, tracking_errors("get_run", "http://h:5000"):
        raise answer
    assert "RESOURCE_DOES_NOT_EXIST" in str(info.value)
    assert "not MLflow's" not in str(info.value)


def test_classify_locked_database() -> None:
    import requests
    from sqlalchemy.exc import OperationalError

    classify = MlflowTrackingStore("sqlite:///:memory:").classify_error
    assert classify(OperationalError("INSERT", {}, Exception("database is locked"))) is True
    assert classify(requests.exceptions.ConnectionError("refused")) is True
    assert classify(requests.exceptions.ReadTimeout("slow")) is True


# -- model registry -------------------------------------------------------------------------
def test_registry_answers_none_for_what_is_missing_and_refuses_bad_input(
    store: MlflowTrackingStore,
) -> None:
    """What is missing is None (or, to delete, nothing to do); a bad request is a permanent
    TrackingStoreError in MLflow's words."""
    registry = store.open_registry()
    assert repr(registry) == f"MlflowRegistryStore({store.display_uri!r})"
    name = unique("model")
    assert registry.get_version(name, "1") is None  # no such model
    registry.delete_version(name, "1")
    registry.ensure_registered_model(name, {"k": "v"})
    registry.ensure_registered_model(name, {"k": "v"})  # already there
    assert registry.get_version(name, "1") is None  # no such version
    assert registry.get_version_by_alias(name, "champion") is None
    registry.delete_version(name, "1")
    refused = [
        (lambda: registry.get_version(name, "one"), "must be an integer"),
        (lambda: registry.delete_version(name, "one"), "must be an integer"),
        (lambda: registry.get_version_by_alias(name, ""), "alias"),
        (lambda: registry.ensure_registered_model("", {}), "'name'"),
        (lambda: registry.ensure_registered_model(unique("m"), {"k" * 300: "v"}), "250"),
    ]
    for call, rule in refused:
        with pytest.raises(TrackingStoreError, match=rule) as info:
            call()
        assert registry.classify_error(info.value) is False


def test_registry_uri_hides_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    registry = MlflowRegistryStore("http://user:sentinelpw@127.0.0.1:9")
    assert "sentinelpw" not in repr(registry) and "127.0.0.1:9" in repr(registry)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:///elsewhere.db")
    assert MlflowRegistryStore("sqlite:///here.db").uri == "sqlite:///elsewhere.db"


# -- concurrency ----------------------------------------------------------------------------


def test_two_sqlite_stores_in_two_threads(tmp_path: Path) -> None:
    stores = [MlflowTrackingStore(f"sqlite:///{tmp_path / f'db{i}.db'}") for i in range(2)]
    barrier = threading.Barrier(2)

    def work(i: int) -> list[str]:
        store = stores[i]
        barrier.wait()
        exp = store.create_experiment("shared name", (tmp_path / f"a{i}").as_uri(), {"i": str(i)})
        return log_runs(store, exp.experiment_id, i, 5)

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


def test_codec_a_failed_save_leaves_the_directory_empty(tmp_path: Path) -> None:
    """A model MLflow cannot pickle: the error is MLflow's, and the directory is left as it
    was given (there, and empty), so a retry or another format can use it."""
    torch = pytest.importorskip("torch")
    from tracker_core_mlflow import MlflowPytorchCodec

    class Unpicklable(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.lock = threading.Lock()

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with pytest.raises(TypeError, match="pickle"):
        MlflowPytorchCodec().save(Unpicklable(), model_dir)
    assert model_dir.is_dir() and list(model_dir.iterdir()) == []
    with pytest.raises(ModelNotFoundError, match=f"no MLflow model .MLmodel file. in {model_dir}"):
        MlflowPytorchCodec().load(model_dir)


def test_an_explicit_torch_requirement_wins() -> None:
    from tracker_core_mlflow.codec import default_requirements

    assert default_requirements(["Torch>=2.0", "numpy", "numpy"]) == ["Torch>=2.0", "numpy"]
    assert default_requirements(["numpy"])[0].startswith("torch==")


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
    assert repr(wrapper) == f"MLflowClientWrapper({uri!r})"
    # a client of the caller's own is used as it is
    given = MlflowTrackingStore(uri, client=wrapper.client)
    assert given.client is wrapper.client

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert default_tracking_uri() == "http://example:5000"


class _DriverError(Exception):
    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "refused"),
    [
        (_DriverError('FATAL:  password authentication failed for user "ml"'), True),
        (_DriverError("connection failed", sqlstate="28P01"), True),
        (_DriverError("(1045, \"Access denied for user 'ml'@'host'\")"), True),
        (_DriverError("Login failed for user 'ml'. (18456)"), True),
        (_DriverError("FATAL:  the database system is starting up", sqlstate="57P03"), False),
        (_DriverError("connection refused\n\tIs the server running on that host?"), False),
    ],
)
def test_a_refused_login_is_told_from_a_database_that_is_down(
    error: Exception, refused: bool
) -> None:
    """A refused login fails a store at once; a database that is down or starting is left to
    MLflow's own connection retries (the end-to-end case: tests/test_service_secrets.py)."""
    from tracker_core_mlflow.errors import login_refused

    wrapped = RuntimeError("(psycopg.OperationalError) see the cause")
    wrapped.__cause__ = error
    assert login_refused(wrapped) is refused
