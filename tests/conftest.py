"""The backend matrix: every behaviour test runs on local / S3 / GCS x SQLite / mlflow server.

Servers are real processes on 127.0.0.1, started once per session by
:mod:`tracker_core.testing.servers`; each test gets its own artifact prefix and its own plugin
name, so tests never see each other's experiments.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# gcsfs hangs against the emulator unless this is set before it is imported
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# a dead server must fail fast, not after minutes of MLflow's own retries
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

from tracker_core.testing import servers
from tracker_core.testing.harness import BackendUnderTest

ARTIFACT_SIDES = ("local", "s3", "gcs")
TRACKING_SIDES = ("sqlite", "server")
LEGS = [f"{a}-{t}" for a in ARTIFACT_SIDES for t in TRACKING_SIDES]
S3_BUCKET = "tracker-core-tests"
GCS_BUCKET = "tracker-core-tests"


# ------------------------------------------------------------------ tracking side
@pytest.fixture(scope="session")
def sqlite_tracking(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def server_tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with servers.mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


# ------------------------------------------------------------------ artifact side
@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with servers.moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir(S3_BUCKET)
        try:
            yield endpoint
        finally:
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="session")
def gcs_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with servers.gcs_emulator(tmp_path_factory.mktemp("gcs")) as endpoint:
        saved = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = endpoint
        import gcsfs

        fs = gcsfs.GCSFileSystem(endpoint_url=endpoint, token="anon")
        fs.mkdir(GCS_BUCKET)
        try:
            yield endpoint
        finally:
            if saved is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = saved


def _artifact_leg(side: str, request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, object]:
    unique = uuid.uuid4().hex[:12]
    if side == "local":
        return {"artifact_root": str(tmp_path / "artifacts")}
    if side == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        return {
            "artifact_root": f"s3://{S3_BUCKET}/{unique}",
            "env": {"MLFLOW_S3_ENDPOINT_URL": endpoint},
        }
    endpoint = request.getfixturevalue("gcs_endpoint")
    return {
        "artifact_root": f"gs://{GCS_BUCKET}/{unique}",
        "env": {"STORAGE_EMULATOR_HOST": endpoint},
    }


@pytest.fixture(params=LEGS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> BackendUnderTest:
    artifact_side, tracking_side = request.param.split("-")
    tracking_uri = request.getfixturevalue(f"{tracking_side}_tracking")
    return BackendUnderTest(
        id=request.param,
        tracking_uri=tracking_uri,
        capabilities=frozenset({"mlflow"}),
        **_artifact_leg(artifact_side, request, tmp_path),  # type: ignore[arg-type]
    )
