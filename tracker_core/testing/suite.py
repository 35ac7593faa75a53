"""The behaviour suite every backend passes: the seed's API and DESIGN.md's invariants.

Each test takes the ``backend`` fixture (a :class:`~tracker_core.testing.harness.BackendUnderTest`).
Import the tests into a test module that defines that fixture::

    from tracker_core.testing.suite import *  # noqa: F403

Capabilities (``BackendUnderTest.capabilities``) gate what only some backends do:
``"mlflow"``, plain MLflow reads what we wrote; ``"processes"``, the stores are shared by
separate processes. Every shipped backend has both.
"""

from __future__ import annotations

import enum
import math
import threading
import uuid
from pathlib import Path
from typing import Any

import attrs
import pytest

from tracker_core import tags as T
from tracker_core.accumulators import MetricsAccumulator
from tracker_core.errors import (
    ConfigurationError,
    InvalidMetricError,
    InvalidNameError,
    InvalidParamsError,
    MaxAttemptsReachedException,
    NoActiveIterationError,
    NoActiveRunError,
    TrackerError,
    TransientError,
)
from tracker_core.manager import ExperimentsManager
from tracker_core.params import FineTuningParams
from tracker_core.retry import RetryConfig, RetryParams
from tracker_core.stores import ExperimentQuery, RunQuery
from tracker_core.testing.faults import FaultyProxy
from tracker_core.testing.harness import BackendUnderTest
from tracker_core.values import FineTuningIteration, MetricValue, RunStatus

__all__ = [name for name in dir() if name.startswith("test_")]  # filled at the end


class Optimizer(enum.Enum):
    ADAM = "adam"
    SGD = "sgd"


@attrs.frozen
class Params(FineTuningParams):
    lr: float
    epochs: int = 1
    optimizer: Optimizer = Optimizer.ADAM
    layers: list[int] = attrs.field(factory=lambda: [8, 4])
    freeze: bool = False
    note: str = ""
    warmup: float | None = None


def tiny_model(seed: int = 0) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2)


def weights(model: Any) -> list[float]:
    """A model's weights as plain floats (accepts a module or a state dict)."""
    state = model.state_dict() if hasattr(model, "state_dict") else model
    return [float(x) for tensor in state.values() for x in tensor.flatten().tolist()]


def run_with_quality(
    mgr: ExperimentsManager, params: Params, quality: float, *, save: bool = True, seed: int = 0
) -> str:
    """One run: log the main metric, save the model (best only), finish. Returns the run id."""
    mgr.set_run(params)
    run_id = mgr.current_run_id
    assert run_id is not None
    mgr.save_metric(MetricValue(mgr.main_metric, quality))
    if save:
        mgr.save_model(tiny_model(seed))
    mgr.finish_run()
    return run_id


def marked_models(mgr: ExperimentsManager, experiment_id: str) -> set[str]:
    runs = mgr.tracking.search_runs(RunQuery((experiment_id,), tags={T.TAG_MODEL_UPLOADED: T.TRUE}))
    return {r.run_id for r in runs}


def stored_models(mgr: ExperimentsManager, experiment_id: str) -> set[str]:
    """Run ids whose model files exist in the artifact store (whatever the marks say)."""
    out = set()
    for run in mgr.tracking.search_runs(RunQuery((experiment_id,))):
        if mgr.artifacts.exists(f"{run.artifact_uri}/{T.MODEL_DIR}"):
            out.add(run.run_id)
    return out


def iteration(mgr: ExperimentsManager, batch: str = "b1") -> FineTuningIteration:
    return FineTuningIteration(plugin_name=mgr.plugin_name, batch_id=batch)


@pytest.fixture
def mgr(backend: BackendUnderTest) -> Any:
    manager = backend.connect(
        model_format="state_dict", model_factory=tiny_model, params_type=Params
    )
    yield manager
    manager.close()


