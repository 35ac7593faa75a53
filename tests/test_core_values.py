"""Unit tests of the core values: accumulators, names, registry, retry (params: test_params.py)."""

from __future__ import annotations

import pytest

import tracker_core
from tracker_core import (
    BackendNotInstalledError,
    FineTuningIteration,
    InvalidNameError,
    MaxAttemptsReachedException,
    MetricsAccumulator,
    MetricValue,
    RetryConfig,
    RetryParams,
    TransientError,
    UnknownSchemeError,
)
from tracker_core.errors import redact
from tracker_core.registry import get_backend, scheme_of
from tracker_core.retry import Retrier


def test_accumulator_constant_work_values() -> None:
    acc = MetricsAccumulator(
        "loss", calc_mean=True, calc_sliding=True, calc_min=True, calc_max=True, window_size=3
    )
    values = [5.0, 1.0, 3.0, 2.0, 8.0]
    out = []
    for v in values:
        out = dict(acc.accumulate(MetricValue("loss", v)))
    assert out == {
        "loss": 8.0,
        "mean_loss": pytest.approx(19 / 5),
        "sliding_loss": pytest.approx(13 / 3),
        "min_loss": 1.0,
        "max_loss": 8.0,
    }
    assert acc.accumulate(MetricValue("other", 1.0)) == []
    acc.clear()
    assert dict(acc.accumulate(MetricValue("loss", 2.0)))["mean_loss"] == 2.0


def test_iteration_names() -> None:
    it = FineTuningIteration(plugin_name="Emb", batch_id="b1", run_id="r0")
    assert str(it) == "Emb / iteration / r0 / b1"
    for bad in ("a/b", "..", "", "x\\y"):
        with pytest.raises(InvalidNameError):
            FineTuningIteration(plugin_name=bad, batch_id="b")


def test_scheme_of() -> None:
    assert scheme_of("s3://b/p") == "s3"
    assert scheme_of("gs://b") == "gs"
    assert scheme_of("/abs/path") == "file"
    assert scheme_of("relative/dir") == "file"
    assert scheme_of("file:///x") == "file"
    assert scheme_of("C:\\models") == "file"


def test_unknown_scheme_lists_installed() -> None:
    with pytest.raises(UnknownSchemeError) as info:
        get_backend("nosuch")
    assert "file" in str(info.value)
    with pytest.raises(UnknownSchemeError):
        tracker_core.connect("nosuch://x", main_metric="m", plugin_name="p")


def test_known_but_missing_backend_names_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    from tracker_core import registry

    monkeypatch.setitem(
        registry.KNOWN_BACKENDS, "azure", {"dist": "tracker-core-azure", "err": "x"}
    )
    with pytest.raises(BackendNotInstalledError, match="tracker-core-azure"):
        get_backend("azure")


def test_retry_only_transient() -> None:
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise TransientError("503")
        return "ok"

    retrier = Retrier(RetryConfig(RetryParams(max_attempts=3, wait_time_seconds=0)))
    assert retrier.call("op", flaky) == "ok" and calls["n"] == 3

    def permanent() -> None:
        calls["n"] += 1
        raise KeyError("nope")

    calls["n"] = 0
    with pytest.raises(KeyError):
        retrier.call("op", permanent)
    assert calls["n"] == 1

    def always() -> None:
        raise ConnectionResetError("reset")

    with pytest.raises(MaxAttemptsReachedException) as info:
        retrier.call("upload_model", always)
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert info.value.attempts == 3


def test_retry_config_per_operation() -> None:
    config = RetryConfig(RetryParams(max_attempts=2), {"upload_model": RetryParams(max_attempts=7)})
    assert config["upload_model"].max_attempts == 7
    assert config["anything"].max_attempts == 2
    assert config == RetryConfig(
        RetryParams(max_attempts=2), {"upload_model": RetryParams(max_attempts=7)}
    )


def test_redact() -> None:
    text = "aws_secret_access_key=abcd1234 url http://user:hunter22@host/x token: xyz987"
    out = redact(text, "SENTINEL")
    assert "abcd1234" not in out and "hunter22" not in out and "xyz987" not in out
    assert redact("key SENTINEL-SECRET here", "SENTINEL-SECRET") == "key *** here"


def test_core_imports_no_backend_and_no_heavy_client() -> None:
    """DESIGN: the core imports neither mlflow, s3fs, gcsfs nor any backend (nor torch)."""
    import subprocess
    import sys

    code = (
        "import sys, tracker_core, tracker_core.cli, tracker_core.finetune, tracker_core.registry\n"
        "banned = ('mlflow', 's3fs', 'gcsfs', 'boto3', 'torch', 'tracker_core_mlflow',\n"
        "          'tracker_core_local', 'tracker_core_s3', 'tracker_core_gcs')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in banned))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
