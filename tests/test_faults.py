"""Faults on the S3 and GCS backends, against real servers.

- a missing bucket fails at once, naming the bucket;
- wrong credentials fail at once with a typed error, and the secret shows up nowhere: not in
  the error, not in any log record (DEBUG, every logger), not in MLflow params or tags;
- an unreachable endpoint fails with MaxAttemptsReachedException after exactly the configured
  attempts, and the only retries are tracker-core's (s3fs/gcsfs/botocore loops are off);
- transient errors of the backends' real types (SlowDown, 503) are retried; permanent ones
  are not (a fault-injecting wrapper around a real store, as DESIGN allows).
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _s3gcs_fixtures import *  # noqa: F403 - the fixtures
from _s3gcs_fixtures import tiny_model, unique_name

import tracker_core
from tracker_core import (
    ArtifactStoreError,
    ExperimentsManager,
    MaxAttemptsReachedException,
    RetryConfig,
    RetryParams,
    TrackerError,
)
from tracker_core.fsspec_store import PARALLEL_FILES
from tracker_core.testing.faults import FaultyProxy
from tracker_core.testing.harness import FAST_RETRY
from tracker_core.testing.servers import free_port, moto_server
from tracker_core_gcs import GCSBackend, GCSCredentials, classify_gcs_error
from tracker_core_gcs.backend import DEFAULT_BATCH_SIZE as GCS_BATCH_SIZE
from tracker_core_s3 import (
    ExperimentsManagerWithAmazonS3Backend,
    S3Backend,
    S3Credentials,
    classify_s3_error,
)

SENTINEL = "SENTINEL-SECRET-7f3a"
SENTINEL_KEY_ID = "AKIDSENTINELKEYID"
GCS_EMU = {"token": "anon", "project": "test"}
NO_WAIT = RetryConfig(RetryParams(max_attempts=3, wait_time_seconds=0, max_wait_seconds=0))


def _manager(
    uri: str, tracking_uri: str, options: dict[str, Any], retry: RetryConfig = FAST_RETRY
) -> ExperimentsManager:
    return tracker_core.connect(
        uri, tracking_uri=tracking_uri, main_metric="quality", plugin_name="faults",
        storage_options=options, retry=retry,
    )  # fmt: skip


def _no_retry_logged(caplog: pytest.LogCaptureFixture) -> bool:
    return not any(
        "retrying" in r.getMessage() for r in caplog.records if r.name == "tracker_core.retry"
    )


# ----------------------------------------------------------------------------- missing bucket


def test_s3_missing_bucket_names_the_bucket(
    moto_endpoint: str,
    aws_env: dict[str, str],
    sqlite_tracking_uri: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bucket = unique_name("no-such-bucket")
    manager = _manager(f"s3://{bucket}/p", sqlite_tracking_uri, {"endpoint_url": moto_endpoint})
    with pytest.raises(ArtifactStoreError, match=bucket) as info:
        manager.upload_initial_model(tiny_model())
    assert "bucket does not exist" in str(info.value)
    assert _no_retry_logged(caplog)


def test_gcs_missing_bucket_names_the_bucket(
    gcs_endpoint: str, gcs_env: None, sqlite_tracking_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = unique_name("no-such-bucket")
    manager = _manager(
        f"gs://{bucket}/p", sqlite_tracking_uri, {"endpoint_url": gcs_endpoint, **GCS_EMU}
    )
    with pytest.raises(ArtifactStoreError, match=bucket):
        manager.upload_initial_model(tiny_model())
    assert _no_retry_logged(caplog)


# ----------------------------------------------------------------------------- wrong credentials


@pytest.fixture(scope="module")
def moto_with_auth() -> Iterator[str]:
    """A moto server that checks credentials (it accepts any by default)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")  # read by the server process at start
        with moto_server() as url:
            yield url


def _leaks(text: str, *secrets: str) -> list[str]:
    return [s for s in secrets if s in text]


def _log_text(caplog: pytest.LogCaptureFixture) -> str:
    parts = []
    for record in caplog.records:
        parts.append(record.getMessage())
        parts.append(repr(record.__dict__))
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(parts)


def _mlflow_text(tracking_uri: str) -> str:
    """Every param, tag and experiment field in the SQLite tracking store, as text."""
    path = tracking_uri.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        rows: list[Any] = []
        for table in ("params", "tags", "experiment_tags", "experiments", "runs"):
            rows.extend(db.execute(f"SELECT * FROM {table}").fetchall())
    return json.dumps(rows, default=str)


