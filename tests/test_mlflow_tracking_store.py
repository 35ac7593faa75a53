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

pytest.importorskip("mlflow")

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from tracker_core.errors import TrackingStoreError, TransientError
from tracker_core.retry import Retrier
from tracker_core.stores import RunQuery
from tracker_core.testing.contract_tracking import log_runs, make_experiment, unique
from tracker_core.testing.harness import BackendUnderTest
from tracker_core.testing.servers import free_port
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
    assert store.classify_error(info.value) is False  # the contract: not True


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
