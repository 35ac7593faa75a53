"""Behaviour suite: iterations and cleanup (invariant 3, and no cleanup loses the model to keep).

- iterations are found by plugin, newest first; "previous" never means the current one;
- the initial model is uploaded once and survives every cleanup;
- ``delete_previous_iteration`` refuses while the current iteration holds no model, and while
  live workers hold runs of the previous iteration; deferred deletions happen once they are
  done; a marked model whose files are gone is told apart from a stored one.
"""

from __future__ import annotations

import uuid

import pytest

from tracker_core import tags as T
from tracker_core.errors import (
    ConfigurationError,
    IterationInUseError,
    ModelFilesMissingError,
    NoModelToKeepError,
)
from tracker_core.manager import ExperimentsManager
from tracker_core.stores import RunQuery
from tracker_core.testing.faults import FaultyProxy, Killed
from tracker_core.testing.harness import BackendUnderTest
from tracker_core.testing.support import (
    Params,
    iteration,
    marked_models,
    mgr,
    run_with_quality,
    stored_models,
    tiny_model,
    weights,
)
from tracker_core.values import FineTuningIteration, MetricValue

__all__ = ["mgr"]  # completed at the end


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
    initial = mgr.tracker.initial.experiment()
    assert initial is not None
    mgr.tracking.delete_experiment(initial.experiment_id)
    mgr.tracker.iterations.forget_initial()
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
    mgr.tracker.runs.forget()  # simulate a crash: the run stays RUNNING on the server
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
    model_uri = mgr.models.uri_of(mgr.tracker.runs.get_existing(run_id))
    assert mgr.artifacts.exists(model_uri)
    mgr.set_iteration(iteration(mgr, "2"))
    run_with_quality(mgr, Params(lr=0.1), 0.6)  # the current iteration holds a model
    location = mgr.get_experiment(first).artifact_location  # type: ignore[union-attr]
    mgr.delete_previous_iteration()
    assert not mgr.artifacts.exists(model_uri)
    assert not mgr.artifacts.exists(location)  # no empty folder left (local disk)
    gone = mgr.tracking.get_experiment(first)
    assert gone is None or gone.lifecycle_stage == "deleted"
    assert [e.name for e in mgr.get_experiments()] == [str(iteration(mgr, "2"))]
    # the deleted iteration's name never blocks creating it again
    mgr.set_iteration(iteration(mgr, "1"))
    assert mgr.current_experiment_id not in (None, first)
    assert mgr.tracking.search_runs(RunQuery((mgr.current_experiment_id or "",))) == []
    assert mgr.has_initial_model()


def test_a_deletion_cut_short_after_the_last_model_is_finished_by_the_next(
    mgr: ExperimentsManager,
) -> None:
    """A worker killed inside ``delete_previous_iteration``, after the previous iteration's
    only model was deleted and before the experiment was: that iteration holds no model, so
    it is no longer anyone's "previous iteration"; the next cleanup still deletes it (the
    chaos soak's seed 9, keep=1: "the previous iteration (b0) was not deleted")."""
    mgr.set_iteration(iteration(mgr, "1"))
    first = mgr.current_experiment_id or ""
    run_with_quality(mgr, Params(lr=0.1), 0.5)
    mgr.set_iteration(iteration(mgr, "2"))
    run_with_quality(mgr, Params(lr=0.1), 0.6)
    proxy = mgr.tracking.wrap(FaultyProxy)
    proxy.fail("delete_experiment", error=Killed("killed"))
    with pytest.raises(Killed):
        mgr.delete_previous_iteration()
    assert marked_models(mgr, first) == set()  # its model went, the experiment did not
    assert mgr.tracking.get_experiment(first).lifecycle_stage == "active"  # type: ignore[union-attr]
    mgr.delete_previous_iteration()
    gone = mgr.tracking.get_experiment(first)
    assert gone is None or gone.lifecycle_stage == "deleted"
    assert [e.name for e in mgr.get_experiments()] == [str(iteration(mgr, "2"))]


def test_delete_previous_iteration_without_previous_is_a_noop(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr, "1"))
    mgr.delete_previous_iteration()
    assert len(mgr.get_experiments()) == 1


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


def _pair(backend: BackendUnderTest) -> tuple[ExperimentsManager, ExperimentsManager, str]:
    """Two workers (managers) of one new plugin, and the plugin's name."""
    plugin = f"plugin-{uuid.uuid4().hex[:8]}"
    kwargs = {"model_format": "state_dict", "model_factory": tiny_model, "params_type": Params}
    return (
        backend.connect(plugin_name=plugin, **kwargs),
        backend.connect(plugin_name=plugin, **kwargs),
        plugin,
    )


