"""Behaviour suite: the search policy and pruning (issue 19), on every backend.

- the search's history reaches iterations step 7 deleted (the store's ``include_deleted``);
- a resumed iteration proposes the same params sets (the same runs), whatever ended since it
  began, and a run that ended in the first attempt is not trained again;
- a pruned run ends KILLED and tagged, never becomes the best, keeps no model (nor does a
  KILLED run's model survive ``ModelKeeper.prune``), is skipped on resume, and counts in the
  result and the progress;
- a run is pruned from the intermediate values other processes logged to the store.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from typing import Any

import attrs
import pytest

from tracker_core import tags as T
from tracker_core.finetune import (
    IterationProgress,
    check_prune,
    parse_iteration_name,
    prepare_iteration,
    run_iteration,
    train_run,
)
from tracker_core.finetune.plan import IterationPlan
from tracker_core.manager import ExperimentsManager
from tracker_core.methods import FineTuningMethod, connect_kwargs
from tracker_core.params import FineTuningParams
from tracker_core.pruning import RunPruning
from tracker_core.search import Search, SearchSpace
from tracker_core.search_study import history, propose
from tracker_core.stores import RunQuery
from tracker_core.testing.faults import Killed
from tracker_core.testing.harness import BackendUnderTest
from tracker_core.testing.support import marked_models, processes, stored_models, tiny_model
from tracker_core.values import FineTuningIteration, MetricValue, RunStatus

__all__ = [
    "test_a_hand_written_loop_asks_the_search_for_its_sets",
    "test_a_killed_runs_model_is_pruned_from_the_iteration",
    "test_a_pruned_run_keeps_no_model_and_is_not_trained_again",
    "test_a_pruners_memory_lives_in_the_runs_tags",
    "test_a_run_is_pruned_from_values_another_process_logged",
    "test_a_run_marked_pruned_before_a_crash_ends_pruned_on_resume",
    "test_search_history_reaches_deleted_iterations",
    "test_search_proposes_the_same_sets_when_resumed",
]

STEPS = 4


@attrs.frozen
class Point(FineTuningParams):
    x: float
    y: float = 0.5


class Curve(FineTuningMethod[Point]):
    """Quality ``1 - (x - 0.7)^2``; ``train`` logs a learning curve towards it, one value of
    the main metric a step, and calls ``check_prune`` after each."""

    params_type = Point
    main_metric = "quality"
    model_format = "state_dict"
    proposal = "search"

    def __init__(
        self,
        initial: Sequence[Point],
        *,
        max_runs: int = 3,
        name: str | None = None,
        pruner: Any = "default",
        sampler: Any = None,
    ) -> None:
        self.name = name or f"curve-{uuid.uuid4().hex[:8]}"
        self.model_factory = tiny_model
        self.search_space = _space()
        extra = {} if pruner == "default" else {"pruner": pruner}
        self.search = Search(max_runs=max_runs, sampler=sampler, **extra)
        self.initial = list(initial)
        self.trained: list[Point] = []
        self.crash_on: set[int] = set()
        #: before step 1, wait until this many runs of the iteration FINISHED (other processes)
        self.wait_for_finished = 0

    def initial_model(self) -> Any:
        return tiny_model()

    def initial_params(self, seed: int | None = None) -> Sequence[Point]:
        return self.initial

    def train(self, model: Any, params: Point, manager: ExperimentsManager) -> Any:
        self.trained.append(params)
        if len(self.trained) in self.crash_on:
            raise Killed(f"crash on train call {len(self.trained)}")
        quality = _quality(params)
        for step in range(STEPS):
            if step == 1 and self.wait_for_finished:
                _wait_for_finished(manager, self.wait_for_finished)
            value = quality * (1 - math.exp(-(step + 1)))
            manager.save_metric(MetricValue(self.main_metric, value, step=step))
            check_prune()
        return model

    def evaluate(self, model: Any, params: Point, manager: ExperimentsManager) -> float:
        return _quality(params)


def _space() -> SearchSpace[Point]:
    from optuna.distributions import FloatDistribution

    return SearchSpace(Point, x=FloatDistribution(0.0, 1.0), y=FloatDistribution(0.0, 1.0))


def _quality(p: Point) -> float:
    return 1 - (p.x - 0.7) ** 2


def _wait_for_finished(manager: ExperimentsManager, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    experiment_id = manager.current_experiment_id or ""
    while len(manager.get_runs(experiment_id, statuses=[RunStatus.FINISHED])) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} runs never finished")
        time.sleep(0.1)


GOOD = [Point(x=0.7), Point(x=0.6)]
BAD = Point(x=0.0)


def _connect(backend: BackendUnderTest, method: Curve) -> ExperimentsManager:
    return backend.connect(**connect_kwargs(method))


def _runs(mgr: ExperimentsManager, experiment_id: str) -> dict[str, Any]:
    return {r.run_name: r for r in mgr.tracking.search_runs(RunQuery((experiment_id,)))}


# ---------------------------------------------------------------------- history and resume
def test_search_history_reaches_deleted_iterations(backend: BackendUnderTest) -> None:
    method = Curve([*GOOD, BAD], pruner=None)
    mgr = _connect(backend, method)
    first = run_iteration(method, mgr, "b1")
    second = run_iteration(method, mgr, "b2")
    assert second.deleted_iteration_id == first.experiment_id  # step 7 deleted it
    mgr.set_iteration(FineTuningIteration(method.name, "b3"))
    current = mgr.get_experiment(mgr.current_experiment_id or "")
    assert current is not None
    trials = history(mgr, _space(), current, staleness=0.05)
    by_batch: dict[str, set[str]] = {}
    for trial in trials:
        by_batch.setdefault(trial.user_attrs["batch_id"], set()).add(trial.user_attrs["run_id"])
    assert by_batch == {
        "b1": {r.run_id for r in first.runs},
        "b2": {r.run_id for r in second.runs},
    }
    # the best of each iteration has rank 0, plus 0.05 per iteration of age
    value = {t.user_attrs["run_id"]: t.value for t in trials}
    assert value[first.best_run_id] == 0.05 and value[second.best_run_id] == 0.0
    assert len(history(mgr, _space(), current, recent=1)) == len(second.runs)


def _tpe(seed: int) -> Any:
    from optuna.samplers import TPESampler

    return TPESampler(seed=seed, n_startup_trials=1)  # proposals that depend on the history


def test_search_proposes_the_same_sets_when_resumed(backend: BackendUnderTest) -> None:
    method = Curve([*GOOD, BAD], max_runs=4, pruner=None, sampler=_tpe)
    mgr = _connect(backend, method)
    first = run_iteration(method, mgr, "b1")
    planned = prepare_iteration(method, mgr, "b2", seed=7)
    assert len(planned.params) == 4 and planned.params[0] == Point(x=0.7)  # the incumbent
    # a straggler of the previous iteration ends after this one began: not in its history
    straggler = _connect(backend, method)
    straggler.set_iteration(parse_iteration_name(first.iteration_name))  # type: ignore[arg-type]
    straggler.set_run(Point(x=0.71, y=0.9))
    straggler.save_metric(MetricValue("quality", 0.99))
    straggler.finish_run()
    again = prepare_iteration(method, mgr, "b2", seed=7)
    assert again.experiment_id == planned.experiment_id and again.params == planned.params

    method.trained.clear()
    method.crash_on = {3}
    with pytest.raises(Killed):
        run_iteration(method, mgr, "b2", seed=7)
    method.crash_on = set()
    trained_first = list(method.trained[:2])
    method.trained.clear()
    resumed = run_iteration(method, mgr, "b2", seed=7)
    assert resumed.experiment_id == planned.experiment_id
    assert [r.params for r in resumed.runs] == list(planned.params)
    assert not set(method.trained) & set(trained_first)  # ended runs are not trained again
    runs = mgr.tracking.search_runs(RunQuery((planned.experiment_id,)))
    assert sorted(r.run_name for r in runs) == sorted(p.id for p in planned.params)


def test_a_hand_written_loop_asks_the_search_for_its_sets(backend: BackendUnderTest) -> None:
    """No driver: the loop trains its sets with the manager, then ``propose`` gives the next
    iteration's, the previous best first, the same on a second call."""
    method = Curve(GOOD)
    mgr = _connect(backend, method)
    mgr.set_iteration(FineTuningIteration(method.name, "b1"))
    for p in [*GOOD, BAD]:
        mgr.set_run(p)
        mgr.save_metric(MetricValue("quality", _quality(p)))
        mgr.save_model(tiny_model())
        mgr.finish_run()
    mgr.finish_iteration()
    mgr.set_iteration(FineTuningIteration(method.name, "b2"))
    search = Search(space=_space(), max_runs=4, sampler=_tpe)
    proposed = propose(mgr, search, seed=3)
    assert len(proposed) == 4 and proposed[0] == Point(x=0.7)  # the incumbent first
    assert not set(proposed[1:]) & {*GOOD, BAD}  # the others are new sets
    assert propose(mgr, search, seed=3) == proposed
    assert propose(mgr, search, seed=4)[1:] != proposed[1:]


