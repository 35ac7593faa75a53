"""Behaviour suite: loud failures, one retry policy, no global state (invariants 4-6), and
plain MLflow reading what tracker-core wrote."""

from __future__ import annotations

import math

import attrs
import pytest

from tracker_core import tags as T
from tracker_core.errors import (
    InvalidMetricError,
    InvalidNameError,
    InvalidParamsError,
    MaxAttemptsReachedException,
    TransientError,
)
from tracker_core.manager import ExperimentsManager
from tracker_core.params import FineTuningParams
from tracker_core.retry import RetryConfig, RetryParams
from tracker_core.stores import ExperimentQuery
from tracker_core.testing.faults import FaultyProxy
from tracker_core.testing.harness import BackendUnderTest
from tracker_core.testing.support import (
    Params,
    iteration,
    mgr,
    run_with_quality,
    tiny_model,
    weights,
)
from tracker_core.values import FineTuningIteration, MetricValue

__all__ = ["mgr"]  # completed at the end


# --------------------------------------------------------------------------- errors
def test_bad_configuration_fails_before_writing(backend: BackendUnderTest) -> None:
    for metric in ("", "   ", None, 3):
        with pytest.raises(InvalidMetricError):
            backend.connect(main_metric=metric)
    for name in ("a/b", "..", "x\\y", ""):
        with pytest.raises(InvalidNameError):
            backend.connect(plugin_name=name)
    with pytest.raises(InvalidNameError):
        FineTuningIteration(plugin_name="p", batch_id="../etc")
    mgr = backend.connect()
    assert mgr.get_experiments() == []


def test_unsupported_params_rejected_before_writing(mgr: ExperimentsManager) -> None:
    @attrs.frozen
    class BadParams(FineTuningParams):
        weights: set[float]

    with pytest.raises(InvalidParamsError):
        BadParams(weights={1.0})
    with pytest.raises(InvalidParamsError):
        Params(lr=math.nan)
    assert mgr.get_experiments() == []


def test_transient_errors_retried_permanent_fail_at_once(backend: BackendUnderTest) -> None:
    mgr = backend.connect(retry=RetryConfig(RetryParams(max_attempts=3, wait_time_seconds=0)))
    proxy = mgr.tracking.wrap(FaultyProxy)
    proxy.fail("get_experiment_by_name", error=TransientError("503"), times=2)
    mgr.set_iteration(iteration(mgr))  # two transient failures, then success
    assert proxy.calls["get_experiment_by_name"] == 3
    proxy.fail("get_experiment_by_name", error=TransientError("503"), times=3)
    with pytest.raises(MaxAttemptsReachedException) as info:
        mgr.set_iteration(iteration(mgr, "2"))
    assert isinstance(info.value.__cause__, TransientError)
    calls = proxy.calls["search_runs"]
    proxy.fail("search_runs", error=ValueError("bad request"))
    with pytest.raises(ValueError):
        mgr.models.marked_runs(mgr.current_experiment_id or "")
    assert proxy.calls["search_runs"] == calls + 1  # no retry for a permanent error


# --------------------------------------------------------------------------- interoperability
def test_default_format_loads_with_plain_mlflow(backend: BackendUnderTest) -> None:
    if "mlflow" not in backend.capabilities:
        pytest.skip("backend is not read by plain MLflow")
    import mlflow.pytorch

    mgr = backend.connect()  # the backend's default format
    assert mgr.model_format == "mlflow.pytorch"
    mgr.set_iteration(iteration(mgr))
    run_id = run_with_quality(mgr, Params(lr=0.1), 0.5, seed=5)
    with backend.mlflow_env():
        loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    assert weights(loaded) == weights(tiny_model(5))
    assert weights(mgr.download_model_by_run_id(run_id)) == weights(tiny_model(5))


def test_two_managers_in_one_thread_do_not_interfere(backend: BackendUnderTest) -> None:
    a = backend.connect(model_format="state_dict", params_type=Params)
    b = backend.connect(model_format="state_dict", params_type=Params, is_loss=True)
    a.set_iteration(iteration(a))
    b.set_iteration(iteration(b))
    a.set_run(Params(lr=0.1))
    b.set_run(Params(lr=0.1))
    a.save_metric(MetricValue("quality", 0.4))
    b.save_metric(MetricValue("quality", 0.6))
    a.finish_run()
    b.finish_run()
    assert a.current_experiment_id != b.current_experiment_id
    assert a.get_best_quality()[1] == 0.4 and b.get_best_quality()[1] == 0.6


def test_store_queries_filter_on_the_server(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr, "1"))
    run_with_quality(mgr, Params(lr=0.1), 0.5)
    page, _ = mgr.tracking.search_experiments(
        ExperimentQuery(tags={T.TAG_PLUGIN: mgr.plugin_name}), max_results=10
    )
    assert [e.name for e in page] == [str(iteration(mgr, "1"))]


__all__ = [*sorted(name for name in globals() if name.startswith("test_")), "mgr"]
