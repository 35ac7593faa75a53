"""Smoke tests: each real-server fixture of tracker_core.testing.servers really answers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tracker_core.testing.servers import (
    ServerStartError,
    free_port,
    gcs_emulator,
    mlflow_server,
    moto_server,
    postgres,
)

# gcsfs >= 2025.x probes for zonal/HNS buckets at import time unless this is off; it hangs
# against the emulator. It must be set before gcsfs is imported anywhere in the process.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(autouse=True)
def _fast_failing_mlflow_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with moto_server(tmp_path_factory.mktemp("moto")) as url:
        yield url


def _s3fs(endpoint: str) -> Any:
    import s3fs

    # No region_name="us-east-1": moto rejects a LocationConstraint of us-east-1.
    return s3fs.S3FileSystem(
        key="testing", secret="testing", endpoint_url=endpoint, use_listings_cache=False
    )


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_mlflow_server(mlflow_url: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    assert mlflow_url.startswith("http://127.0.0.1:")
    client = MlflowClient(tracking_uri=mlflow_url)
    exp_id = client.create_experiment("smoke")
    experiment = client.get_experiment(exp_id)
    assert experiment.name == "smoke"
    # --no-serve-artifacts: the location is a plain path the client writes to itself.
    assert experiment.artifact_location.endswith(f"/artifacts/{exp_id}")
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "loss", 0.5)
    payload = tmp_path / "hello.txt"
    payload.write_text("hi")
    client.log_artifact(run.info.run_id, str(payload))
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["hello.txt"]
    assert client.get_run(run.info.run_id).data.metrics == {"loss": 0.5}


def test_moto_server(s3_endpoint: str) -> None:
    fs = _s3fs(s3_endpoint)
    fs.mkdir("smoke-bucket")
    fs.pipe("smoke-bucket/a/b.bin", b"payload")
    assert fs.cat("smoke-bucket/a/b.bin") == b"payload"
    assert fs.ls("smoke-bucket/a", detail=False) == ["smoke-bucket/a/b.bin"]


def test_gcs_emulator(tmp_path: Path) -> None:
    import gcsfs

    with gcs_emulator(tmp_path) as url:
        assert url.startswith("http://127.0.0.1:")
        fs = gcsfs.GCSFileSystem(token="anon", endpoint_url=url, project="test")
        fs.mkdir("smoke-bucket")
        fs.pipe("smoke-bucket/a/b.bin", b"payload")
        assert fs.cat("smoke-bucket/a/b.bin") == b"payload"
        assert fs.ls("smoke-bucket/a", detail=False) == ["smoke-bucket/a/b.bin"]


def test_postgres_backed_mlflow_server(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    with postgres(tmp_path / "pg") as db_uri:
        assert db_uri.startswith("postgresql+psycopg://")
        with mlflow_server(tmp_path / "mlflow", backend_store_uri=db_uri) as url:
            client = MlflowClient(tracking_uri=url)
            exp_id = client.create_experiment("on-postgres")
            assert client.get_experiment_by_name("on-postgres").experiment_id == exp_id  # type: ignore[union-attr]

        import psycopg

        # The experiment really is in PostgreSQL, not in some SQLite file.
        with psycopg.connect(db_uri.replace("postgresql+psycopg://", "postgresql://")) as conn:
            names = [r[0] for r in conn.execute("SELECT name FROM experiments").fetchall()]
        assert "on-postgres" in names


def test_mlflow_client_writes_artifacts_to_s3_on_moto(
    mlflow_url: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --no-serve-artifacts the *client* writes to an s3:// experiment location directly."""
    from mlflow import MlflowClient

    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)
    fs = _s3fs(s3_endpoint)
    fs.mkdir("mlflow-artifacts")

    client = MlflowClient(tracking_uri=mlflow_url)
    exp_id = client.create_experiment("s3-exp", artifact_location="s3://mlflow-artifacts/exp")
    run = client.create_run(exp_id)
    assert run.info.artifact_uri == f"s3://mlflow-artifacts/exp/{run.info.run_id}/artifacts"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(b"\x00\x01")
    client.log_artifacts(run.info.run_id, str(model_dir), artifact_path="model")

    key = f"mlflow-artifacts/exp/{run.info.run_id}/artifacts/model/weights.bin"
    assert fs.cat(key) == b"\x00\x01"
    downloaded = client.download_artifacts(run.info.run_id, "model", str(tmp_path / "dl"))
    assert (Path(downloaded) / "weights.bin").read_bytes() == b"\x00\x01"


def test_dead_server_reports_its_log(tmp_path: Path) -> None:
    with (
        pytest.raises(ServerStartError, match=r"exited with code .*last lines"),
        mlflow_server(tmp_path, backend_store_uri="nosuchscheme://x", timeout=60),
    ):
        pass