# ---------------------------------------------------------------------- pruned runs
def test_a_pruned_run_keeps_no_model_and_is_not_trained_again(backend: BackendUnderTest) -> None:
    method = Curve([*GOOD, BAD])
    mgr = _connect(backend, method)
    progress: list[IterationProgress] = []
    result = run_iteration(method, mgr, "b1", on_progress=progress.append)
    (pruned,) = result.pruned_runs
    assert pruned.params == BAD and pruned.status == RunStatus.KILLED
    assert pruned.metric is None and not pruned.has_model and not pruned.succeeded
    assert result.failed_runs == () and len(result.runs) == 3
    assert progress[-1] == IterationProgress(planned=3, finished=3, failed=0, pruned=1)
    run = _runs(mgr, result.experiment_id)[BAD.id]
    assert run.tags[T.TAG_PRUNED] == T.TRUE
    assert run.tags[T.TAG_PRUNED_STEP] == "1"  # median rule from step 1, two runs complete
    assert result.best_run_id != pruned.run_id and result.best_metric == 1.0
    assert pruned.run_id not in marked_models(mgr, result.experiment_id)
    assert pruned.run_id not in stored_models(mgr, result.experiment_id)

    method.trained.clear()
    again = run_iteration(method, mgr, "b1")  # resumed: complete already, nothing trained
    assert method.trained == [] and again.pruned_runs[0].run_id == pruned.run_id


