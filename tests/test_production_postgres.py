"""The production shape: an ``mlflow server`` on PostgreSQL, models on S3, many workers.

The behaviour legs run the tracking side on SQLite (in process, and behind an MLflow
server); this module runs the invariants that matter most under concurrency once more with
PostgreSQL behind the server, where MLflow's SQL store behaves differently (real row locks,
no database-wide lock).
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from _s3gcs_fixtures import moto_endpoint  # noqa: F401

from tracker_core.testing.harness import BackendUnderTest
from tracker_core.testing.suite import (  # noqa: F401 - collected here, on this backend
    clock,
    mgr,
    test_concurrent_processes_keep_the_best_model,
    test_concurrent_workers_keep_the_best_model,
    test_crash_between_write_and_mark_keeps_previous_best,
    test_default_format_loads_with_plain_mlflow,
    test_delete_previous_iteration_removes_models_and_frees_name,
    test_get_top_params_ranks_all_finished_runs,
    test_retried_metric_batch_is_not_double_counted,
    test_run_deleted_as_it_is_taken_is_looked_up_again,
    test_same_params_in_several_processes_train_once,
    test_save_model_keeps_only_the_best,
    test_set_run_resumes_same_params,
)
from tracker_core_s3.testing import make_s3_backend_under_test


@pytest.fixture(params=["s3-postgres"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_tracking: str
) -> BackendUnderTest:
    leg = make_s3_backend_under_test(request.getfixturevalue("moto_endpoint"), postgres_tracking)
    return attrs.evolve(
        leg, id=request.param, capabilities=leg.capabilities | {"mlflow", "processes"}
    )
