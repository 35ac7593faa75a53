"""Fixtures shared by the S3 / GCS backend tests (import the ones a module uses).

The moto S3 server and the GCS emulator are the run's shared ones (``_shared_servers``):
importing these fixtures into several modules does not start several servers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _shared_servers
import attrs
import pytest

from tracker_core import ExperimentsManager, FineTuningIteration, FineTuningParams, MetricValue
from tracker_core.testing.harness import fresh_sqlite_uri

__all__ = [
    "AWS_TEST_ENV",
    "SmallParams",
    "_base_env",
    "artifact_leg",
    "assert_plain_mlflow_reads",
    "aws_env",
    "gcs_bucket",
    "gcs_endpoint",
    "gcs_env",
    "moto_endpoint",
    "round_trip",
    "s3_bucket",
    "same_weights",
    "sqlite_tracking_uri",
    "tiny_model",
    "unique_name",
]

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_CLEARED = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "MLFLOW_TRACKING_URI",
)


def unique_name(prefix: str) -> str:
    """A bucket-safe unique name."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def moto_endpoint() -> str:
    """moto's S3 server (one per run): ``http://127.0.0.1:PORT``."""
    return _shared_servers.address("moto")


@pytest.fixture(scope="session")
def gcs_endpoint() -> str:
    """The GCS emulator (one per run): ``http://127.0.0.1:PORT``."""
    return _shared_servers.address("gcs")


@pytest.fixture
def _base_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@pytest.fixture
def aws_env(_base_env: None, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """moto's fake AWS credentials in the environment; no endpoint variable set."""
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    return dict(AWS_TEST_ENV)


@pytest.fixture
def gcs_env(_base_env: None) -> None:
    """No GCS endpoint or credentials variables set."""


@pytest.fixture
def s3_bucket(moto_endpoint: str, aws_env: dict[str, str]) -> str:
    """A fresh, empty bucket on moto."""
    from tracker_core_s3 import s3_filesystem

    name = unique_name("bucket")
    s3_filesystem({"endpoint_url": moto_endpoint}).mkdir(name)
    return name


@pytest.fixture
def gcs_bucket(gcs_endpoint: str, gcs_env: None) -> str:
    """A fresh, empty bucket on the emulator."""
    from tracker_core_gcs import gcs_filesystem

    name = unique_name("bucket")
    gcs_filesystem({"endpoint_url": gcs_endpoint, "token": "anon", "project": "test"}).mkdir(name)
    return name


def artifact_leg(
    request: pytest.FixtureRequest, name: str, tmp_path: Path, prefix: str
) -> tuple[str, dict[str, Any] | None]:
    """``(artifact URI, storage options)`` of a fresh store: ``"local"`` (a folder of this
    test), ``"s3"`` (a bucket on moto) or ``"gcs"`` (a bucket on the emulator), models under
    ``prefix``."""
    if name == "local":
        return str(tmp_path / "models"), None
    if name == "s3":
        endpoint = request.getfixturevalue("moto_endpoint")
        return f"s3://{request.getfixturevalue('s3_bucket')}/{prefix}", {"endpoint_url": endpoint}
    endpoint = request.getfixturevalue("gcs_endpoint")
    bucket = request.getfixturevalue("gcs_bucket")
    return f"gs://{bucket}/{prefix}", {"endpoint_url": endpoint, "token": "anon", "project": "test"}


@pytest.fixture
def sqlite_tracking_uri(tmp_path: Path) -> Iterator[str]:
    """An in-process SQLite MLflow store of this test's own."""
    yield fresh_sqlite_uri(tmp_path)


def tiny_model() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


@attrs.frozen
class SmallParams(FineTuningParams):
    """Hyper-parameters of the test runs."""

    lr: float = 0.1
    epochs: int = 1


def same_weights(a: Any, b: Any) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def round_trip(manager: ExperimentsManager, model: Any | None = None) -> tuple[str, str]:
    """upload_initial_model, set_iteration, set_run, save_metric, save_model and
    download_best_model on ``manager``; returns ``(experiment_id, run_id)`` of the saved model."""
    model = model if model is not None else tiny_model()
    assert manager.upload_initial_model(tiny_model()) is True
    assert manager.upload_initial_model(tiny_model()) is False  # once only
    manager.set_iteration(FineTuningIteration(plugin_name=manager.plugin_name, batch_id="b1"))
    assert manager.set_run(SmallParams(lr=0.01)) is False  # a new run: to be trained
    for step, value in enumerate((0.2, 0.4, 0.7)):
        manager.save_metric(MetricValue("quality", value, step=step))
    assert manager.save_model(model) is True
    experiment_id, run_id = manager.current_experiment_id, manager.current_run_id
    assert experiment_id is not None and run_id is not None
    manager.finish_run()
    best = manager.download_best_model(experiment_id)
    assert same_weights(best, model)
    assert same_weights(manager.download_initial_model(), tiny_model())
    return experiment_id, run_id


_INTEROP = r"""
import json, sys
import mlflow, mlflow.artifacts, mlflow.pytorch, torch
run_id, expected_path, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
expected = torch.load(expected_path, weights_only=True)
same = all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=out_dir)
print(json.dumps({"same": same, "type": type(model).__name__, "local": local}))
"""


def assert_plain_mlflow_reads(
    run_id: str, model: Any, tracking_uri: str, env: dict[str, str], tmp_path: Path
) -> None:
    """Plain MLflow, in a fresh process given only the usual environment, loads the run's
    model with ``mlflow.pytorch.load_model("runs:/...")`` (same weights) and downloads it with
    ``mlflow.artifacts.download_artifacts``. A fresh process, because MLflow reads endpoint
    variables when it builds its storage clients."""
    import json
    import os
    import subprocess
    import sys

    import torch

    expected = tmp_path / "expected.pt"
    torch.save(model.state_dict(), expected)
    out = subprocess.run(
        [sys.executable, "-c", _INTEROP, run_id, str(expected), str(tmp_path / "dl")],
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["same"] is True
    assert result["type"] == "Linear"
    assert (Path(result["local"]) / "MLmodel").is_file()
