"""Behaviour suite: metrics (invariant 5: nothing lost, nothing counted twice).

- values are validated when made (MLflow's own rules), batched and sent in the background;
- a retried batch is recorded once; a batch that cannot be sent stays queued and keeps its
  run open; ``finish_run``, ``save_model``, ``get_quality``, ``flush_metrics`` and interpreter
  exit wait for what was queued; order and steps are kept.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from pathlib import Path

import pytest

from tracker_core.accumulators import MetricsAccumulator
from tracker_core.errors import (
    InvalidMetricError,
    MaxAttemptsReachedException,
    TransientError,
)
from tracker_core.manager import ExperimentsManager
from tracker_core.retry import RetryConfig, RetryParams
from tracker_core.testing.faults import FaultyProxy
from tracker_core.testing.harness import BackendUnderTest
from tracker_core.testing.support import (
    Params,
    iteration,
    mgr,
    run_script,
    run_with_quality,
    status_of,
)
from tracker_core.values import MetricValue, RunStatus

__all__ = ["mgr"]  # completed at the end


# --------------------------------------------------------------------------- metrics
def _run_behind_proxy(backend: BackendUnderTest) -> tuple[ExperimentsManager, FaultyProxy, str]:
    """A manager whose tracking store is wrapped in a :class:`FaultyProxy`, with a run set."""
    mgr = backend.connect(params_type=Params)
    proxy = mgr.tracking.wrap(FaultyProxy)
    mgr.set_iteration(iteration(mgr))
    mgr.set_run(Params(lr=0.1))
    return mgr, proxy, mgr.current_run_id or ""


def test_accumulators_and_steps(backend: BackendUnderTest) -> None:
    acc = MetricsAccumulator(
        "loss", calc_mean=True, calc_sliding=True, calc_min=True, calc_max=True, window_size=2
    )
    mgr = backend.connect(main_metric="loss", is_loss=True, accumulators=[acc])
    mgr.set_iteration(iteration(mgr))
    mgr.set_run(Params(lr=0.1))
    for value in (4.0, 2.0, 3.0):
        mgr.save_metric(MetricValue("loss", value))
    assert mgr.get_quality() == 3.0
    run_id = mgr.current_run_id or ""
    mgr.finish_run()
    run = mgr.get_run_by_id(run_id)
    assert run is not None
    assert run.metrics["mean_loss"] == pytest.approx(3.0)
    assert run.metrics["sliding_loss"] == pytest.approx(2.5)
    assert run.metrics["min_loss"] == 2.0 and run.metrics["max_loss"] == 4.0
    history = mgr.tracking.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 4.0), (1, 2.0), (2, 3.0)]


def test_metrics_are_batched(backend: BackendUnderTest) -> None:
    mgr, proxy, _ = _run_behind_proxy(backend)
    before = proxy.calls["log_batch"]
    for i in range(200):
        mgr.save_metric(MetricValue("quality", i / 200))
    mgr.finish_run()
    assert proxy.calls["log_batch"] - before <= 2  # 200 values, one or two requests


def test_retried_metric_batch_is_not_double_counted(backend: BackendUnderTest) -> None:
    mgr, proxy, run_id = _run_behind_proxy(backend)
    for i in range(5):
        mgr.save_metric(MetricValue("quality", float(i)))
    # the server applies the batch, then the response is lost: the retry sends it again
    proxy.fail("log_batch", error=TransientError("response lost"), after_call=True)
    mgr.flush_metrics()
    history = mgr.tracking.get_metric_history(run_id, "quality")
    assert [m.value for m in history] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_metrics_flushed_by_finish_run_and_save_model(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr))
    run_id = run_with_quality(mgr, Params(lr=0.1), 0.25, save=False)
    run = mgr.get_run_by_id(run_id)
    assert run is not None and run.metrics["quality"] == 0.25


_EXIT_SCRIPT = """
import pickle, sys
from tracker_core.testing.support import Params, iteration
from tracker_core.values import MetricValue
backend = pickle.loads(bytes.fromhex(sys.argv[1]))
mgr = backend.connect(plugin_name=sys.argv[2])
mgr.set_iteration(iteration(mgr))
mgr.set_run(Params(lr=0.1))
for i in range(3):
    mgr.save_metric(MetricValue("quality", float(i)))