# --------------------------------------------------------------------------- initial model
def test_upload_initial_model_is_idempotent(mgr: ExperimentsManager) -> None:
    assert not mgr.has_initial_model()
    assert mgr.get_initial_model_run_id() is None
    assert mgr.upload_initial_model(tiny_model(1)) is True
    run_id = mgr.get_initial_run_id()
    assert run_id and mgr.is_initial_run(run_id) and not mgr.is_initial_run("other")
    assert mgr.has_initial_model()
    assert mgr.get_initial_model_run_id() == run_id
    assert mgr.upload_initial_model(tiny_model(2)) is False  # uploads nothing
    assert weights(mgr.download_initial_model()) == weights(tiny_model(1))


def test_initial_model_survives_iteration_cleanup(mgr: ExperimentsManager) -> None:
    mgr.upload_initial_model(tiny_model(1))
    for batch in ("b1", "b2", "b3"):
        mgr.set_iteration(iteration(mgr, batch))
        run_with_quality(mgr, Params(lr=0.1), 0.5)
        mgr.delete_previous_iteration()
    mgr.finish_iteration()
    assert mgr.has_initial_model()
    assert weights(mgr.download_initial_model()) == weights(tiny_model(1))
    assert len(mgr.get_experiments()) == 1


def test_delete_model_refuses_initial_experiment(mgr: ExperimentsManager) -> None:
    mgr.upload_initial_model(tiny_model())
    initial = mgr.tracking.get_experiment_by_name(mgr._fix_name("iteration / initial"))
    assert initial is not None
    with pytest.raises(ConfigurationError):
        mgr.delete_model(mgr.get_initial_run_id() or "", initial.experiment_id)
    assert mgr.has_initial_model()


def test_initial_name_reusable_after_deletion(mgr: ExperimentsManager) -> None:
    mgr.upload_initial_model(tiny_model(1))
    initial = mgr._get_initial_experiment()
    assert initial is not None
    mgr.tracking.delete_experiment(initial.experiment_id)
    mgr._iterations.forget_initial()
    assert not mgr.has_initial_model()
    assert mgr.upload_initial_model(tiny_model(2)) is True
    assert weights(mgr.download_initial_model()) == weights(tiny_model(2))


# --------------------------------------------------------------------------- iterations
def test_names_and_properties(backend: BackendUnderTest) -> None:
    mgr = backend.connect(plugin_name="MyPlugin", is_loss=True)
    assert mgr.is_loss is True
    assert mgr._fix_name("Experiment1") == "MyPlugin / Experiment1"
    it = FineTuningIteration(plugin_name="MyPlugin", batch_id="b7")
    assert str(it) == "MyPlugin / iteration /  / b7"
    mgr.set_iteration(it)
    assert mgr.current_experiment_id is not None
    experiment = mgr.tracking.get_experiment(mgr.current_experiment_id)
    assert experiment is not None and experiment.name == str(it)
    mgr.finish_iteration()
    assert mgr.current_experiment_id is None and mgr.current_iteration is None


def test_set_iteration_rejects_other_plugin(mgr: ExperimentsManager) -> None:
    with pytest.raises(ConfigurationError):
        mgr.set_iteration(FineTuningIteration(plugin_name="someone-else", batch_id="b"))


def test_get_experiments_lists_only_this_plugins_iterations(backend: BackendUnderTest) -> None:
    a, b = backend.connect(), backend.connect()
    a.upload_initial_model(tiny_model())
    for batch in ("1", "2"):
        a.set_iteration(iteration(a, batch))
    b.set_iteration(iteration(b, "x"))
    names = [e.name for e in a.get_experiments()]
    assert names == [str(iteration(a, "2")), str(iteration(a, "1"))]  # newest first
    assert [e.name for e in b.get_experiments()] == [str(iteration(b, "x"))]


