"""The plug-in's own test file: tracker-core's artifact-store contract in full, and a short
behaviour smoke (one test per invariant the manager keeps over an artifact store), run on the
memory backend by supplying two fixtures. (Named so the main test run does not collect it: it
needs the plug-in installed; ``tests/test_third_party_backend.py`` runs it in a process where
it is.)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracker_core.testing.contract_artifacts import *  # noqa: F403
from tracker_core.testing.harness import BackendUnderTest, fresh_sqlite_uri
from tracker_core.testing.suite import (  # noqa: F401 - the smoke: collected here
    mgr,
    test_crash_between_write_and_mark_keeps_previous_best,
    test_delete_previous_iteration_removes_models_and_frees_name,
    test_download_last_model_falls_back_to_initial,
    test_gc_deletes_orphans_without_leaving_empty_folders,
    test_pruning_leaves_no_empty_folders,
    test_retried_metric_batch_is_not_double_counted,
    test_save_model_keeps_only_the_best,
    test_set_run_resumes_same_params,
)


def _memory(tmp_path: Path) -> BackendUnderTest:
    return BackendUnderTest(
        "memory",
        artifact_root=f"memory://suite-{uuid.uuid4().hex[:8]}/models",
        tracking_uri=fresh_sqlite_uri(tmp_path),
    )


@pytest.fixture
def artifact_backend(tmp_path: Path) -> Iterator[BackendUnderTest]:
    leg = _memory(tmp_path)
    yield leg
    leg.close_all()


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[BackendUnderTest]:
    leg = _memory(tmp_path)
    yield leg
    leg.close_all()