def test_a_pruners_memory_lives_in_the_runs_tags(backend: BackendUnderTest) -> None:
    """Successive halving remembers each run's value at each rung: kept as the run's tags, so
    the next run is compared with the first one's rung, though every decision builds its
    study afresh from the store."""
    from optuna.pruners import SuccessiveHalvingPruner

    method = Curve([*GOOD, BAD], pruner=SuccessiveHalvingPruner(min_resource=1))
    mgr = _connect(backend, method)
    result = run_iteration(method, mgr, "b1")
    assert {r.params for r in result.pruned_runs} == {GOOD[1], BAD}  # below the first at rung 0
    runs = _runs(mgr, result.experiment_id)
    first = runs[GOOD[0].id]
    assert first.status == RunStatus.FINISHED
    memory = {k for k in first.tags if k.startswith(T.TAG_PRUNER_PREFIX)}
    assert memory == {f"{T.TAG_PRUNER_PREFIX}completed_rung_0"}, memory  # rung 1: step 4
    assert runs[GOOD[1].id].tags[T.TAG_PRUNED_STEP] == "1"


def test_a_run_marked_pruned_before_a_crash_ends_pruned_on_resume(
    backend: BackendUnderTest,
) -> None:
    method = Curve([*GOOD, BAD])
    mgr = _connect(backend, method)
    plan = prepare_iteration(method, mgr, "b1")
    mgr.set_run(BAD)  # a worker decided to prune it, tagged it, and died before KILLED
    mgr.tracking.set_tags(mgr.current_run_id or "", {T.TAG_PRUNED: T.TRUE})
    mgr.abandon_iteration()
    result = train_run(method, mgr, plan, BAD)
    assert result.status == RunStatus.KILLED and result.pruned and not result.trained
    assert method.trained == []


