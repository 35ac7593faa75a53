"""Behaviour suite: runs and how they end (invariant 2; who trains them is suite_leases.py).

- the same params in the same iteration are the same run: a finished run is skipped, an
  unfinished one resumes; params come back typed;
- a run never ends FINISHED without its main metric; an implicit end leaves it resumable;
  ``with manager.run(params)`` ends it FINISHED, FAILED (the block raised) or resumable.
"""

from __future__ import annotations

import uuid

import pytest

from tracker_core.errors import (
    InvalidMetricError,
    MaxAttemptsReachedException,
    ModelNotSavedError,
    NoActiveIterationError,
    NoActiveRunError,
    TrackingStoreError,
    TransientError,
)
from tracker_core.manager import ExperimentsManager
from tracker_core.stores import RunQuery
from tracker_core.testing.faults import FaultyProxy
from tracker_core.testing.harness import BackendUnderTest
from tracker_core.testing.support import (
    Optimizer,
    Params,
    connect,
    iteration,
    mgr,
    run_with_quality,
    status_of,
    tiny_model,
)
from tracker_core.values import MetricValue, RunStatus

__all__ = ["mgr"]  # completed at the end


# --------------------------------------------------------------------------- runs
def test_set_run_needs_an_iteration(mgr: ExperimentsManager) -> None:
    with pytest.raises(NoActiveIterationError):
        mgr.set_run(Params(lr=0.1))
    with pytest.raises(NoActiveRunError):
        mgr.save_metric(MetricValue("quality", 1.0))


def test_set_run_resumes_same_params(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr))
    assert mgr.set_run(Params(lr=0.1)) is False  # new
    first = mgr.current_run_id
    mgr.tracker.runs.forget()  # crash: never finished
    assert mgr.set_run(Params(lr=0.1)) is False  # unfinished: resumed, train again
    assert mgr.current_run_id == first
    mgr.save_metric(MetricValue("quality", 0.3))
    mgr.finish_run()
    assert mgr.set_run(Params(lr=0.1)) is True  # finished: skip
    assert mgr.current_run_id == first
    assert mgr.set_run(Params(lr=0.2)) is False
    assert mgr.current_run_id != first
    runs = mgr.tracking.search_runs(RunQuery((mgr.current_experiment_id or "",)))
    assert len(runs) == 2


def test_finish_run_as_failed(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr))
    mgr.set_run(Params(lr=0.1))
    run_id = mgr.current_run_id or ""
    mgr.finish_run(as_failed=True)
    run = mgr.get_run_by_id(run_id)
    assert run is not None and run.status == RunStatus.FAILED
    assert mgr.set_run(Params(lr=0.1)) is True  # tried already: skipped, not retried
    assert mgr.get_run_by_id(run_id, models_only=True) is None


def test_failed_run_is_not_quality_zero(backend: BackendUnderTest) -> None:
    mgr = backend.connect(is_loss=True, model_format="state_dict", params_type=Params)
    mgr.set_iteration(iteration(mgr))
    mgr.set_run(Params(lr=0.1))
    mgr.finish_run(as_failed=True)
    good = run_with_quality(mgr, Params(lr=0.2), 0.7)
    assert mgr.get_best_quality() == (good, 0.7)
    assert mgr.get_best_current_run_id() == (good, False)


def test_params_round_trip_typed(mgr: ExperimentsManager) -> None:
    params = Params(
        lr=0.001,
        epochs=3,
        optimizer=Optimizer.SGD,
        layers=[16, 8, 2],
        freeze=True,
        note="a, b",
        warmup=None,
    )
    mgr.set_iteration(iteration(mgr))
    mgr.set_run(params)
    run = mgr.get_run_by_id(mgr.current_run_id or "")
    assert run is not None
    back = Params.from_mlflow(run.params)
    assert back == params and back.id == params.id
    assert isinstance(back.epochs, int) and isinstance(back.lr, float)
    assert back.optimizer is Optimizer.SGD and back.freeze is True


def test_get_run_by_id_models_only(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr))
    with_model = run_with_quality(mgr, Params(lr=0.1), 0.9)
    without = run_with_quality(mgr, Params(lr=0.2), 0.1)  # worse: not saved
    assert mgr.get_run_by_id(with_model, models_only=True) is not None
    assert mgr.get_run_by_id(without, models_only=True) is None
    assert mgr.get_run_by_id(without) is not None


# --------------------------------------------------------------------------- metrics
def test_invalid_metric_refused_and_valid_values_kept(mgr: ExperimentsManager) -> None:
    """A name MLflow refuses is refused when the value is made, not at flush: the valid
    values queued around it all reach the store and the run ends FINISHED with them."""
    mgr.set_iteration(iteration(mgr))
    mgr.set_run(Params(lr=0.1))
    run_id = mgr.current_run_id or ""
    for i in range(100):
        mgr.save_metric(MetricValue("loss", float(i)))
        if i == 50:
            for bad_name in ("val acc (%)", "/abs", "a//b", ""):
                with pytest.raises(InvalidMetricError):
                    mgr.save_metric(MetricValue(bad_name, 1.0))
            with pytest.raises(InvalidMetricError):
                MetricValue("loss", 10**400)
    mgr.save_metric(MetricValue("val/acc", 0.5))  # slashes are fine, as in MLflow
    mgr.save_metric(MetricValue("quality", 0.9))
    mgr.finish_run()
    assert status_of(mgr, run_id) == RunStatus.FINISHED
    assert len(mgr.tracking.get_metric_history(run_id, "loss")) == 100
    assert [m.value for m in mgr.tracking.get_metric_history(run_id, "val/acc")] == [0.5]


