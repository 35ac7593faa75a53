"""Refused before anything is written: credentials in a storage URI, unusable names."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tracker_core import ConfigurationError, FineTuningIteration, InvalidNameError, connect
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
