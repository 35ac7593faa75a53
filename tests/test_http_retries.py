"""One retry policy over HTTP, in MLflow's default environment (issue 11, items 9 and 14).

``tests/conftest.py`` sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` for the suite; these tests
remove it (and ``MLFLOW_HTTP_REQUEST_TIMEOUT``), as in a user's shell, and count what reaches
a real HTTP endpoint on 127.0.0.1: each tracker-core attempt must be exactly one request,
while a plain ``MlflowClient`` in the same process keeps MLflow's own retries.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import inspect
import io
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

pytest.importorskip("mlflow")

import urllib3.util.connection
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.rest_store import RestStore
from mlflow.utils import rest_utils

import tracker_core
from tracker_core.cli import main
from tracker_core.errors import MaxAttemptsReachedException, TransientError
from tracker_core.retry import Retrier, RetryConfig, RetryParams
from tracker_core.testing.servers import free_port
from tracker_core.values import FineTuningIteration, RunStatus
from tracker_core_mlflow import MlflowTrackingStore
from tracker_core_mlflow.rest import SingleAttemptRestStore
from tracker_core_mlflow.tracking import DEFAULT_REQUEST_TIMEOUT

pytestmark = pytest.mark.timeout(300)

ATTEMPTS = 3
RETRY = RetryConfig(RetryParams(max_attempts=ATTEMPTS, wait_time_seconds=0))
#: MLflow's default number of retries per request (MLFLOW_HTTP_REQUEST_MAX_RETRIES unset)
MLFLOW_DEFAULT_RETRIES = 7


@pytest.fixture(autouse=True)
def mlflow_default_http_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's defaults, as in a user's shell; only its pauses between retries are dropped
    (factor 2 and 1 s jitter spread 7 retries over minutes), not the retries."""
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")


class CountingServer:
    """An HTTP/1.1 server on 127.0.0.1 that counts the requests it gets, by method and path.

    ``mode`` is ``"503"`` (answer 503 with a text body), ``"hang"`` (read the request, never
    answer) or ``"forward"`` (pass the request on to ``upstream`` and its answer back).
    """

    def __init__(self, mode: str, upstream: str | None = None) -> None:
        self.mode, self.upstream = mode, upstream
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with server._lock:
                    server.requests[(self.command, urlsplit(self.path).path)] += 1
                if server.mode == "hang":
                    server.stop.wait(60)
                    self.close_connection = True
                    return
                if server.mode == "503":
                    status, ctype, data = 503, "text/plain", b"unavailable"
                else:
                    status, ctype, data = server.forward(self.command, self.path, body, self)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = handle_one

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def forward(
        self, method: str, path: str, body: bytes, request: BaseHTTPRequestHandler
    ) -> tuple[int, str, bytes]:
        parts = urlsplit(self.upstream)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
        try:
            headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
            conn.request(method, path, body=body or None, headers=headers)
            answer = conn.getresponse()
            return answer.status, answer.getheader("Content-Type", ""), answer.read()
        finally:
            conn.close()

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def unavailable() -> Iterator[CountingServer]:
    server = CountingServer("503")
    yield server
    server.close()


@pytest.fixture
def proxy(server_tracking: str) -> Iterator[CountingServer]:
    """A counting pass-through in front of the real ``mlflow server`` of the session."""
    server = CountingServer("forward", upstream=server_tracking)
    yield server
    server.close()


