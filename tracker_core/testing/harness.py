"""What a backend supplies to run the shipped suites: one :class:`BackendUnderTest` per fixture.

- the store contracts take ``tracking_backend`` (:mod:`tracker_core.testing.contract_tracking`)
  and ``artifact_backend`` (:mod:`tracker_core.testing.contract_artifacts`): every test on
  every backend of that side;
- the behaviour suite (:mod:`tracker_core.testing.suite`) takes ``backend``: the manager over
  both stores.

tracker-core's own tests parametrise each over its side (``tests/conftest.py``); a
third-party backend runs a suite by defining the fixture and importing the tests::

    from tracker_core.testing.contract import *  # noqa: F403

    @pytest.fixture
    def artifact_backend(tmp_path):
        yield BackendUnderTest("mine", artifact_root="mine://bucket", tracking_uri=...)
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from tracker_core.connect import connect
from tracker_core.manager import ExperimentsManager
from tracker_core.opening import open_stores
from tracker_core.retry import RetryConfig, RetryParams
from tracker_core.stores import ArtifactStore, TrackingStore

__all__ = ["FAST_RETRY", "BackendUnderTest", "fresh_sqlite_uri"]

#: retries for tests: few attempts, short waits
FAST_RETRY = RetryConfig(RetryParams(max_attempts=3, wait_time_seconds=0.05, max_wait_seconds=0.2))


@functools.cache
def _migrated_sqlite_template() -> Path:
    """An empty MLflow SQLite database at the current schema, made once per process."""
    work = Path(tempfile.mkdtemp(prefix="tracker-core-sqlite-"))
    open_stores(str(work / "models"), tracking_uri=f"sqlite:///{work / 'template.db'}")
    return work / "template.db"


def fresh_sqlite_uri(folder: Path, name: str = "mlflow.db") -> str:
    """``sqlite:///<folder>/<name>``: an MLflow database of its own, empty and already at
    MLflow's current schema.

    MLflow migrates a new SQLite database on first use (about 2 s of CPU, most of a short
    test); this copies a database migrated once per process instead. A database already
    there is left as it is (a test that reconnects finds its runs)."""
    if not (folder / name).exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_migrated_sqlite_template(), folder / name)
    return f"sqlite:///{folder / name}"


@attrs.define
class BackendUnderTest:
    """One leg of the matrix: where models go and where runs are tracked.

    ``artifact_root`` should be unique per test (a fresh folder, bucket or prefix).
    ``env`` holds the environment plain MLflow needs to read the models (endpoints,
    credentials); :meth:`mlflow_env` applies it for interoperability checks.
    """

    id: str
    artifact_root: str
    tracking_uri: str
    storage_options: Mapping[str, Any] | None = None
    env: Mapping[str, str] = attrs.field(factory=dict)
    capabilities: frozenset[str] = frozenset()
    _opened: list[ExperimentsManager] = attrs.field(factory=list, init=False, eq=False, repr=False)

    def connect(self, **kwargs: Any) -> ExperimentsManager:
        """A manager on this backend; a unique plugin name unless one is given. Closed by
        :meth:`close_all` (the ``backend`` fixture calls it when the test ends)."""
        kwargs.setdefault("plugin_name", f"plugin-{uuid.uuid4().hex[:8]}")
        kwargs.setdefault("main_metric", "quality")
        kwargs.setdefault("retry", FAST_RETRY)
        kwargs.setdefault("storage_options", self.storage_options)
        manager = connect(self.artifact_root, tracking_uri=self.tracking_uri, **kwargs)
        self._opened.append(manager)
        return manager

    @contextlib.contextmanager
    def stores(self) -> Iterator[tuple[TrackingStore, ArtifactStore]]:
        """The two stores as the backend makes them, with no retry policy around them (for
        the store contracts), closed when the block ends."""
        tracking, artifacts = open_stores(
            self.artifact_root,
            tracking_uri=self.tracking_uri,
            storage_options=self.storage_options,
            retry=FAST_RETRY,
        )
        try:
            yield tracking, artifacts
        finally:
            tracking.close()
            artifacts.close()

    def close_all(self) -> None:
        """Close every manager :meth:`connect` made (runs still held are let go, not ended:
        a test may have left one unfinished on purpose)."""
        while self._opened:
            manager = self._opened.pop()
            with contextlib.suppress(Exception):
                manager.abandon_iteration()
            with contextlib.suppress(Exception):
                manager.close()

    def __getstate__(self) -> dict[str, Any]:  # managers stay in the process that made them
        state = {f.name: getattr(self, f.name) for f in attrs.fields(type(self))}
        state["_opened"] = []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)

    @contextlib.contextmanager
    def mlflow_env(self) -> Iterator[None]:
        """Apply :attr:`env` (and MLFLOW_TRACKING_URI) for the duration of the block."""
        saved = {k: os.environ.get(k) for k in (*self.env, "MLFLOW_TRACKING_URI")}
        os.environ.update({**self.env, "MLFLOW_TRACKING_URI": self.tracking_uri})
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