def test_previous_and_last_iteration_never_current(mgr: ExperimentsManager) -> None:
    assert mgr.get_previous_iteration_id() is None  # no current iteration
    mgr.set_iteration(iteration(mgr, "1"))
    first = mgr.current_experiment_id
    assert mgr.get_previous_iteration_id() is None
    assert mgr.get_last_iteration_id() is None
    mgr.set_iteration(iteration(mgr, "2"))
    second = mgr.current_experiment_id
    assert mgr.get_previous_iteration_id() == first
    assert mgr.get_last_iteration_id() == first
    mgr.finish_iteration()
    assert mgr.get_last_iteration_id() == second
    # resuming the older iteration: its previous is none, never itself
    mgr.set_iteration(iteration(mgr, "1"))
    assert mgr.current_experiment_id == first
    assert mgr.get_previous_iteration_id() is None
    assert mgr.get_last_iteration_id() == second


def test_last_finished_iteration_needs_every_run_ended(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr, "1"))
    first = mgr.current_experiment_id
    run_with_quality(mgr, Params(lr=0.1), 0.5)
    mgr.set_run(Params(lr=0.2))
    mgr.finish_run(as_failed=True)
    mgr.set_iteration(iteration(mgr, "2"))
    mgr.set_run(Params(lr=0.3))  # left RUNNING
    mgr._forget_run()  # simulate a crash: the run stays RUNNING on the server
    mgr.finish_iteration()
    assert mgr.get_last_finished_iteration_id() == first
    mgr.set_iteration(iteration(mgr, "3"))  # current, excluded even with finished runs
    run_with_quality(mgr, Params(lr=0.1), 0.4)
    assert mgr.get_last_finished_iteration_id() == first


def test_delete_previous_iteration_removes_models_and_frees_name(mgr: ExperimentsManager) -> None:
    mgr.upload_initial_model(tiny_model())
    mgr.set_iteration(iteration(mgr, "1"))
    first = mgr.current_experiment_id
    assert first is not None
    run_id = run_with_quality(mgr, Params(lr=0.1), 0.5)
    model_uri = mgr._model_uri(mgr._get_run(run_id))
    assert mgr.artifacts.exists(model_uri)
    mgr.set_iteration(iteration(mgr, "2"))
    run_with_quality(mgr, Params(lr=0.1), 0.6)  # the current iteration holds a model
    mgr.delete_previous_iteration()
    assert not mgr.artifacts.exists(model_uri)
    gone = mgr.tracking.get_experiment(first)
    assert gone is None or gone.lifecycle_stage == "deleted"
    assert [e.name for e in mgr.get_experiments()] == [str(iteration(mgr, "2"))]
    # the deleted iteration's name never blocks creating it again
    mgr.set_iteration(iteration(mgr, "1"))
    assert mgr.current_experiment_id not in (None, first)
    assert mgr.tracking.search_runs(RunQuery((mgr.current_experiment_id or "",))) == []
    assert mgr.has_initial_model()


def test_delete_previous_iteration_without_previous_is_a_noop(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr, "1"))
    mgr.delete_previous_iteration()
    assert len(mgr.get_experiments()) == 1


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
    mgr._forget_run()  # crash: never finished
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
    mgr = backend.connect()
    proxy = FaultyProxy(mgr.tracking)
    mgr.tracking = proxy  # type: ignore[assignment]
    mgr.set_iteration(iteration(mgr))
    mgr.set_run(Params(lr=0.1))
    before = proxy.calls["log_batch"]
    for i in range(200):
        mgr.save_metric(MetricValue("quality", i / 200))
    mgr.finish_run()
    assert proxy.calls["log_batch"] - before <= 2  # 200 values, one or two requests


def test_retried_metric_batch_is_not_double_counted(backend: BackendUnderTest) -> None:
    mgr = backend.connect()
    proxy = FaultyProxy(mgr.tracking)
    mgr.tracking = proxy  # type: ignore[assignment]
    mgr.set_iteration(iteration(mgr))
    mgr.set_run(Params(lr=0.1))
    run_id = mgr.current_run_id or ""
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
from tracker_core.testing.suite import Params, iteration
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
    import pickle
    import subprocess
    import sys

    if "processes" not in backend.capabilities:
        pytest.skip("the backend's stores are not shared across processes")
    plugin = f"plugin-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT, pickle.dumps(backend).hex(), plugin],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=tmp_path,
    )
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


