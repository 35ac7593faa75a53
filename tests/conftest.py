"""Where each kind of test runs, decided by the fixture it takes (no per-test choice):

- ``tracking_backend`` (the tracking-store contract): every tracking store, SQLite in
  process, an ``mlflow server`` on SQLite, an ``mlflow server`` on PostgreSQL;
- ``artifact_backend`` (the artifact-store contract): every artifact store, local, S3 (moto),
  GCS (an emulator); the third-party memory store runs it in its own process
  (``tests/test_third_party_backend.py``);
- ``backend`` (the manager, driver and CLI behaviour): the reference leg ``local-sqlite`` and
  one remote leg ``s3-server`` (:data:`DEFAULT_LEGS`); ``--all-legs`` (``make test-all``) runs
  the whole local / S3 / GCS x SQLite / server matrix, and the few cases marked ``all_legs``
  (a long test's remote leg).

Servers are real processes on 127.0.0.1 (:mod:`tracker_core.testing.servers`); the MLflow
server, moto and the GCS emulator are started once for a whole run (``_shared_servers.py``),
PostgreSQL once per test process or module that needs it; each test gets its own artifact
prefix and its own plugin name, so tests never see each other's experiments.
"""

from __future__ import annotations

import contextlib
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

import _shared_servers

from tracker_core.testing import servers
from tracker_core.testing.harness import BackendUnderTest

ARTIFACT_SIDES = ("local", "s3", "gcs")
TRACKING_SIDES = ("sqlite", "server")
#: the tracking stores the contract runs on: the two legs' and the production one
CONTRACT_TRACKING_SIDES = (*TRACKING_SIDES, "postgres")
LEGS = [f"{a}-{t}" for a in ARTIFACT_SIDES for t in TRACKING_SIDES]
#: the legs behaviour tests run on by default: the reference leg and one remote leg (the store
#: contracts run every store; the other legs only combine stores the contracts already cover)
DEFAULT_LEGS = ("local-sqlite", "s3-server")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "all_legs: run only under --all-legs (make test-all), like the other legs"
    )
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        # the controller of a pytest-xdist run: one MLflow server, moto and GCS emulator for
        # every test process, started before them (tests/_shared_servers.py)
        stack = contextlib.ExitStack()
        config.add_cleanup(stack.close)
        _shared_servers.start_for_test_processes(stack)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--all-legs",
        action="store_true",
        help="run behaviour tests on every leg of the backend matrix, not only "
        f"{' and '.join(DEFAULT_LEGS)} (make test-all)",
    )


#: modules whose tests share module-scoped servers or worker fleets: under pytest-xdist (make
#: test), each runs in one test process instead of starting a copy of its stack in each (the
#: tests on PostgreSQL share the group "postgres", see _group)
SHARED_STACK_MODULES = frozenset(
    {
        "test_faults",
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
    "test_champion",  # 50 iterations
)


def _module(item: pytest.Item) -> str:
    return str(getattr(getattr(item, "module", None), "__name__", ""))


def _param(item: pytest.Item, name: str) -> object:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get(name) if callspec is not None else None


def _group(item: pytest.Item) -> str | None:
    """The xdist group of a test: the tests on PostgreSQL share one (one cluster and server),
    a shared-stack module is one."""
    if (
        _param(item, "tracking_backend") == "postgres"
        or _module(item) == "test_production_postgres"
    ):
        return "postgres"
    return _module(item) if _module(item) in SHARED_STACK_MODULES else None


# tryfirst: pytest-xdist reads the xdist_group marks in its own pytest_collection_modifyitems
# (on each test process), so they must be added before it runs
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--all-legs"):
        other_legs = set(LEGS) - set(DEFAULT_LEGS)

        def elsewhere(item: pytest.Item) -> bool:
            return (
                _param(item, "backend") in other_legs
                or item.get_closest_marker("all_legs") is not None
            )

        deselected = [item for item in items if elsewhere(item)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if not elsewhere(item)]
    order = {name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(_module(item), len(order)))  # stable: modules stay whole
    for item in items:
        group = _group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under ``--dist loadgroup``, pytest-xdist groups a test by the ``@group`` it appends to its
    node id; a pytest that ignores that rewrite (9.2 with xdist 3.8) silently gives every test
    its own group, and each shared-stack module then starts its stack in every test process."""
    if not getattr(session.config.option, "loadgroup", False):  # set on xdist test processes
        return
    lost = [
        item.nodeid
        for item in session.items
        if item.get_closest_marker("xdist_group") is not None and "@" not in item.nodeid
    ]
    if lost:
        raise pytest.UsageError(
            f"pytest-xdist's --dist loadgroup does not group tests on this pytest "
            f"({len(lost)} tests without their group, e.g. {lost[0]}): "
            "install the pytest pinned in requirements/constraints.txt"
        )


# ------------------------------------------------------------------ tracking side
@pytest.fixture(scope="session")
def sqlite_tracking(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def server_tracking() -> str:
    return _shared_servers.address("mlflow")


@pytest.fixture(scope="session")
def postgres_tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The production shape: an ``mlflow server`` on a private PostgreSQL."""
    if not servers.postgres_installed():  # a machine without PostgreSQL: say so
        pytest.skip("PostgreSQL's server binaries (initdb, postgres) are not installed here")
    workdir = tmp_path_factory.mktemp("pg")
    with (
        servers.postgres(workdir) as database_uri,
        servers.mlflow_server(workdir / "mlflow", database_uri) as url,
    ):
        yield url


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private PostgreSQL cluster for one test module (the task service's database)."""
    with servers.postgres(tmp_path_factory.mktemp("pg")) as url:
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


# ------------------------------------------------------------------ the store contracts
@pytest.fixture(params=CONTRACT_TRACKING_SIDES)
def tracking_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendUnderTest]:
    """Each tracking store, artifacts in a local folder (contract_tracking.py)."""
    tracking_uri = request.getfixturevalue(f"{request.param}_tracking")
    leg = _make_leg("local", tracking_uri, request, tmp_path)
    yield attrs.evolve(leg, id=f"local-{request.param}")
    leg.close_all()


@pytest.fixture(params=ARTIFACT_SIDES)
def artifact_backend(
    request: pytest.FixtureRequest, tmp_path: Path, sqlite_tracking: str
) -> Iterator[BackendUnderTest]:
    """Each artifact store at a fresh root, tracking in SQLite (contract_artifacts.py)."""
    leg = attrs.evolve(
        _make_leg(request.param, sqlite_tracking, request, tmp_path), id=f"{request.param}-sqlite"
    )
    yield leg
    leg.close_all()