print(mgr.current_run_id)
# no finish_run, no flush: the interpreter exits with the values still queued
"""


def test_metrics_flushed_at_interpreter_exit(backend: BackendUnderTest, tmp_path: Path) -> None:
    plugin = f"plugin-{uuid.uuid4().hex[:8]}"
    result = run_script(backend, _EXIT_SCRIPT, plugin, check=True, cwd=tmp_path)
    run_id = result.stdout.strip().splitlines()[-1]
    mgr = backend.connect(plugin_name=plugin)
    history = mgr.tracking.get_metric_history(run_id, "quality")
    assert [m.value for m in history] == [0.0, 1.0, 2.0]


def test_from_wrapper_reuses_tracking_requirements_and_retry(backend: BackendUnderTest) -> None:
    if "mlflow" not in backend.capabilities:
        pytest.skip("MLflowClientWrapper is the MLflow backends' seed class")
    from tracker_core_mlflow import MLflowClientWrapper

    retry = RetryConfig(RetryParams(max_attempts=2, wait_time_seconds=0))
    wrapper = MLflowClientWrapper(backend.tracking_uri, requirements=["torch"], retry_config=retry)
    mgr = ExperimentsManager.from_wrapper(
        wrapper,
        main_metric="quality",
        plugin_name=f"plugin-{uuid.uuid4().hex[:8]}",
        accumulators=[MetricsAccumulator("quality", calc_mean=True)],
        is_loss=True,
        n_top_runs=3,
        artifact_uri=backend.artifact_root,
        storage_options=backend.storage_options,
        model_format="state_dict",
    )
    assert mgr.tracking_uri == backend.tracking_uri
    assert mgr.requirements == ["torch"] and mgr.retry_config == retry
    assert mgr.is_loss and mgr.n_top_runs == 3
    mgr.set_iteration(iteration(mgr))
    run_id = run_with_quality(mgr, Params(lr=0.1), 0.5)
    run = mgr.get_run_by_id(run_id)
    assert run is not None and run.metrics["mean_quality"] == 0.5


def test_invalid_metric_values_rejected() -> None:
    for bad in (math.nan, math.inf, -math.inf, "0.5", None):
        with pytest.raises(InvalidMetricError):
            MetricValue("quality", bad)  # type: ignore[arg-type]


def _history(mgr: ExperimentsManager, run_id: str, key: str) -> list[tuple[int | None, float]]:
    return [(m.step, m.value) for m in mgr.tracking.get_metric_history(run_id, key)]


def test_save_metric_never_waits_for_the_store(backend: BackendUnderTest) -> None:
    """Values are sent by a background sender: the caller queues 2,500 values while the store
    does not answer at all, and nothing is lost, doubled or reordered once it does."""
    mgr, proxy, run_id = _run_behind_proxy(backend)
    gate = proxy.hold("log_batch")  # the store stops answering
    before = proxy.calls["log_batch"]
    caller = threading.current_thread().name
    for i in range(2500):
        mgr.save_metric(MetricValue("loss", float(i)))  # would hang here if the caller sent
    assert proxy.calls["log_batch"] - before <= 1  # at most the first batch is in flight
    deadline = time.monotonic() + 60  # the sender sends in the caller's pause (liveness bound)
    while proxy.calls["log_batch"] == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.calls["log_batch"] - before == 1, "the sender did not send in the pause"
    gate.set()
    mgr.save_metric(MetricValue("quality", 0.5))
    mgr.finish_run()
    assert _history(mgr, run_id, "loss") == [(i, float(i)) for i in range(2500)]
    background = proxy.threads["log_batch"] - {caller}
    assert background, "no batch was sent by the background sender"


def test_full_metrics_queue_applies_back_pressure(backend: BackendUnderTest) -> None:
    mgr, proxy, run_id = _run_behind_proxy(backend)
    queue = mgr.tracker.runs.metrics
    queue.max_pending = queue.batch_size  # a small bound, to reach it quickly
    gate = proxy.hold("log_batch")
    produced: list[int] = []

    def produce() -> None:
        for i in range(3 * queue.batch_size):
            mgr.save_metric(MetricValue("loss", float(i)))
            produced.append(i)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    producer.join(timeout=2.0)
    assert producer.is_alive(), "the caller was not held back by a full queue"
    assert len(queue) <= queue.max_pending and len(produced) <= queue.max_pending
    gate.set()
    producer.join(timeout=300)
    assert not producer.is_alive()
    mgr.save_metric(MetricValue("quality", 0.5))
    mgr.finish_run()
    expected = [(i, float(i)) for i in range(3 * queue.batch_size)]
    assert _history(mgr, run_id, "loss") == expected


def test_failed_background_send_surfaces_at_the_next_flush(backend: BackendUnderTest) -> None:
    mgr, proxy, run_id = _run_behind_proxy(backend)
    proxy.fail("log_batch", error=TransientError("503"), times=10**6)  # the store is down
    for i in range(1500):  # a full batch: the sender tries (and fails) in the background
        mgr.save_metric(MetricValue("loss", float(i)))
    with pytest.raises(MaxAttemptsReachedException):
        mgr.flush_metrics()  # the failure reaches the caller, typed
    with pytest.raises(MaxAttemptsReachedException):
        mgr.get_quality()
    assert status_of(mgr, run_id) == RunStatus.RUNNING
    proxy.heal("log_batch")  # the store is back
    mgr.save_metric(MetricValue("quality", 0.5))
    assert mgr.get_quality() == 0.5
    mgr.finish_run()
    assert _history(mgr, run_id, "loss") == [(i, float(i)) for i in range(1500)]


__all__ = [*sorted(name for name in globals() if name.startswith("test_")), "mgr"]