def _chain_text(exc: BaseException) -> str:
    out: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        out.append(f"{type(current).__name__}: {current} {current.args!r}")
        current = current.__cause__ or current.__context__
    return "\n".join(out)


@pytest.mark.parametrize("via", ["connect", "seed_class"])
def test_s3_wrong_credentials_fail_fast_without_leaking(
    via: str,
    moto_with_auth: str,
    _base_env: None,
    sqlite_tracking_uri: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    if via == "connect":
        options = {"endpoint_url": moto_with_auth, "key": SENTINEL_KEY_ID, "secret": SENTINEL}
        manager = _manager("s3://some-bucket/p", sqlite_tracking_uri, options)
    else:
        creds = S3Credentials(
            moto_with_auth, SENTINEL_KEY_ID, SENTINEL, "some-bucket", secure=False
        )
        manager = ExperimentsManagerWithAmazonS3Backend(
            sqlite_tracking_uri, creds, "quality", "faults", retry_config=FAST_RETRY
        )
        assert SENTINEL not in repr(manager) and SENTINEL not in repr(creds)
    with pytest.raises(ArtifactStoreError) as info:
        manager.upload_initial_model(tiny_model())
    assert isinstance(info.value, TrackerError)
    assert isinstance(info.value.__cause__, PermissionError)  # 403 (HEAD) / InvalidAccessKeyId
    assert "check the credentials" in str(info.value)
    assert _no_retry_logged(caplog)  # permanent: one attempt
    assert not _leaks(_chain_text(info.value), SENTINEL)
    assert not _leaks(_log_text(caplog), SENTINEL)
    assert not _leaks(_mlflow_text(sqlite_tracking_uri), SENTINEL)


def _private_key_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture
def refusing_token_endpoint() -> Iterator[str]:
    """A real OAuth2 token endpoint on 127.0.0.1 that refuses every grant (what Google's
    answers for a revoked or unknown service-account key). The GCS emulator checks no
    credentials at all, so the refusal has to come from the token side."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refuse(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps(
                {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
            )
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/token"
    finally:
        server.shutdown()
        server.server_close()


def test_gcs_wrong_credentials_fail_fast_without_leaking(
    gcs_endpoint: str,
    gcs_env: None,
    refusing_token_endpoint: str,
    sqlite_tracking_uri: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    pem = _private_key_pem()
    info = {
        "type": "service_account",
        "project_id": "test",
        "private_key_id": SENTINEL,
        "private_key": pem,
        "client_email": "sa@test.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": refusing_token_endpoint,
    }
    creds = GCSCredentials(
        "some-bucket", project="test", service_account_info=info, endpoint_url=gcs_endpoint
    )
    assert SENTINEL not in repr(creds) and "PRIVATE KEY" not in repr(creds)
    from tracker_core_gcs import ExperimentsManagerWithGoogleCloudStorageBackend

    manager = ExperimentsManagerWithGoogleCloudStorageBackend(
        sqlite_tracking_uri, creds, "quality", "faults", retry_config=FAST_RETRY
    )
    with pytest.raises(ArtifactStoreError) as raised:
        manager.upload_initial_model(tiny_model())
    assert "invalid_grant" in _chain_text(raised.value)
    assert _no_retry_logged(caplog)
    body = pem.split("-----")[2].strip().splitlines()[1]  # a line of the key itself
    for text in (_chain_text(raised.value), _log_text(caplog), _mlflow_text(sqlite_tracking_uri)):
        assert not _leaks(text, SENTINEL, body)


# ----------------------------------------------------------------------------- unreachable


class _AcceptAndClose:
    """A TCP server on 127.0.0.1 that accepts connections and closes them at once, counting."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _options(backend: str, endpoint: str) -> tuple[str, dict[str, Any]]:
    if backend == "s3":
        return "s3://bucket/p", {"endpoint_url": endpoint, "skip_instance_cache": True}
    return "gs://bucket/p", {"endpoint_url": endpoint, **GCS_EMU, "skip_instance_cache": True}


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_closed_port_fails_after_the_configured_attempts(
    backend: str,
    aws_env: dict[str, str],
    sqlite_tracking_uri: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    uri, options = _options(backend, f"http://127.0.0.1:{free_port()}")  # nothing listens
    manager = _manager(uri, sqlite_tracking_uri, options, retry=NO_WAIT)
    with pytest.raises(MaxAttemptsReachedException) as info:
        manager.upload_initial_model(tiny_model())
    assert info.value.attempts == 3
    assert info.value.operation == "upload_model"
    retries = [
        r for r in caplog.records if r.name == "tracker_core.retry" and "retrying" in r.getMessage()
    ]
    assert len(retries) == 2


class _AttemptMarks(logging.Handler):
    """Snapshots a server's connection count each time tracker-core logs a retry, so the
    connections of each attempt can be told apart."""

    def __init__(self, server: _AcceptAndClose) -> None:
        super().__init__()
        self.server = server
        self.marks: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.marks.append(self.server.count)

    def per_attempt(self) -> list[int]:
        marks = [*self.marks, self.server.count]
        return [b - a for a, b in zip([0, *marks], marks, strict=False)]


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_only_tracker_core_retries(
    backend: str, aws_env: dict[str, str], sqlite_tracking_uri: str
) -> None:
    """Connections that drop: each of tracker-core's attempts makes at most two connections
    per request it can have in flight, i.e. no retry loop of s3fs, gcsfs or botocore (up to 6
    tries each) multiplies them. The factor two is aiohttp's: it resends an idempotent request
    (GET, PUT) once when its connection drops before an answer (RFC 9112's guard for stale
    keep-alive connections), without waiting; measured: S3 makes 14 connections per attempt
    (6 PUTs and a listing, each twice). How many requests start before the first failure
    cancels the others depends on timing (GCS: 7 or 8), so the count is bounded, not exact."""
    in_flight = (PARALLEL_FILES if backend == "s3" else GCS_BATCH_SIZE) + 1  # files + listing
    server = _AcceptAndClose()
    marks = _AttemptMarks(server)
    retry_log = logging.getLogger("tracker_core.retry")
    retry_log.addHandler(marks)
    try:
        uri, options = _options(backend, f"http://127.0.0.1:{server.port}")
        retry = RetryConfig(RetryParams(max_attempts=3, wait_time_seconds=0, max_wait_seconds=0))
        manager = _manager(uri, sqlite_tracking_uri, options, retry=retry)
        with pytest.raises(MaxAttemptsReachedException) as info:
            manager.upload_initial_model(tiny_model())
        assert info.value.attempts == 3
        time.sleep(0.2)  # let the server count the last connections
        per_attempt = marks.per_attempt()
    finally:
        retry_log.removeHandler(marks)
        server.close()
    assert len(per_attempt) == 3, per_attempt
    # Each attempt connects; together they stay within two connections per request in flight.
    # The total is bounded, not each attempt: under load a connection of one attempt can reach
    # the server after the next attempt's mark ([5, 11, 8] was seen), which moves, not adds, one.
    assert all(n >= 1 for n in per_attempt), per_attempt
    assert sum(per_attempt) <= 3 * 2 * in_flight, per_attempt


# ----------------------------------------------------------------------------- transient errors


def _slow_down() -> OSError:
    """What s3fs raises for a 503 SlowDown: botocore's ClientError translated by s3fs."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    error = ClientError(
        {
            "Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
            "ResponseMetadata": {"HTTPStatusCode": 503},
        },
        "PutObject",
    )
    translated = translate_boto_error(error)
    assert isinstance(translated, OSError) and translated.errno == errno.EBUSY
    return translated


def _access_denied() -> OSError:
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    error = ClientError(
        {"Error": {"Code": "AccessDenied", "Message": "Access Denied"},
         "ResponseMetadata": {"HTTPStatusCode": 403}},
        "PutObject",
    )  # fmt: skip
    translated = translate_boto_error(error)
    assert isinstance(translated, PermissionError)
    return translated


def _gcs_503() -> BaseException:
    from gcsfs.retry import HttpError

    error: BaseException = HttpError({"code": 503, "message": "Service Unavailable"})
    return error


def _gcs_403() -> BaseException:
    return OSError("Forbidden: https://storage.googleapis.com/b/o\nAccess denied.")


def _faulty_manager(
    backend: str, tracking_uri: str, request: pytest.FixtureRequest
) -> tuple[ExperimentsManager, FaultyProxy]:
    retrier_config = NO_WAIT
    if backend == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        store = S3Backend().artifact_store(
            f"s3://{bucket}/p",
            storage_options={"endpoint_url": request.getfixturevalue("moto_endpoint")},
            retrier=tracker_core.retry.Retrier(retrier_config),
        )
    else:
        bucket = request.getfixturevalue("gcs_bucket")
        store = GCSBackend().artifact_store(
            f"gs://{bucket}/p",
            storage_options={"endpoint_url": request.getfixturevalue("gcs_endpoint"), **GCS_EMU},
            retrier=tracker_core.retry.Retrier(retrier_config),
        )
    proxy = FaultyProxy(store)
    tracking = S3Backend().tracking_store(
        tracking_uri, retrier=tracker_core.retry.Retrier(retrier_config)
    )
    manager = ExperimentsManager(
        tracking_uri, "quality", "faults", retry_config=retrier_config,
        tracking_store=tracking, artifact_store=proxy,  # type: ignore[arg-type]
        model_format="mlflow.pytorch",
    )  # fmt: skip
    return manager, proxy


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_transient_errors_are_retried(
    backend: str, sqlite_tracking_uri: str, request: pytest.FixtureRequest, aws_env: dict[str, str]
) -> None:
    manager, proxy = _faulty_manager(backend, sqlite_tracking_uri, request)
    error = _slow_down() if backend == "s3" else _gcs_503()
    proxy.fail("upload_dir", error=error, times=2)
    proxy.fail("download_dir", error=error, times=1)
    assert manager.upload_initial_model(tiny_model()) is True
    assert proxy.calls["upload_dir"] == 3
    from _s3gcs_fixtures import same_weights

    assert same_weights(manager.download_initial_model(), tiny_model())
    assert proxy.calls["download_dir"] == 2


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_permanent_errors_are_not_retried(
    backend: str, sqlite_tracking_uri: str, request: pytest.FixtureRequest, aws_env: dict[str, str]
) -> None:
    manager, proxy = _faulty_manager(backend, sqlite_tracking_uri, request)
    error = _access_denied() if backend == "s3" else _gcs_403()
    proxy.fail("upload_dir", error=error, times=5)
    with pytest.raises(OSError):
        manager.upload_initial_model(tiny_model())
    assert proxy.calls["upload_dir"] == 1


# ----------------------------------------------------------------------------- listings
def test_a_failed_folder_listing_never_hides_orphans_from_gc(
    aws_env: dict[str, str], s3_bucket: str, moto_endpoint: str, sqlite_tracking_uri: str
) -> None:
    """Chaos seed 14: on S3, fsspec's ``find(maxdepth=...)`` lists folder by folder and
    silently omits a folder whose listing fails, so under faults gc missed orphaned models.
    The orphans of every folder are found even when listing one folder would fail, and when
    the one listing gc makes fails, gc fails: never a smaller answer."""
    options = {"endpoint_url": moto_endpoint, "skip_instance_cache": True}
    manager = _manager(f"s3://{s3_bucket}/gc", sqlite_tracking_uri, options, retry=NO_WAIT)
    store = manager.artifacts
    orphans = {store.join(f"exp{i}", f"{i}" * 32, "artifacts", "model") for i in range(2)}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "weights.bin").write_bytes(b"\0" * 64)
        for uri in orphans:
            store.upload_dir(Path(tmp), uri)
    fs: Any = store.fs  # type: ignore[attr-defined]
    real_ls = fs._ls

    async def ls_failing_in_exp1(path: str, *args: Any, **kwargs: Any) -> Any:
        if "/exp1" in path:
            raise OSError(errno.ECONNRESET, "connection reset while listing")
        return await real_ls(path, *args, **kwargs)

    fs._ls = ls_failing_in_exp1
    try:
        assert {o.uri for o in manager.find_orphaned_models().orphans} == orphans

        async def lsdir_failing(*args: Any, **kwargs: Any) -> Any:
            raise OSError(errno.ECONNRESET, "connection reset while listing")

        fs._lsdir = lsdir_failing
        with pytest.raises(TrackerError):
            manager.find_orphaned_models()
    finally:
        del fs._ls
        fs.__dict__.pop("_lsdir", None)
        manager.close()


# ----------------------------------------------------------------------------- classifiers


def _client_error(code: str, status: int) -> Any:
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


@pytest.mark.parametrize(
    ("code", "status", "transient"),
    [
        ("SlowDown", 503, True),
        ("ServiceUnavailable", 503, True),
        ("InternalError", 500, True),
        ("Throttling", 400, True),
        ("ThrottlingException", 400, True),
        ("RequestLimitExceeded", 400, True),
        ("TooManyRequests", 429, True),
        ("502", 502, True),
        ("AccessDenied", 403, False),
        ("InvalidAccessKeyId", 403, False),
        ("SignatureDoesNotMatch", 403, False),
        ("NoSuchBucket", 404, False),
        ("404", 404, False),
        ("InvalidArgument", 400, False),
    ],
)
def test_s3_classifier_on_what_s3fs_raises(code: str, status: int, transient: bool) -> None:
    from s3fs.errors import translate_boto_error

    raw = _client_error(code, status)
    assert classify_s3_error(raw) is transient
    assert classify_s3_error(translate_boto_error(raw)) is transient


def test_s3_classifier_on_connection_errors() -> None:
    import aiohttp
    import botocore.exceptions as bce

    url = "http://127.0.0.1:9/b"
    assert classify_s3_error(bce.EndpointConnectionError(endpoint_url=url)) is True
    assert classify_s3_error(bce.ConnectTimeoutError(endpoint_url=url)) is True
    assert classify_s3_error(bce.ReadTimeoutError(endpoint_url=url)) is True
    assert classify_s3_error(bce.ConnectionClosedError(endpoint_url=url)) is True
    assert classify_s3_error(aiohttp.ServerDisconnectedError()) is True
    assert classify_s3_error(TimeoutError()) is True
    assert classify_s3_error(bce.NoCredentialsError()) is False
    assert classify_s3_error(ValueError("x")) is None


def test_s3_classifier_on_answers_without_their_details() -> None:
    """A HEAD answer has no body: its code is its status. aiohttp's own response errors are
    judged by status. An s3fs ``OSError`` that lost its botocore cause is judged by its type
    (missing, forbidden) or errno (s3fs's EBUSY for SlowDown / ServiceUnavailable)."""
    import aiohttp
    from botocore.exceptions import ClientError

    def head(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": ""}}, "HeadObject")

    assert classify_s3_error(head("503")) is True
    assert classify_s3_error(head("403")) is False

    def answer(status: int) -> aiohttp.ClientResponseError:
        return aiohttp.ClientResponseError(None, (), status=status)  # type: ignore[arg-type]

    assert classify_s3_error(answer(503)) is True
    assert classify_s3_error(answer(400)) is False
    assert classify_s3_error(FileNotFoundError("bucket/key")) is False
    assert classify_s3_error(PermissionError("bucket/key")) is False
    assert classify_s3_error(OSError(errno.EBUSY, "SlowDown")) is True
    assert classify_s3_error(OSError(errno.EIO, "?")) is None


def test_gcs_classifier() -> None:
    import aiohttp
    import google.auth.exceptions as gae
    import requests
    from gcsfs.retry import HttpError

    for code in (429, 500, 502, 503, 504, 408):
        assert classify_gcs_error(HttpError({"code": code, "message": "x"})) is True
    for code in (400, 401, 403, 404, 409):
        assert classify_gcs_error(HttpError({"code": code, "message": "x"})) is False
    assert classify_gcs_error(FileNotFoundError("b/o")) is False
    assert classify_gcs_error(_gcs_403()) is False
    assert classify_gcs_error(requests.exceptions.ProxyError()) is True  # gcsfs's 502
    assert classify_gcs_error(aiohttp.ServerDisconnectedError()) is True
    assert classify_gcs_error(TimeoutError()) is True
    assert classify_gcs_error(gae.RefreshError("invalid_grant")) is False  # type: ignore[no-untyped-call]
    assert classify_gcs_error(gae.TransportError("unreachable")) is True  # type: ignore[no-untyped-call]
    assert classify_gcs_error(ValueError("x")) is None
    # aiohttp's own response errors, by status
    for status, transient in ((503, True), (429, True), (404, False)):
        error = aiohttp.ClientResponseError(None, (), status=status)  # type: ignore[arg-type]
        assert classify_gcs_error(error) is transient
    # no credentials to be found (no key, no gcloud, no metadata server): no retry finds one
    assert classify_gcs_error(gae.DefaultCredentialsError("none found")) is False  # type: ignore[no-untyped-call]
    # gcsfs's 400 (a request it calls invalid)
    assert classify_gcs_error(ValueError("Bad Request: gs://b/o")) is False