def count_connections(monkeypatch: pytest.MonkeyPatch, port: int) -> Callable[[], int]:
    """Count the TCP connections urllib3 opens to 127.0.0.1:``port`` (a real connect each)."""
    count = [0]
    real = urllib3.util.connection.create_connection

    def counting(address: tuple[str, int], *args: Any, **kwargs: Any) -> Any:
        if tuple(address) == ("127.0.0.1", port):
            count[0] += 1
        return real(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", counting)
    return lambda: count[0]


def retrier_for(store: MlflowTrackingStore) -> Retrier:
    return Retrier(RETRY).with_classifiers(store.classify_error)


# -- item 9: one retry policy ----------------------------------------------------------------


def test_dead_server_gets_one_connection_per_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()  # nothing listens there
    connections = count_connections(monkeypatch, port)
    mgr = tracker_core.connect(
        str(tmp_path / "models"),
        tracking_uri=f"http://127.0.0.1:{port}",
        main_metric="quality",
        plugin_name="p",
        retry=RETRY,
    )
    try:
        with pytest.raises(MaxAttemptsReachedException) as info:
            mgr.set_iteration(FineTuningIteration(plugin_name="p", batch_id="b"))
    finally:
        mgr.close()
    assert info.value.attempts == ATTEMPTS
    assert connections() == ATTEMPTS  # not ATTEMPTS x (1 + MLflow's 7 retries)


@pytest.mark.parametrize(
    ("operation", "args"),
    [("get_experiment_by_name", ("x",)), ("create_run", ("1", "r", {}))],
    ids=["GET", "POST"],
)
def test_503_gets_one_request_per_attempt(
    unavailable: CountingServer, operation: str, args: tuple[Any, ...]
) -> None:
    store = MlflowTrackingStore(unavailable.url)
    with pytest.raises(MaxAttemptsReachedException) as info:
        retrier_for(store).call("search", getattr(store, operation), *args)
    assert unavailable.total == ATTEMPTS
    last = info.value.__cause__
    assert isinstance(last, TransientError)
    assert "503" in str(last)  # the server's answer, not urllib3's "too many 503 responses"


def test_plain_mlflow_client_keeps_mlflow_retries(unavailable: CountingServer) -> None:
    plain_before = MlflowClient(unavailable.url)
    ours = MlflowTrackingStore(unavailable.url)
    plain_after = MlflowClient(unavailable.url)
    with pytest.raises(TransientError):
        ours.get_experiment_by_name("x")
    assert unavailable.total == 1
    for client in (plain_before, plain_after):
        unavailable.reset()
        with pytest.raises(MlflowException):
            client.get_experiment_by_name("x")
        assert unavailable.total == 1 + MLFLOW_DEFAULT_RETRIES
        assert type(client._tracking_client.store) is RestStore


def test_hung_server_times_out_once_per_attempt() -> None:
    server = CountingServer("hang")
    try:
        store = MlflowTrackingStore(server.url, request_timeout=0.5)
        with pytest.raises(MaxAttemptsReachedException) as info:
            retrier_for(store).call("search", store.get_experiment_by_name, "x")
        assert server.total == ATTEMPTS
        assert "timeout" in str(info.value.__cause__).lower()
    finally:
        server.close()


def test_request_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    def timeout_of(store: MlflowTrackingStore) -> float:
        rest = store.client._tracking_client.store
        assert isinstance(rest, SingleAttemptRestStore)
        assert rest.timeout == store.request_timeout
        return rest.timeout

    assert timeout_of(MlflowTrackingStore(url)) == DEFAULT_REQUEST_TIMEOUT
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    assert timeout_of(MlflowTrackingStore(url)) == 7.0
    assert timeout_of(MlflowTrackingStore(url, request_timeout=2.5)) == 2.5
    from tracker_core.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        MlflowTrackingStore(url, request_timeout=0)


def _params(fn: Callable[..., Any]) -> list[tuple[str, Any]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_mlflow_internals_the_store_mirrors() -> None:
    """What ``tracker_core_mlflow.rest`` mirrors or relies on, as in mlflow 3.17.2. If this
    fails after an MLflow upgrade, compare the new code with ``rest.py`` and update both."""
    assert _params(SingleAttemptRestStore._call_endpoint) == _params(RestStore._call_endpoint)
    mirrored = {
        "RestStore._call_endpoint": RestStore._call_endpoint,
        "rest_utils.call_endpoint": rest_utils.call_endpoint,
    }
    digests = {
        name: hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]
        for name, fn in mirrored.items()
    }
    assert digests == {
        "RestStore._call_endpoint": "c196a817d3aeda12",
        "rest_utils.call_endpoint": "f65a49a29931f9f8",
    }
    for name in ("max_retries", "backoff_factor", "backoff_jitter", "timeout", "raise_on_status"):
        assert name in inspect.signature(rest_utils.http_request).parameters
    service = MlflowClient("sqlite:///:memory:")._tracking_client
    assert isinstance(inspect.getattr_static(type(service), "store"), property)


# -- item 14: finishing a run prints nothing and costs one request ---------------------------


def test_set_terminated_prints_nothing_and_sends_one_request(
    proxy: CountingServer, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    store = MlflowTrackingStore(proxy.url)
    experiment = store.create_experiment(
        f"exp-{tmp_path.name}", (tmp_path / "a").as_uri(), {}
    ).experiment_id
    run = store.create_run(experiment, "r", {})
    capfd.readouterr()
    proxy.reset()
    store.set_terminated(run.run_id, RunStatus.FINISHED)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert dict(proxy.requests) == {("POST", "/api/2.0/mlflow/runs/update"): 1}
    ended = store.get_run(run.run_id)
    assert ended is not None and ended.status == RunStatus.FINISHED and ended.end_time_ms


# -- issue 17, item 5: a tracking URI that is not an MLflow server -----------------------------


class PlainWebServer:
    """A web server that is not MLflow (Python's own: 404 pages for GET, 501 for POST), on
    127.0.0.1, counting the requests it gets."""

    def __init__(self, directory: Path) -> None:
        self.requests = 0
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(directory), **kwargs)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def handle_one_request(self) -> None:
                server.requests += 1
                super().handle_one_request()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _cli(tracking_uri: str, tmp_path: Path) -> tuple[int, str]:
    err = io.StringIO()
    argv = ["--tracking-uri", tracking_uri, "--artifact-uri", str(tmp_path / "models")]
    status = main(
        [*argv, "--plugin", "p", "--metric", "q", "--retries", "3", "iterations"],
        stdout=io.StringIO(),
        stderr=err,
    )
    return status, err.getvalue()


def test_a_plain_web_server_is_named_as_not_mlflow_and_not_retried(tmp_path: Path) -> None:
    """Its 501 (POST) is as final as its 404 (GET): one request, and the last line says what
    was reached and what to check."""
    web = PlainWebServer(tmp_path)
    try:
        status, err = _cli(web.url, tmp_path)
        assert status == 1
        last = err.strip().splitlines()[-1]
        assert f"is {web.url} an MLflow tracking server?" in last, last
        assert "HTTP 501" in last and "<html" not in err.lower()
        assert web.requests == 1  # not retried: no retry turns a web page into MLflow
        store = MlflowTrackingStore(web.url)
        with pytest.raises(tracker_core.TrackingStoreError, match="an MLflow tracking server"):
            store.get_experiment("1")  # its 404 names it the same way
    finally:
        web.close()


def test_a_tracking_server_that_never_answers_is_named(tmp_path: Path) -> None:
    status, err = _cli(f"http://127.0.0.1:{free_port()}", tmp_path)
    assert status == 1
    last = err.strip().splitlines()[-1]
    assert "gave up after 3 attempt(s)" in last
    assert "Connection refused" in last and "is an MLflow tracking server running there?" in last
