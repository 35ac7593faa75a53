"""The backend matrix: every behaviour test runs on local / S3 / GCS x SQLite / mlflow server.

Servers are real processes on 127.0.0.1, started once per session by
:mod:`tracker_core.testing.servers`; each test gets its own artifact prefix and its own plugin
name, so tests never see each other's experiments.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import attrs
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


#: modules whose tests share module-scoped servers or worker fleets: under pytest-xdist (make
#: test), each runs in one test process instead of starting a copy of its stack in each
SHARED_STACK_MODULES = frozenset(
    {
        "test_faults",
        "test_mlflow_tracking_store",
        "test_parallel",
        "test_production_postgres",
        "test_servers",
        "test_service",
        "test_service_auth",
        "test_service_hooks",
        "test_service_secrets",
        "test_third_party_backend",
    }
)


#: the longest modules, started first so that none of them is left running alone at the end
LONGEST_FIRST = (
    "test_third_party_backend",
    "test_parallel",
    "test_chaos",
    "test_service",
    "test_service_outage",
    "test_champion",  # 50 iterations on two legs
)


def _module(item: pytest.Item) -> str:
    return str(getattr(getattr(item, "module", None), "__name__", ""))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    order = {name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(_module(item), len(order)))  # stable: modules stay whole
    for item in items:
        if _module(item) in SHARED_STACK_MODULES:
            item.add_marker(pytest.mark.xdist_group(_module(item)))


# ------------------------------------------------------------------ tracking side
@pytest.fixture(scope="session")
def sqlite_tracking(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def server_tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with servers.mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


# ------------------------------------------------------------------ artifact side
# moto's S3 server and the GCS emulator: one each per test process, shared with the
# backend-specific test modules (tests/_s3gcs_fixtures.py)
from _s3gcs_fixtures import gcs_endpoint, moto_endpoint  # noqa: E402, F401

from tracker_core_gcs.testing import make_gcs_backend_under_test  # noqa: E402
from tracker_core_s3.testing import make_s3_backend_under_test  # noqa: E402

#: what every shipped backend can do beyond the basics
SHIPPED_CAPABILITIES = frozenset({"mlflow", "processes"})


def _make_leg(
    artifact_side: str, tracking_uri: str, request: pytest.FixtureRequest, tmp_path: Path
) -> BackendUnderTest:
    if artifact_side == "s3":
        leg = make_s3_backend_under_test(request.getfixturevalue("moto_endpoint"), tracking_uri)
    elif artifact_side == "gcs":
        leg = make_gcs_backend_under_test(request.getfixturevalue("gcs_endpoint"), tracking_uri)
    else:
        leg = BackendUnderTest("local", str(tmp_path / "artifacts"), tracking_uri)
    return attrs.evolve(leg, capabilities=leg.capabilities | SHIPPED_CAPABILITIES)


@pytest.fixture(params=LEGS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendUnderTest]:
    artifact_side, tracking_side = request.param.split("-")
    tracking_uri = request.getfixturevalue(f"{tracking_side}_tracking")
    leg = attrs.evolve(_make_leg(artifact_side, tracking_uri, request, tmp_path), id=request.param)
    yield leg
    leg.close_all()
