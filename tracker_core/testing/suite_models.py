"""Behaviour suite: the best model (invariant 1) and serving it.

- only the best ``keep`` models of an iteration are kept, whatever the interleaving of
  ``save_model`` calls from threads and processes, with crashes between writing and marking;
- an unmarked upload is never served; downloads fall back to the initial model.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest

from tracker_core import tags as T
from tracker_core.errors import (
    ArtifactStoreError,
    InvalidMetricError,
    ModelNotSavedError,
    TrackerError,
)
from tracker_core.manager import ExperimentsManager
from tracker_core.testing.faults import FaultyProxy
from tracker_core.testing.harness import BackendUnderTest
from tracker_core.testing.support import (
    Params,
    iteration,
    marked_models,
    mgr,
    processes,
    run_with_quality,
    stored_models,
    tiny_model,
    weights,
)
from tracker_core.values import FineTuningIteration, MetricValue, RunStatus

__all__ = ["mgr"]  # completed at the end


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


def test_a_run_whose_model_could_not_be_saved_never_ends_finished(mgr: ExperimentsManager) -> None:
    """Its main metric would stand with no model behind it: finish_run refuses, an implicit
    end leaves it resumable, and once a save succeeds it ends FINISHED and serves."""
    proxy = mgr.artifacts.wrap(FaultyProxy)
    mgr.set_iteration(iteration(mgr))
    mgr.set_run(Params(lr=0.1))
    run_id = mgr.current_run_id or ""
    mgr.save_metric(MetricValue("quality", 0.9))
    proxy.fail("upload_dir", error=ArtifactStoreError("the bucket refused the upload"))
    with pytest.raises(ArtifactStoreError):
        mgr.save_model(tiny_model(1))
    with pytest.raises(ModelNotSavedError, match="bucket refused"):
        mgr.finish_run()
    mgr.finish_iteration()  # an implicit end: left unfinished, resumable
    assert mgr.get_run_by_id(run_id).status == RunStatus.RUNNING  # type: ignore[union-attr]
    mgr.set_iteration(iteration(mgr))
    assert mgr.get_best_current_run_id() == (None, False)
    assert mgr.set_run(Params(lr=0.1)) is False  # resumed, not skipped
    assert mgr.save_model(tiny_model(1)) is True
    mgr.finish_run()
    assert mgr.get_best_current_run_id() == (run_id, False)
    assert weights(mgr.download_best_model(mgr.current_experiment_id or "")) == weights(
        tiny_model(1)
    )


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

    if "processes" not in backend.capabilities:
        pytest.skip("the backend's stores are not shared across processes")

    plugin = f"plugin-{uuid.uuid4().hex[:8]}"
    qualities = [0.4, 0.8, 0.6]
    with processes().Pool(len(qualities)) as pool:
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
    proxy = mgr.tracking.wrap(FaultyProxy)
    mgr.set_run(Params(lr=0.2))
    mgr.save_metric(MetricValue("quality", 0.9))
    mgr.flush_metrics()
    crashed = mgr.current_run_id or ""
    proxy.fail("log_batch", error=KeyboardInterrupt())  # the mark never lands
    with pytest.raises(KeyboardInterrupt):
        mgr.save_model(tiny_model(2))
    mgr.tracker.runs.forget()  # the process is gone
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
    run = mgr.tracker.runs.get_existing(mgr.current_run_id or "")
    staging = Path(__import__("tempfile").mkdtemp())
    (staging / "state_dict.pt").write_bytes(b"half-written")
    mgr.artifacts.upload_dir(staging, mgr.models.uri_of(run))  # written, never marked
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


__all__ = [*sorted(name for name in globals() if name.startswith("test_")), "mgr"]
