"""The S3 backend against moto's real S3 server: round trip, deletes, seed class, interop."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from _s3gcs_fixtures import *  # noqa: F403 - the fixtures
from _s3gcs_fixtures import assert_plain_mlflow_reads, round_trip, same_weights, tiny_model

import tracker_core
from tracker_core import tags as T
from tracker_core.cli import main
from tracker_core.errors import ConfigurationError
from tracker_core.testing.harness import FAST_RETRY
from tracker_core.testing.suite_reconcile import set_lease
from tracker_core_s3 import (
    ExperimentsManagerWithAmazonS3Backend,
    S3Backend,
    S3Credentials,
    s3_filesystem,
    s3_root_uri,
)


def _connect(
    bucket: str, endpoint: str, tracking_uri: str, **kwargs: object
) -> tracker_core.ExperimentsManager:
    return tracker_core.connect(
        f"s3://{bucket}/models",
        tracking_uri=tracking_uri,
        main_metric="quality",
        plugin_name="plugin",
        storage_options={"endpoint_url": endpoint},
        retry=FAST_RETRY,
        **kwargs,  # type: ignore[arg-type]
    )


def test_connect_picks_the_s3_backend_and_round_trips(
    s3_bucket: str, moto_endpoint: str, sqlite_tracking_uri: str
) -> None:
    manager = _connect(s3_bucket, moto_endpoint, sqlite_tracking_uri)
    assert manager.artifacts.root == f"s3://{s3_bucket}/models"
    assert manager.model_format == "mlflow.pytorch"
    _, run_id = round_trip(manager)
    run = manager.get_run_by_id(run_id, models_only=True)
    assert run is not None
    model_uri = run.tags[T.TAG_MODEL_URI]
    assert model_uri == f"{run.artifact_uri}/model"
    assert model_uri.startswith(f"s3://{s3_bucket}/models/")
    fs = s3_filesystem({"endpoint_url": moto_endpoint})
    assert fs.exists(f"{model_uri[len('s3://') :]}/MLmodel")


def test_endpoint_from_mlflow_s3_endpoint_url(
    s3_bucket: str, moto_endpoint: str, sqlite_tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without storage_options, MLFLOW_S3_ENDPOINT_URL (what MLflow reads) is used."""
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_endpoint)
    manager = tracker_core.connect(
        f"s3://{s3_bucket}/env", tracking_uri=sqlite_tracking_uri,
        main_metric="quality", plugin_name="plugin", retry=FAST_RETRY,
    )  # fmt: skip
    assert manager.upload_initial_model(tiny_model()) is True
    assert same_weights(manager.download_initial_model(), tiny_model())


