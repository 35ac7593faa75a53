"""Behaviour suite: cleanup never loses the model to keep (invariants 1 and 3).

- ``delete_previous_iteration`` refuses while the current iteration holds no model (the
  previous one holds the only fine-tuned model), and while live workers hold runs of the
  previous iteration; deferred deletions happen once those workers are done.
- A marked model whose files are gone (a bucket emptied behind tracker-core's back) is told
  apart from a stored one: the initial model is uploaded again, a download says what is wrong.

Every test takes the ``backend`` fixture; import with ``from tracker_core.testing.suite_cleanup
import *``.
"""

from __future__ import annotations

import uuid

import pytest

from tracker_core import tags as T
from tracker_core.errors import IterationInUseError, ModelFilesMissingError, NoModelToKeepError
from tracker_core.manager import ExperimentsManager
from tracker_core.testing.harness import BackendUnderTest
from tracker_core.testing.suite import (
    Params,
    iteration,
    mgr,
    run_with_quality,
    stored_models,
    tiny_model,
    weights,
)
from tracker_core.values import FineTuningIteration, MetricValue

__all__ = ["mgr"]  # completed at the end


def test_previous_iteration_kept_when_current_holds_no_model(mgr: ExperimentsManager) -> None:
    mgr.upload_initial_model(tiny_model(0))
    mgr.set_iteration(iteration(mgr, "1"))
    first = mgr.current_experiment_id or ""
    best = run_with_quality(mgr, Params(lr=0.1), 0.8, seed=3)
    mgr.set_iteration(iteration(mgr, "2"))
    mgr.set_run(Params(lr=0.2))
    mgr.finish_run(as_failed=True)  # every run of the new iteration failed
    with pytest.raises(NoModelToKeepError):
        mgr.delete_previous_iteration()
    assert stored_models(mgr, first) == {best}  # nothing deleted
    assert mgr.get_top_params() == [Params(lr=0.1)]
    assert weights(mgr.download_last_model()) == weights(tiny_model(3))


def test_previous_iteration_with_a_live_worker_is_not_deleted(backend: BackendUnderTest) -> None:
    plugin = f"plugin-{uuid.uuid4().hex[:8]}"
    kwargs = {"model_format": "state_dict", "model_factory": tiny_model, "params_type": Params}
    late = backend.connect(plugin_name=plugin, **kwargs)
    eager = backend.connect(plugin_name=plugin, **kwargs)
    old = FineTuningIteration(plugin_name=plugin, batch_id="1")
    eager.set_iteration(old)
    run_with_quality(eager, Params(lr=0.1), 0.5)
    late.set_iteration(old)
    late.set_run(Params(lr=0.2))  # a slow worker, still training in the old iteration
    late.save_metric(MetricValue("quality", 0.9))
    eager.set_iteration(FineTuningIteration(plugin_name=plugin, batch_id="2"))
    run_with_quality(eager, Params(lr=0.3), 0.6)
    with pytest.raises(IterationInUseError):
        eager.delete_previous_iteration()
    old_id = late.current_experiment_id or ""
    assert eager.get_experiment(old_id) is not None
    assert eager.get_experiment(old_id).lifecycle_stage == "active"  # type: ignore[union-attr]
    # the slow worker is not broken under its feet
    assert late.save_model(tiny_model(9)) is True
    late.finish_run()
    assert eager.delete_iteration(old_id, defer=True) is True  # its workers are done
    assert eager.get_experiment(old_id).lifecycle_stage == "deleted"  # type: ignore[union-attr]


def test_deferred_deletion_happens_once_workers_are_done(backend: BackendUnderTest) -> None:
    plugin = f"plugin-{uuid.uuid4().hex[:8]}"
    holder = backend.connect(plugin_name=plugin, model_format="state_dict", params_type=Params)
    cleaner = backend.connect(plugin_name=plugin, model_format="state_dict", params_type=Params)
    holder.set_iteration(FineTuningIteration(plugin_name=plugin, batch_id="1"))
    holder.set_run(Params(lr=0.1))
    old_id = holder.current_experiment_id or ""
    cleaner.set_iteration(FineTuningIteration(plugin_name=plugin, batch_id="2"))
    assert cleaner.delete_iteration(old_id, defer=True) is False
    assert cleaner.delete_pending_iterations() == []  # still held
    pending = cleaner.get_experiment(old_id)
    assert pending is not None and pending.tags.get("tracker.delete_pending") == T.TRUE
    holder.save_metric(MetricValue("quality", 0.1))
    holder.finish_run()
    assert cleaner.delete_pending_iterations() == [old_id]
    assert cleaner.get_experiment(old_id).lifecycle_stage == "deleted"  # type: ignore[union-attr]


def test_initial_model_files_gone_are_detected_and_reuploaded(mgr: ExperimentsManager) -> None:
    mgr.upload_initial_model(tiny_model(1))
    run = mgr.get_run_by_id(mgr.get_initial_run_id() or "")
    assert run is not None
    mgr.artifacts.delete_tree(mgr._model_uri(run))  # the bucket emptied behind our back
    assert not mgr.has_initial_model()
    with pytest.raises(ModelFilesMissingError):
        mgr.download_last_model()
    assert mgr.upload_initial_model(tiny_model(2)) is True
    assert mgr.get_initial_run_id() == run.run_id
    assert mgr.has_initial_model()
    assert weights(mgr.download_last_model()) == weights(tiny_model(2))
    assert mgr.upload_initial_model(tiny_model(3)) is False


def test_iteration_model_files_gone_raise_a_clear_error(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr))
    run_id = run_with_quality(mgr, Params(lr=0.1), 0.5)
    mgr.artifacts.delete_tree(mgr._model_uri(mgr._get_run(run_id)))
    with pytest.raises(ModelFilesMissingError, match="verify"):
        mgr.download_model_by_run_id(run_id)
    with pytest.raises(ModelFilesMissingError):
        mgr.download_best_model(mgr.current_experiment_id or "")


__all__ = [*sorted(name for name in globals() if name.startswith("test_")), "mgr"]