# --------------------------------------------------------------------------- best model
@pytest.mark.parametrize("is_loss", [False, True])
def test_save_model_keeps_only_the_best(backend: BackendUnderTest, is_loss: bool) -> None:
    mgr = backend.connect(
        is_loss=is_loss, model_format="state_dict", model_factory=tiny_model, params_type=Params
    )
    mgr.set_iteration(iteration(mgr))
    eid = mgr.current_experiment_id or ""
    qualities = [0.5, 0.7, 0.6, 0.9, 0.1]
    ids = [
        run_with_quality(mgr, Params(lr=0.1 * (i + 1)), q, seed=i) for i, q in enumerate(qualities)
    ]
    best = qualities.index(min(qualities) if is_loss else max(qualities))
    assert marked_models(mgr, eid) == {ids[best]}
    assert stored_models(mgr, eid) == {ids[best]}
    assert mgr.get_best_current_run_id() == (ids[best], False)
    assert weights(mgr.download_best_model(eid)) == weights(tiny_model(best))


def test_save_model_keep_two_and_best_only_false(backend: BackendUnderTest) -> None:
    mgr = backend.connect(keep=2, model_format="state_dict", params_type=Params)
    mgr.set_iteration(iteration(mgr))
    eid = mgr.current_experiment_id or ""
    ids = [run_with_quality(mgr, Params(lr=q), q) for q in (0.2, 0.8, 0.5, 0.3)]
    assert stored_models(mgr, eid) == {ids[1], ids[2]}
    mgr.set_run(Params(lr=0.01))
    mgr.save_metric(MetricValue("quality", 0.0))
    assert mgr.save_model(tiny_model(), best_only=False) is True  # kept, not pruned
    extra = mgr.current_run_id
    mgr.finish_run()
    assert stored_models(mgr, eid) == {ids[1], ids[2], extra}


def test_save_model_ties_are_deterministic(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr))
    first = run_with_quality(mgr, Params(lr=0.1), 0.5)
    run_with_quality(mgr, Params(lr=0.2), 0.5)
    assert marked_models(mgr, mgr.current_experiment_id or "") == {first}  # earlier run wins


def test_concurrent_workers_keep_the_best_model(backend: BackendUnderTest) -> None:
    """Invariant 1 and 4: many managers (one per thread, as per process) saving at once."""
    plugin = f"plugin-{uuid.uuid4().hex[:8]}"
    qualities = [0.3, 0.9, 0.5, 0.7, 0.6, 0.8]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(qualities))
    models = [tiny_model(i) for i in range(len(qualities))]  # torch's seeding is global

    def worker(i: int) -> None:
        try:
            m = backend.connect(plugin_name=plugin, model_format="state_dict", params_type=Params)
            m.set_iteration(FineTuningIteration(plugin_name=plugin, batch_id="b"))
            m.set_run(Params(lr=0.01 * (i + 1)))
            m.save_metric(MetricValue("quality", qualities[i]))
            barrier.wait(timeout=60)
            m.save_model(models[i])
            m.finish_run()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(qualities))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    mgr = backend.connect(plugin_name=plugin, model_format="state_dict", model_factory=tiny_model)
    mgr.set_iteration(FineTuningIteration(plugin_name=plugin, batch_id="b"))
    best_run, best_quality = mgr.get_best_quality()
    assert best_quality == 0.9
    assert marked_models(mgr, mgr.current_experiment_id or "") == {best_run}
    assert best_run in stored_models(mgr, mgr.current_experiment_id or "")
    assert weights(mgr.download_best_model(mgr.current_experiment_id or "")) == weights(models[1])


def _process_worker(backend: BackendUnderTest, plugin: str, index: int, quality: float) -> str:
    """One worker process: its own manager, one run, save if best (module level: picklable)."""
    mgr = backend.connect(plugin_name=plugin, model_format="state_dict", params_type=Params)
    mgr.set_iteration(FineTuningIteration(plugin_name=plugin, batch_id="b"))
    mgr.set_run(Params(lr=float(index)))
    mgr.save_metric(MetricValue("quality", quality))
    mgr.save_model(tiny_model(index))
    run_id = mgr.current_run_id or ""
    mgr.finish_run()
    mgr.close()
    return run_id