def test_aws_endpoint_url_wins_over_mlflow_s3_endpoint_url(
    moto_endpoint: str, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    fs = s3_filesystem()
    assert fs.endpoint_url is None  # botocore reads AWS_ENDPOINT_URL itself
    assert fs.s3.meta.endpoint_url == moto_endpoint


def test_mlflow_s3_ignore_tls_goes_with_mlflow_s3_endpoint_url(
    aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's pair of variables for an S3-compatible store with a self-signed certificate:
    the endpoint is used unverified, as MLflow's own S3 client would."""
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "https://minio.internal:9000")
    monkeypatch.setenv("MLFLOW_S3_IGNORE_TLS", "true")
    fs = s3_filesystem()
    assert fs.endpoint_url == "https://minio.internal:9000"
    assert fs.client_kwargs == {"verify": False}
    monkeypatch.setenv("MLFLOW_S3_IGNORE_TLS", "false")
    assert s3_filesystem().client_kwargs == {}


def test_download_part_size_is_a_storage_option(
    s3_bucket: str, moto_endpoint: str, tmp_path: Path
) -> None:
    fs = s3_filesystem({"endpoint_url": moto_endpoint, "download_part_size": 1024})
    assert fs.download_part_size == 1024
    data = bytes(range(256)) * 10  # 2,560 bytes: three ranges
    fs.pipe_file(f"{s3_bucket}/w.bin", data)
    fs.get_file(f"{s3_bucket}/w.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data


def test_filesystem_tries_each_request_once_with_timeouts(aws_env: dict[str, str]) -> None:
    fs = s3_filesystem({"endpoint_url": "http://127.0.0.1:9"})
    assert fs.retries == 1
    config = fs.s3.meta.config
    assert config.retries["total_max_attempts"] == 1
    assert config.connect_timeout == 10 and config.read_timeout == 60
    assert fs.default_block_size == 8 * 2**20 and fs.max_concurrency == 4


@pytest.mark.parametrize(
    ("uri", "root"),
    [
        ("s3://b", "s3://b"),
        ("s3://b/", "s3://b"),
        ("s3://b/a/b/", "s3://b/a/b"),
        ("s3a://b/p", "s3://b/p"),
    ],
)
def test_root_uri(uri: str, root: str) -> None:
    assert s3_root_uri(uri) == root


@pytest.mark.parametrize("uri", ["s3://", "s3:///prefix", "gs://b/p", "s3://b/p?x=1"])
def test_bad_root_uri(uri: str) -> None:
    with pytest.raises(ConfigurationError):
        s3_root_uri(uri)


def test_delete_model_removes_more_than_1000_objects(
    s3_bucket: str, moto_endpoint: str, sqlite_tracking_uri: str
) -> None:
    manager = _connect(s3_bucket, moto_endpoint, sqlite_tracking_uri)
    experiment_id, run_id = round_trip(manager)
    run = manager.get_run_by_id(run_id)
    assert run is not None
    model_key = run.tags[T.TAG_MODEL_URI][len("s3://") :]
    fs = s3_filesystem({"endpoint_url": moto_endpoint})
    # plant 1,200 more objects under the model, nested, as a big sharded model would have
    fs.pipe({f"{model_key}/shards/{i // 100}/part-{i:05d}.bin": b"x" for i in range(1200)})
    assert len(fs.find(model_key)) > 1200
    sibling = f"{model_key}-sibling/keep.bin"  # shares the key prefix, not the folder
    fs.pipe(sibling, b"keep")

    assert manager._delete_model(run_id, experiment_id) is True
    fs.invalidate_cache()
    assert fs.find(model_key) == []
    assert fs.cat(sibling) == b"keep"
    # deleting what is already gone is fine and still True
    assert manager._delete_model(run_id, experiment_id) is True


def test_seed_class_with_s3_credentials(
    s3_bucket: str, moto_endpoint: str, sqlite_tracking_uri: str
) -> None:
    creds = S3Credentials(
        endpoint=moto_endpoint.removeprefix("http://"),
        access_key="testing",
        secret_key="testing-secret-value",
        bucket_name=s3_bucket,
        secure=False,
    )
    assert creds.endpoint_url == moto_endpoint
    assert "testing-secret-value" not in repr(creds) and "testing-secret-value" not in str(creds)
    manager = ExperimentsManagerWithAmazonS3Backend(
        sqlite_tracking_uri, creds, "quality", "seed-plugin", retry_config=FAST_RETRY
    )
    assert isinstance(manager, tracker_core.ExperimentsManager)
    assert manager.artifacts.root == f"s3://{s3_bucket}/mlflow"
    assert manager.model_format == "mlflow.pytorch"
    assert manager.s3_credentials is creds  # the seed's attribute
    experiment_id, run_id = round_trip(manager)
    fs = s3_filesystem({"endpoint_url": moto_endpoint})
    run = manager.get_run_by_id(run_id, models_only=True)
    assert run is not None
    model_key = run.tags[T.TAG_MODEL_URI][len("s3://") :]
    # the seed's private step: the model's objects go, the run still names its model
    assert manager._delete_model(run_id, experiment_id) is True
    assert fs.find(model_key) == []
    assert manager.get_run_by_id(run_id, models_only=True) is not None
    assert manager.delete_model(run_id, experiment_id) is True
    assert fs.find(f"{s3_bucket}/mlflow/") != []  # the initial model is still there
    assert manager.get_run_by_id(run_id, models_only=True) is None


def test_seed_class_prefix_and_storage_options(
    s3_bucket: str, moto_endpoint: str, sqlite_tracking_uri: str
) -> None:
    creds = S3Credentials(moto_endpoint, "testing", "testing", s3_bucket, secure=False)
    manager = ExperimentsManagerWithAmazonS3Backend(
        sqlite_tracking_uri, creds, "quality", "seed-plugin",
        prefix="team/a/", storage_options={"max_concurrency": 2},
    )  # fmt: skip
    assert manager.artifacts.root == f"s3://{s3_bucket}/team/a"
    assert getattr(manager.artifacts, "fs").max_concurrency == 2  # noqa: B009
    assert manager.upload_initial_model(tiny_model()) is True


def test_backend_is_an_mlflow_backend() -> None:
    from tracker_core_mlflow.backend import MlflowBackend

    assert isinstance(tracker_core.registry.get_backend("s3"), S3Backend)
    assert issubclass(S3Backend, MlflowBackend)


def test_plain_mlflow_reads_the_model(
    s3_bucket: str, moto_endpoint: str, sqlite_tracking_uri: str, tmp_path: Path
) -> None:
    """A model saved through the manager loads with mlflow.pytorch.load_model("runs:/...")
    and mlflow.artifacts.download_artifacts, given MLFLOW_S3_ENDPOINT_URL and AWS variables
    (in a fresh process: MLflow reads those variables when it builds its S3 client)."""
    manager = _connect(s3_bucket, moto_endpoint, sqlite_tracking_uri)
    model = tiny_model()
    _, run_id = round_trip(manager, model)
    env = {"MLFLOW_S3_ENDPOINT_URL": moto_endpoint}
    assert_plain_mlflow_reads(run_id, model, sqlite_tracking_uri, env, tmp_path)


_SAVE_AND_HANG = r"""
import asyncio, sys
import attrs, torch
import tracker_core
from tracker_core import FineTuningIteration, FineTuningParams, MetricValue
from tracker_core_s3.backend import TrackerS3FileSystem

bucket, endpoint, tracking = sys.argv[1:4]
call_s3 = TrackerS3FileSystem._call_s3


async def hang_before_completing(self, method, *args, **kwargs):
    # fault injection on the real store: every part is stored, the upload is never
    # completed; the test kills this process here
    if method == "complete_multipart_upload":
        print("parts stored", flush=True)
        await asyncio.sleep(3600)
    return await call_s3(self, method, *args, **kwargs)


TrackerS3FileSystem._call_s3 = hang_before_completing


@attrs.frozen
class P(FineTuningParams):
    lr: float = 0.1


def big_model():
    return torch.nn.Linear(2750, 2750)  # 7.6 M float32 weights: 30 MB


mgr = tracker_core.connect(
    f"s3://{bucket}/models", tracking_uri=tracking, main_metric="quality", plugin_name="plugin",
    storage_options={"endpoint_url": endpoint}, model_format="state_dict", model_factory=big_model,
)
mgr.set_iteration(FineTuningIteration(plugin_name="plugin", batch_id="b1"))
mgr.set_run(P(lr=0.5))
print(mgr.current_run_id, flush=True)
mgr.save_metric(MetricValue("quality", 0.9))
mgr.save_model(big_model())
"""


def test_kill_during_a_30mb_save_then_gc_leaves_nothing(
    s3_bucket: str, moto_endpoint: str, sqlite_tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 while a 30 MB model is being uploaded leaves an incomplete multipart upload;
    once the worker's lease has expired, `gc --delete` leaves no object and no upload."""
    child = subprocess.Popen(
        [sys.executable, "-c", _SAVE_AND_HANG, s3_bucket, moto_endpoint, sqlite_tracking_uri],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stderr is not None
        run_id = child.stdout.readline().strip()
        assert child.stdout.readline().strip() == "parts stored", child.stderr.read()[-3000:]
    finally:
        child.kill()  # SIGKILL: no cleanup of any kind runs
        child.wait(timeout=60)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    fs = s3_filesystem({"endpoint_url": moto_endpoint})

    def uploads() -> list[str]:
        page = fs.call_s3("list_multipart_uploads", Bucket=s3_bucket, Prefix="models/")
        return [u["Key"] for u in page.get("Uploads") or []]

    (key,) = uploads()
    assert f"/{run_id}/artifacts/model/" in key

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_endpoint)
    argv = ["--tracking-uri", sqlite_tracking_uri, "--artifact-uri", f"s3://{s3_bucket}/models"]

    def gc_delete() -> dict[str, object]:
        out, err = io.StringIO(), io.StringIO()
        assert main([*argv, "--json", "gc", "--delete"], stdout=out, stderr=err) == 0, err
        data: dict[str, object] = json.loads(out.getvalue())
        return data

    first = gc_delete()  # the worker's lease has not expired yet: it may still be alive
    assert first["uploads"] == [] and uploads() == [key]
    manager = _connect(s3_bucket, moto_endpoint, sqlite_tracking_uri)
    set_lease(manager, run_id, expires_in_ms=-1_000)  # ... now it has
    second = gc_delete()
    assert [u["run_id"] for u in second["uploads"]] == [run_id]  # type: ignore[index, union-attr]
    assert uploads() == []
    fs.invalidate_cache()
    assert fs.find(f"{s3_bucket}/models") == []
