"""The plug-in's own test file: tracker-core's whole behaviour suite, run on the memory
backend by supplying one fixture. (Named so the main test run does not collect it: it needs
the plug-in installed; ``tests/test_third_party_backend.py`` runs it in a process where it is.)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracker_core.testing.harness import BackendUnderTest
from tracker_core.testing.suite import *  # noqa: F403


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[BackendUnderTest]:
    yield BackendUnderTest(
        "memory",
        artifact_root=f"memory://suite-{uuid.uuid4().hex[:8]}/models",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )


@pytest.mark.skip(
    reason="memory:// lives inside one process: there is nothing to share across processes"
)
def test_concurrent_processes_keep_the_best_model() -> None:
    """Overrides the suite's test of the same name (the one process-bound test)."""