def test_failed_metric_batch_keeps_values_and_run_open(backend: BackendUnderTest) -> None:
    """A batch the store refuses for good stays queued, and the run is not ended: FINISHED
    without its metrics would be skipped forever by the same params."""
    mgr = connect(backend, f"plugin-{uuid.uuid4().hex[:8]}")
    proxy = mgr.tracking.wrap(FaultyProxy)
    mgr.set_iteration(iteration(mgr))
    mgr.set_run(Params(lr=0.1))
    run_id = mgr.current_run_id or ""
    for i in range(100):
        mgr.save_metric(MetricValue("loss", float(i)))
    mgr.save_metric(MetricValue("quality", 0.7))
    proxy.fail("log_batch", error=TrackingStoreError("refused"), times=2)
    with pytest.raises(TrackingStoreError):
        mgr.finish_run()
    assert status_of(mgr, run_id) == RunStatus.RUNNING  # not FINISHED without its metrics
    with pytest.raises(TrackingStoreError):
        mgr.set_iteration(iteration(mgr, "other"))  # an implicit end cannot lose them either
    assert mgr.current_run_id == run_id and status_of(mgr, run_id) == RunStatus.RUNNING
    proxy.fail("log_batch", error=TransientError("503"), times=3)  # one flush: 3 attempts
    with pytest.raises(MaxAttemptsReachedException):
        mgr.save_model(tiny_model())
    with pytest.raises(ModelNotSavedError):  # FINISHED would leave its metric with no model
        mgr.finish_run()
    assert status_of(mgr, run_id) == RunStatus.RUNNING
    assert mgr.save_model(tiny_model()) is True  # the store is back: the save succeeds
    mgr.finish_run()  # everything queued arrived, then the run ends
    assert status_of(mgr, run_id) == RunStatus.FINISHED
    assert [m.value for m in mgr.tracking.get_metric_history(run_id, "loss")] == [
        float(i) for i in range(100)
    ]
    assert mgr.set_run(Params(lr=0.1)) is True


# --------------------------------------------------------------------------- how runs end
def test_implicit_end_without_main_metric_leaves_run_resumable(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr))
    mgr.set_run(Params(lr=0.1))
    unfinished = mgr.current_run_id or ""
    mgr.save_metric(MetricValue("loss", 1.0))
    mgr.set_run(Params(lr=0.2))  # moves on before logging the main metric
    assert status_of(mgr, unfinished) == RunStatus.RUNNING
    mgr.save_metric(MetricValue("quality", 0.3))
    finished = mgr.current_run_id or ""
    mgr.set_iteration(iteration(mgr, "2"))  # the main metric was logged: FINISHED
    assert status_of(mgr, finished) == RunStatus.FINISHED
    mgr.set_iteration(iteration(mgr))
    assert mgr.set_run(Params(lr=0.1)) is False  # resumed, not skipped forever
    assert mgr.current_run_id == unfinished
    mgr.save_metric(MetricValue("quality", 0.5))
    mgr.finish_iteration()
    assert status_of(mgr, unfinished) == RunStatus.FINISHED
    assert [m.value for m in mgr.tracking.get_metric_history(unfinished, "loss")] == [1.0]


def test_explicit_finish_needs_the_main_metric(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr))
    mgr.set_run(Params(lr=0.1))
    run_id = mgr.current_run_id or ""
    with pytest.raises(InvalidMetricError):
        mgr.finish_run()
    assert status_of(mgr, run_id) == RunStatus.RUNNING
    mgr.finish_run(as_failed=True)  # FAILED needs no metric
    assert status_of(mgr, run_id) == RunStatus.FAILED


def test_run_context_manager_ends_runs(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr))
    with mgr.run(Params(lr=0.1)) as run:
        assert not run.finished
        mgr.save_metric(MetricValue("quality", 0.4))
        mgr.save_model(tiny_model(1))
    assert status_of(mgr, run.run_id) == RunStatus.FINISHED and mgr.current_run_id is None

    with pytest.raises(ValueError, match="diverged"), mgr.run(Params(lr=0.2)) as failed:
        mgr.save_metric(MetricValue("loss", 1.0))
        raise ValueError("diverged")
    assert status_of(mgr, failed.run_id) == RunStatus.FAILED

    with pytest.raises(KeyboardInterrupt), mgr.run(Params(lr=0.3)) as interrupted:
        raise KeyboardInterrupt
    assert status_of(mgr, interrupted.run_id) == RunStatus.RUNNING  # resumable

    with mgr.run(Params(lr=0.1)) as again:
        assert again.finished and again.run_id == run.run_id  # skip: nothing to do
    with mgr.run(Params(lr=0.3)) as resumed:
        assert not resumed.finished and resumed.run_id == interrupted.run_id
        mgr.save_metric(MetricValue("quality", 0.2))
    assert status_of(mgr, interrupted.run_id) == RunStatus.FINISHED
    assert mgr.get_best_quality() == (run.run_id, 0.4)


__all__ = [*sorted(name for name in globals() if name.startswith("test_")), "mgr"]