def test_concurrent_processes_keep_the_best_model(backend: BackendUnderTest) -> None:
    """Invariant 1 across real processes sharing nothing but the stores."""
    import multiprocessing

    if "processes" not in backend.capabilities:
        pytest.skip("the backend's stores are not shared across processes")

    plugin = f"plugin-{uuid.uuid4().hex[:8]}"
    qualities = [0.4, 0.8, 0.6]
    with multiprocessing.get_context("spawn").Pool(len(qualities)) as pool:
        jobs = [(backend, plugin, i, q) for i, q in enumerate(qualities)]
        run_ids = pool.starmap(_process_worker, jobs)
    mgr = backend.connect(plugin_name=plugin, model_format="state_dict", model_factory=tiny_model)
    mgr.set_iteration(FineTuningIteration(plugin_name=plugin, batch_id="b"))
    eid = mgr.current_experiment_id or ""
    assert marked_models(mgr, eid) == {run_ids[1]}
    assert stored_models(mgr, eid) == {run_ids[1]}
    assert weights(mgr.download_best_model(eid)) == weights(tiny_model(1))


def test_crash_between_write_and_mark_keeps_previous_best(backend: BackendUnderTest) -> None:
    """Invariant 2: a worker dies after writing its model but before marking it."""
    mgr = backend.connect(model_format="state_dict", model_factory=tiny_model, params_type=Params)
    mgr.set_iteration(iteration(mgr))
    eid = mgr.current_experiment_id or ""
    best = run_with_quality(mgr, Params(lr=0.1), 0.5, seed=1)
    proxy = FaultyProxy(mgr.tracking)
    mgr.tracking = proxy  # type: ignore[assignment]
    mgr.set_run(Params(lr=0.2))
    mgr.save_metric(MetricValue("quality", 0.9))
    mgr.flush_metrics()
    crashed = mgr.current_run_id or ""
    proxy.fail("log_batch", error=KeyboardInterrupt())  # the mark never lands
    with pytest.raises(KeyboardInterrupt):
        mgr.save_model(tiny_model(2))
    mgr._forget_run()  # the process is gone
    assert marked_models(mgr, eid) == {best}
    assert crashed in stored_models(mgr, eid)  # an orphan: written, unmarked
    assert mgr.get_best_current_run_id() == (best, False)
    assert weights(mgr.download_best_model(eid)) == weights(tiny_model(1))
    assert mgr.download_model_by_run_id(crashed) is None


def test_save_model_requires_main_metric(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr))
    mgr.set_run(Params(lr=0.1))
    with pytest.raises(InvalidMetricError):
        mgr.save_model(tiny_model())
    assert not mgr.model_is_uploaded()
    mgr.save_metric(MetricValue("quality", 0.1))
    mgr.save_model(tiny_model())
    assert mgr.model_is_uploaded()


def test_model_state_visible_in_tracking(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr))
    first = run_with_quality(mgr, Params(lr=0.1), 0.1)
    run = mgr.get_run_by_id(first)
    assert run is not None
    assert run.tags[T.TAG_MODEL_UPLOADED] == T.TRUE and run.metrics["model_uploaded"] == 1.0
    assert run.tags[T.TAG_MODEL_URI].endswith(f"{first}/artifacts/model")
    assert run.tags[T.TAG_MODEL_FORMAT] == "state_dict"
    run_with_quality(mgr, Params(lr=0.2), 0.9)  # better: the first model is pruned
    run = mgr.get_run_by_id(first)
    assert run is not None
    assert run.tags[T.TAG_MODEL_UPLOADED] == T.FALSE and run.tags[T.TAG_MODEL_DELETED] == T.TRUE
    assert run.metrics["model_deleted"] == 1.0 and run.metrics["model_uploaded"] == 0.0


def test_delete_model(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr))
    run_id = run_with_quality(mgr, Params(lr=0.1), 0.5)
    assert mgr.delete_model(run_id) is True
    assert mgr.delete_model(run_id) is False  # nothing left to delete
    assert stored_models(mgr, mgr.current_experiment_id or "") == set()
    assert mgr.get_current_model_url() is None


