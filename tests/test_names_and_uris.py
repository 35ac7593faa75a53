"""Refused before anything is written: credentials in a storage URI, unusable names."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tracker_core import (
    ConfigurationError,
    ExperimentsManager,
    FineTuningIteration,
    InvalidArgumentError,
    InvalidNameError,
    TrackerError,
    connect,
)
from tracker_core.errors import InvalidMetricError

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(
    "uri",
    [
        f"s3://AKIAEXAMPLE:{SECRET}@bucket/models",
        f"gs://user:{SECRET}@bucket/models",
        f"s3://{SECRET}@bucket/models",
        # AWS secret keys often hold "/": urlsplit then sees no user part at all
        f"s3://AKIAEXAMPLE:{SECRET[:10]}/{SECRET[10:]}@bucket/models",
        f"gs://{SECRET[:10]}/{SECRET[10:]}:x@bucket/models",
        f"s3://bucket/models?secret={SECRET}",
        f"s3://bucket/models?x=1&password={SECRET}",
    ],
)
def test_credentials_in_a_storage_uri_are_refused(
    uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigurationError, match="storage_options") as info:
        connect(uri, tracking_uri=f"sqlite:///{tmp_path}/m.db", main_metric="m", plugin_name="p")
    for part in (SECRET, SECRET[:10], SECRET[10:]):
        assert part not in str(info.value)
        assert part not in caplog.text
    assert not (tmp_path / "m.db").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("plugin", "why"),
    [
        ("x" * 300, "at most"),
        ("my\nplugin", "printable"),
        ("tab\there", "printable"),
        (" padded", "whitespace"),
        ("a/b", "separator"),
    ],
)
def test_unusable_plugin_names_are_refused_at_connect(
    plugin: str, why: str, tmp_path: Path
) -> None:
    with pytest.raises(InvalidNameError, match=why):
        connect(
            str(tmp_path / "models"),
            tracking_uri=f"sqlite:///{tmp_path}/m.db",
            main_metric="m",
            plugin_name=plugin,
        )
    assert not (tmp_path / "m.db").exists()


def test_batch_ids_are_names_too() -> None:
    for bad in ("", "  ", " b", "b\n", "a/b", "x" * 201):
        with pytest.raises(InvalidNameError):
            FineTuningIteration(plugin_name="p", batch_id=bad)
    assert FineTuningIteration(plugin_name="p", batch_id="65844a671089823652b83d43").batch_id


def test_metric_names_follow_mlflow(tmp_path: Path) -> None:
    for bad in ("", "   ", "val acc (%)", "/loss", "loss/", "a//b", "x" * 251):
        with pytest.raises(InvalidMetricError):
            connect(str(tmp_path), main_metric=bad, plugin_name="p")
    for good in ("val/loss", "recall@5".replace("@", "_at_"), "epoch 1: loss"):
        mgr = connect(
            str(tmp_path / "m"),
            tracking_uri=f"sqlite:///{tmp_path}/ok.db",
            main_metric=good,
            plugin_name="p",
        )
        assert mgr.main_metric == good


def test_lease_seconds_must_be_positive(tmp_path: Path) -> None:
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ConfigurationError, match="lease_seconds"):
            connect(str(tmp_path), main_metric="m", plugin_name="p", lease_seconds=bad)


#: (keyword arguments of connect, the argument named, what the refusal says is allowed)
BAD_ARGUMENTS = [
    ({"keep": 1.5}, "keep", "an int of at least 1"),
    ({"keep": 0}, "keep", "an int of at least 1"),
    ({"keep": True}, "keep", "an int of at least 1"),
    ({"n_top_runs": 2.5}, "n_top_runs", "an int of at least 1"),
    ({"lease_seconds": 1e308}, "lease_seconds", "at most"),
    ({"lease_seconds": "60"}, "lease_seconds", "a number of seconds"),
    ({"tracking_uri": "bogus://x"}, "tracking_uri", "MLflow has no tracking store"),
    ({"tracking_uri": ""}, "tracking_uri", "non-empty text"),
    ({"model_factory": 42}, "model_factory", "callable"),
    ({"accumulators": [42]}, "accumulators", "MetricsAccumulator"),
    ({"accumulators": "mean"}, "accumulators", "a list of"),
    ({"requirements": "torch"}, "requirements", "a list of texts"),
    ({"requirements": ["torch", ""]}, "requirements", "non-empty"),
    ({"is_loss": "yes"}, "is_loss", "True or False"),
    ({"is_loss": 1}, "is_loss", "True or False"),
    ({"storage_options": 5}, "storage_options", "mapping with str keys"),
    ({"storage_options": {1: 2}}, "storage_options", "mapping with str keys"),
    ({"retry": 5}, "retry", "a RetryConfig"),
    ({"params_type": int}, "params_type", "subclass of FineTuningParams"),
    ({"model_format": 3}, "model_format", "non-empty text"),
]


@pytest.mark.parametrize(
    ("kwargs", "name", "allowed"), BAD_ARGUMENTS, ids=[case[1] for case in BAD_ARGUMENTS]
)
def test_connect_refuses_what_would_fail_later(
    kwargs: dict[str, object], name: str, allowed: str, tmp_path: Path
) -> None:
    """Every argument is checked when it is given, with a TrackerError that names it, shows
    the value and says what is allowed, before anything is written."""
    args = {"tracking_uri": f"sqlite:///{tmp_path}/m.db", **kwargs}
    with pytest.raises(InvalidArgumentError) as info:
        connect(str(tmp_path / "models"), main_metric="m", plugin_name="p", **args)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith(f"{name}=") and allowed in message
    assert isinstance(info.value, TrackerError)
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "models").exists()


def test_the_seed_classes_check_their_arguments_too(tmp_path: Path) -> None:
    from tracker_core_gcs import ExperimentsManagerWithGoogleCloudStorageBackend, GCSCredentials
    from tracker_core_mlflow import MLflowClientWrapper
    from tracker_core_s3 import ExperimentsManagerWithAmazonS3Backend, S3Credentials

    db = f"sqlite:///{tmp_path}/m.db"
    with pytest.raises(InvalidArgumentError, match=r"^tracking_uri="):
        MLflowClientWrapper("bogus://x")
    with pytest.raises(InvalidArgumentError, match=r"^requirements="):
        MLflowClientWrapper(db, requirements="torch")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"^wrapper="):
        ExperimentsManager.from_wrapper(object(), "m", "p")
    with pytest.raises(InvalidArgumentError, match=r"^secure="):
        S3Credentials("minio:9000", "key", "secret", "bucket", secure="no")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"^secret_key=<int> ") as info:
        S3Credentials("minio:9000", "key", 12345678, "bucket")  # type: ignore[arg-type]
    assert "12345678" not in str(info.value)  # a refused secret is never shown
    with pytest.raises(InvalidArgumentError, match=r"^bucket_name="):
        GCSCredentials(bucket_name="")
    key = "-----BEGIN PRIVATE KEY-----SENTINEL"
    with pytest.raises(InvalidArgumentError, match=r"^service_account_info=<str> ") as info:
        GCSCredentials("bucket", service_account_info=key)  # type: ignore[arg-type]
    assert "SENTINEL" not in str(info.value) and "dict" in str(info.value)
    creds = S3Credentials("minio:9000", "key", "secret", "bucket", secure=False)
    with pytest.raises(InvalidArgumentError, match=r"^prefix="):
        ExperimentsManagerWithAmazonS3Backend(db, creds, "m", "p", prefix=7)
    with pytest.raises(InvalidArgumentError, match=r"^keep="):
        ExperimentsManagerWithGoogleCloudStorageBackend(
            db, GCSCredentials(bucket_name="b"), "m", "p", keep=1.5
        )
    assert not (tmp_path / "m.db").exists()


@pytest.mark.parametrize(
    ("uri", "folder"),
    [
        ("file:///srv/models", "/srv/models"),
        ("file://localhost/srv/models/", "/srv/models"),
        ("file:///srv/my%20models", "/srv/my models"),
    ],
)
def test_local_file_uris_name_a_folder_of_this_host(uri: str, folder: str) -> None:
    from tracker_core_local.backend import local_root_uri

    assert local_root_uri(uri) == Path(folder).resolve().as_uri()


def test_a_file_uri_on_another_host_is_refused(tmp_path: Path) -> None:
    """``file://nas/models`` names a host: refused, naming it, before anything is written
    (read as a local folder it would silently put the models on this machine)."""
    with pytest.raises(ConfigurationError, match=r"file URIs must be local, got host 'nas'"):
        connect(
            "file://nas/models", tracking_uri=f"sqlite:///{tmp_path}/m.db",
            main_metric="m", plugin_name="p",
        )  # fmt: skip
    assert not (tmp_path / "m.db").exists()
