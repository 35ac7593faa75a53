"""The GCS backend against a real GCS emulator: round trip, deletes, seed class, interop."""

from __future__ import annotations

from pathlib import Path

import pytest
from _s3gcs_fixtures import *  # noqa: F403 - the fixtures
from _s3gcs_fixtures import assert_plain_mlflow_reads, round_trip, same_weights, tiny_model

import tracker_core
from tracker_core import tags as T
from tracker_core.errors import ConfigurationError
from tracker_core.testing.harness import FAST_RETRY
from tracker_core_gcs import (
    ExperimentsManagerWithGoogleCloudStorageBackend,
    GCSBackend,
    GCSCredentials,
    gcs_filesystem,
    gcs_root_uri,
)

EMU = {"token": "anon", "project": "test"}


def _connect(uri: str, endpoint: str, tracking_uri: str) -> tracker_core.ExperimentsManager:
    return tracker_core.connect(
        uri,
        tracking_uri=tracking_uri,
        main_metric="quality",
        plugin_name="plugin",
        storage_options={"endpoint_url": endpoint, **EMU},
        retry=FAST_RETRY,
    )


@pytest.mark.parametrize("scheme", ["gs", "gcs"])
def test_connect_round_trip_on_both_schemes(
    scheme: str, gcs_bucket: str, gcs_endpoint: str, sqlite_tracking_uri: str
) -> None:
    manager = _connect(f"{scheme}://{gcs_bucket}/models", gcs_endpoint, sqlite_tracking_uri)
    assert isinstance(tracker_core.registry.get_backend(scheme), GCSBackend)
    assert manager.artifacts.root == f"gs://{gcs_bucket}/models"  # what MLflow understands
    _, run_id = round_trip(manager)
    run = manager.get_run_by_id(run_id, models_only=True)
    assert run is not None
    assert run.tags[T.TAG_MODEL_URI].startswith(f"gs://{gcs_bucket}/models/")
    assert run.tags[T.TAG_MODEL_URI] == f"{run.artifact_uri}/model"