def test_unmarked_upload_is_never_served(mgr: ExperimentsManager) -> None:
    """Invariant 2: a crash between writing and marking leaves an orphan, never a served model."""
    mgr.upload_initial_model(tiny_model(0))
    mgr.set_iteration(iteration(mgr))
    mgr.set_run(Params(lr=0.1))
    mgr.save_metric(MetricValue("quality", 0.99))
    run = mgr._get_run(mgr.current_run_id or "")
    staging = Path(__import__("tempfile").mkdtemp())
    (staging / "state_dict.pt").write_bytes(b"half-written")
    mgr.artifacts.upload_dir(staging, mgr._model_uri(run))  # written, never marked
    mgr.finish_run()
    assert mgr.get_run_by_id(run.run_id, models_only=True) is None
    assert mgr.download_model_by_run_id(run.run_id) is None
    # the best model of the iteration falls back to the initial one
    assert weights(mgr.download_best_model(mgr.current_experiment_id or "")) == weights(
        tiny_model(0)
    )


# --------------------------------------------------------------------------- downloads and URLs
def test_download_last_model_falls_back_to_initial(mgr: ExperimentsManager) -> None:
    mgr.upload_initial_model(tiny_model(7))
    assert weights(mgr.download_last_model()) == weights(tiny_model(7))
    assert mgr.get_last_model_url() is None
    mgr.set_iteration(iteration(mgr, "1"))
    run_id = run_with_quality(mgr, Params(lr=0.1), 0.5, seed=3)
    url = mgr.get_current_model_url()
    assert url is not None and run_id in url and mgr.artifacts.owns(url)
    mgr.set_iteration(iteration(mgr, "2"))
    assert mgr.get_last_model_url() == url
    assert weights(mgr.download_last_model()) == weights(tiny_model(3))
    assert mgr.get_current_model_url() is None
    mgr.finish_iteration()  # no current: the last finished iteration's best
    assert weights(mgr.download_last_model()) == weights(tiny_model(3))


def test_download_model_by_names(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr))
    run_with_quality(mgr, Params(lr=0.1), 0.5, seed=4)
    assert weights(mgr.download_model(str(iteration(mgr)), Params(lr=0.1).id)) == weights(
        tiny_model(4)
    )
    assert mgr.download_model("no such experiment", "x") is None
    assert mgr.download_model(str(iteration(mgr)), "no such run") is None


def test_download_initial_model_missing_raises(mgr: ExperimentsManager) -> None:
    with pytest.raises(TrackerError):
        mgr.download_initial_model()


# --------------------------------------------------------------------------- top params
def test_get_top_params_ranks_all_finished_runs(backend: BackendUnderTest) -> None:
    mgr = backend.connect(is_loss=True, n_top_runs=2, model_format="state_dict", params_type=Params)
    assert mgr.get_top_params() is None
    mgr.set_iteration(iteration(mgr, "1"))
    for lr, q in ((0.1, 0.9), (0.2, 0.3), (0.3, 0.5), (0.4, 0.1)):
        run_with_quality(mgr, Params(lr=lr, layers=[int(lr * 10)]), q)
    mgr.set_run(Params(lr=0.5))  # failed: not ranked
    mgr.save_metric(MetricValue("quality", 0.0))
    mgr.finish_run(as_failed=True)
    mgr.set_iteration(iteration(mgr, "2"))
    top: list[Params] | None = mgr.get_top_params()
    # 0.2 holds no model any more (0.4 beat it) but still ranks second
    assert top == [Params(lr=0.4, layers=[4]), Params(lr=0.2, layers=[2])]
    assert all(isinstance(p, Params) for p in top)
    mgr.finish_iteration()
    assert mgr.get_top_params() == top  # from the last finished iteration


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
    proxy = FaultyProxy(mgr.tracking)
    mgr.tracking = proxy  # type: ignore[assignment]
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
        mgr._marked_runs(mgr.current_experiment_id or "")
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