def test_a_model_whose_run_can_still_fail_is_not_the_model_to_keep(
    backend: BackendUnderTest,
) -> None:
    """Worker A saved a model in iteration 2 and is still training: B's cleanup is refused
    (A's run can still fail). A's run fails: its model is deleted, and iteration 1's model
    is still the one the next iteration starts from."""
    a, b, plugin = _pair(backend)
    a.upload_initial_model(tiny_model(0))
    a.set_iteration(FineTuningIteration(plugin_name=plugin, batch_id="1"))
    first = a.current_experiment_id or ""
    kept = run_with_quality(a, Params(lr=0.1), 0.5, seed=1)
    second = FineTuningIteration(plugin_name=plugin, batch_id="2")
    a.set_iteration(second)
    a.set_run(Params(lr=0.2))
    a.save_metric(MetricValue("quality", 0.9))
    assert a.save_model(tiny_model(2)) is True
    provisional, second_id = a.current_run_id or "", a.current_experiment_id or ""
    b.set_iteration(second)
    assert b.get_best_current_run_id() == (None, False)  # not served while its run trains
    with pytest.raises(NoModelToKeepError, match="FINISHED"):
        b.delete_previous_iteration()
    assert stored_models(b, first) == {kept}  # nothing deleted
    a.finish_run(as_failed=True)
    assert provisional not in stored_models(a, second_id)  # a FAILED run's model is deleted
    assert provisional not in marked_models(a, second_id)
    assert b.get_best_current_run_id() == (None, False)
    b.finish_iteration()
    b.set_iteration(FineTuningIteration(plugin_name=plugin, batch_id="3"))
    assert weights(b.download_last_model()) == weights(tiny_model(1))
    assert b.get_top_params() == [Params(lr=0.1)]


@pytest.mark.parametrize("ends", ["FINISHED", "FAILED"])
def test_a_better_model_still_training_never_prunes_the_finished_best(
    backend: BackendUnderTest, ends: str
) -> None:
    """keep=1: a better model saved by a run still training does not prune the best model of
    a FINISHED run; whichever way that run ends, one model is left, and it is servable."""
    a, b, plugin = _pair(backend)
    batch = FineTuningIteration(plugin_name=plugin, batch_id="1")
    a.set_iteration(batch)
    finished = run_with_quality(a, Params(lr=0.1), 0.5, seed=1)
    experiment_id = a.current_experiment_id or ""
    b.set_iteration(batch)
    b.set_run(Params(lr=0.2))
    b.save_metric(MetricValue("quality", 0.9))
    assert b.save_model(tiny_model(2)) is True
    training = b.current_run_id or ""
    assert stored_models(a, experiment_id) == {finished, training}
    assert a.get_best_current_run_id() == (finished, False)
    b.finish_run(as_failed=ends == "FAILED")
    winner, seed = (training, 2) if ends == "FINISHED" else (finished, 1)
    assert stored_models(a, experiment_id) == {winner}
    assert a.get_best_current_run_id() == (winner, False)
    assert weights(a.download_best_model(experiment_id)) == weights(tiny_model(seed))


def test_after_an_iteration_where_every_run_failed_the_next_starts_from_the_last_model(
    mgr: ExperimentsManager,
) -> None:
    """The hand-written loop (README's quick start): iteration 2 fails entirely; iteration 3
    starts from iteration 1's model and params, and its cleanup deletes iteration 1."""
    mgr.upload_initial_model(tiny_model(0))
    mgr.set_iteration(iteration(mgr, "1"))
    first = mgr.current_experiment_id or ""
    best = run_with_quality(mgr, Params(lr=0.1), 0.8, seed=3)
    url = mgr.models.uri_of(mgr.tracker.runs.get_existing(best))
    mgr.set_iteration(iteration(mgr, "2"))
    with pytest.raises(RuntimeError), mgr.run(Params(lr=0.2)):
        mgr.save_metric(MetricValue("quality", 0.9))
        mgr.save_model(tiny_model(4))
        raise RuntimeError("training diverged")
    mgr.set_iteration(iteration(mgr, "3"))
    assert weights(mgr.download_last_model()) == weights(tiny_model(3))
    assert mgr.get_top_params() == [Params(lr=0.1)]
    assert mgr.get_last_model_url() == url
    assert mgr._get_best_previous_run_id() == (best, False)
    third = run_with_quality(mgr, Params(lr=0.1), 0.7, seed=5)
    mgr.delete_previous_iteration()  # the iteration it started from
    gone = mgr.get_experiment(first)
    assert gone is None or gone.lifecycle_stage == "deleted"
    mgr.finish_iteration()
    assert mgr._get_best_previous_run_id() == (third, False)
    assert weights(mgr.download_last_model()) == weights(tiny_model(5))


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
    mgr.artifacts.delete_tree(mgr.models.uri_of(run))  # the bucket emptied behind our back
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
    mgr.artifacts.delete_tree(mgr.models.uri_of(mgr.tracker.runs.get_existing(run_id)))
    with pytest.raises(ModelFilesMissingError, match="verify"):
        mgr.download_model_by_run_id(run_id)
    with pytest.raises(ModelFilesMissingError):
        mgr.download_best_model(mgr.current_experiment_id or "")


__all__ = [*sorted(name for name in globals() if name.startswith("test_")), "mgr"]