def test_storage_emulator_host_is_honoured(
    gcs_bucket: str, gcs_endpoint: str, sqlite_tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With STORAGE_EMULATOR_HOST and no options, the emulator is used anonymously."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    fs = gcs_filesystem()
    assert fs._endpoint == gcs_endpoint and fs.credentials.method == "anon"
    # the emulators' own convention: host:port without a scheme (google-cloud-storage's too)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint.removeprefix("http://") + "/")
    assert gcs_filesystem()._endpoint == gcs_endpoint
    manager = tracker_core.connect(
        f"gs://{gcs_bucket}/env", tracking_uri=sqlite_tracking_uri,
        main_metric="quality", plugin_name="plugin", retry=FAST_RETRY,
    )  # fmt: skip
    assert manager.upload_initial_model(tiny_model()) is True
    assert same_weights(manager.download_initial_model(), tiny_model())


def test_filesystem_is_the_classic_one_without_inner_retries(gcs_env: None) -> None:
    """gcsfs's experimental filesystem (it blocks for a minute per bucket probing its type
    against an emulator) is never used, whatever GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT says; and
    gcsfs's own 6-attempt retry loop is off."""
    import gcsfs.core
    from gcsfs.retry import retry_request  # noqa: F401 - the decorator being bypassed

    fs = gcs_filesystem({"endpoint_url": "http://127.0.0.1:9", **EMU})
    assert type(fs).__mro__[1] is gcsfs.core.GCSFileSystem
    assert not hasattr(type(fs)._request, "__wrapped__")
    assert fs.default_block_size == 16 * 2**20
    assert fs.requests_timeout.sock_connect == 10


@pytest.mark.parametrize(
    ("uri", "root"),
    [("gs://b", "gs://b"), ("gcs://b/p/", "gs://b/p"), ("gs://b/a/b", "gs://b/a/b")],
)
def test_root_uri(uri: str, root: str) -> None:
    assert gcs_root_uri(uri) == root


@pytest.mark.parametrize("uri", ["gs://", "gcs:///p", "s3://b/p", "gs://b/p#f"])
def test_bad_root_uri(uri: str) -> None:
    with pytest.raises(ConfigurationError):
        gcs_root_uri(uri)


def test_delete_model_removes_every_object(
    gcs_bucket: str, gcs_endpoint: str, sqlite_tracking_uri: str
) -> None:
    manager = _connect(f"gs://{gcs_bucket}/models", gcs_endpoint, sqlite_tracking_uri)
    experiment_id, run_id = round_trip(manager)
    run = manager.get_run_by_id(run_id)
    assert run is not None
    model_key = run.tags[T.TAG_MODEL_URI][len("gs://") :]
    fs = gcs_filesystem({"endpoint_url": gcs_endpoint, **EMU})
    # more objects than one GCS batch request deletes (100); one at a time, as the
    # emulator stalls under many concurrent connections
    for i in range(250):
        fs.pipe_file(f"{model_key}/shards/{i // 50}/part-{i:04d}.bin", b"x")
    assert len(fs.find(model_key)) > 250
    sibling = f"{model_key}-sibling/keep.bin"
    fs.pipe(sibling, b"keep")

    assert manager._delete_model(run_id, experiment_id) is True
    fs.invalidate_cache()
    assert fs.find(model_key) == []
    assert fs.cat(sibling) == b"keep"
    assert manager._delete_model(run_id, experiment_id) is True


def test_credentials_value_hides_its_secret() -> None:
    info = {"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----SENTINEL"}
    creds = GCSCredentials("bucket", project="p", service_account_info=info)
    assert "SENTINEL" not in repr(creds) and "SENTINEL" not in str(creds)
    assert creds.storage_options()["token"] == info
    assert creds.secrets() == ("-----BEGIN PRIVATE KEY-----SENTINEL",)
    with pytest.raises(ConfigurationError):
        GCSCredentials("b", service_account_file="/k.json", service_account_info=info)
    assert GCSCredentials("b", endpoint_url="http://e/").storage_options() == {
        "endpoint_url": "http://e",
        "token": "anon",
    }
    assert GCSCredentials("b", project="p", service_account_file="/k.json").storage_options() == {
        "project": "p",
        "token": "/k.json",  # gcsfs reads the key file itself
    }


def test_seed_counterpart_class(
    gcs_bucket: str, gcs_endpoint: str, sqlite_tracking_uri: str
) -> None:
    creds = GCSCredentials(gcs_bucket, project="test", endpoint_url=gcs_endpoint)
    manager = ExperimentsManagerWithGoogleCloudStorageBackend(
        sqlite_tracking_uri, creds, "quality", "seed-plugin", retry_config=FAST_RETRY
    )
    assert isinstance(manager, tracker_core.ExperimentsManager)
    assert manager.artifacts.root == f"gs://{gcs_bucket}/mlflow"
    assert manager.model_format == "mlflow.pytorch"
    assert manager.gcs_credentials is creds  # the seed's attribute
    experiment_id, run_id = round_trip(manager)
    assert manager.delete_model(run_id, experiment_id) is True
    assert manager.get_run_by_id(run_id, models_only=True) is None
    assert manager.has_initial_model()


def test_plain_mlflow_reads_the_model(
    gcs_bucket: str, gcs_endpoint: str, sqlite_tracking_uri: str, tmp_path: Path
) -> None:
    """MLflow's GCS artifact repository (google-cloud-storage) reads our model from the
    emulator given STORAGE_EMULATOR_HOST, in a fresh process."""
    manager = _connect(f"gcs://{gcs_bucket}/models", gcs_endpoint, sqlite_tracking_uri)
    model = tiny_model()
    _, run_id = round_trip(manager, model)
    env = {
        "STORAGE_EMULATOR_HOST": gcs_endpoint,
        "GOOGLE_CLOUD_PROJECT": "test",
    }
    assert_plain_mlflow_reads(run_id, model, sqlite_tracking_uri, env, tmp_path)