def test_a_killed_runs_model_is_pruned_from_the_iteration(backend: BackendUnderTest) -> None:
    """A pruned run saved a model (a hand-written loop may): ending it pruned deletes the
    model, and so does ``ModelKeeper.prune`` when a crash left it behind."""
    method = Curve(GOOD)
    mgr = _connect(backend, method)
    mgr.set_iteration(FineTuningIteration(method.name, "b1"))
    experiment_id = mgr.current_experiment_id or ""
    for p in GOOD:
        mgr.set_run(p)
        mgr.save_metric(MetricValue("quality", _quality(p), step=0))
        assert mgr.save_model(tiny_model())  # no FINISHED run yet: each is the best so far
        pruning = RunPruning(mgr, Search().pruner)  # type: ignore[arg-type]
        assert not pruning.should_prune()  # no other run completed yet
        if p == GOOD[0]:  # the end a crash skipped: KILLED, the model still marked
            run_id = mgr.current_run_id or ""
            mgr.tracking.set_terminated(run_id, RunStatus.KILLED)
            mgr.abandon_iteration()
            mgr.set_iteration(FineTuningIteration(method.name, "b1"))
            assert run_id in marked_models(mgr, experiment_id)
            mgr.models.prune(experiment_id, mgr.keep)
            assert run_id not in marked_models(mgr, experiment_id)
            assert run_id not in stored_models(mgr, experiment_id)
        else:
            pruning.prune()
    runs = _runs(mgr, experiment_id)
    assert runs[GOOD[1].id].status == RunStatus.KILLED
    assert runs[GOOD[1].id].tags[T.TAG_PRUNED] == T.TRUE
    assert marked_models(mgr, experiment_id) == set() == stored_models(mgr, experiment_id)
    assert mgr.get_best_current_run_id()[0] is None  # a KILLED run is never the best


# ---------------------------------------------------------------------- across processes
def _train_in_process(
    backend: BackendUnderTest, name: str, plan_json: dict[str, Any], params_id: str, wait: int
) -> tuple[str, bool]:
    method = Curve([*GOOD, BAD], name=name)
    method.wait_for_finished = wait
    mgr = _connect(backend, method)
    plan = IterationPlan.from_json(plan_json, Point)
    result = train_run(method, mgr, plan, plan.params_by_id(params_id))
    mgr.close()
    return result.status.value, result.pruned


def test_a_run_is_pruned_from_values_another_process_logged(backend: BackendUnderTest) -> None:
    """Three run jobs in three processes at once, as the task service trains them: the weak
    one waits at step 1 for the two others to finish, then its pruner, fed from the store,
    stops it."""
    if "processes" not in backend.capabilities:
        pytest.skip("the backend's stores are not shared across processes")
    method = Curve([*GOOD, BAD])
    mgr = _connect(backend, method)
    plan = prepare_iteration(method, mgr, "b1")
    mgr.finish_iteration()
    jobs = [(backend, method.name, plan.to_json(), p.id, 2 if p == BAD else 0) for p in plan.params]
    with processes().Pool(len(jobs)) as pool:
        outcomes = dict(zip(plan.params, pool.starmap(_train_in_process, jobs), strict=True))
    assert outcomes == {
        GOOD[0]: ("FINISHED", False),
        GOOD[1]: ("FINISHED", False),
        BAD: ("KILLED", True),
    }
    assert _runs(mgr, plan.experiment_id)[BAD.id].tags[T.TAG_PRUNED_STEP] == "1"
