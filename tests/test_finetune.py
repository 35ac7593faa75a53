"""The fine-tuning driver end to end, on every leg of the backend matrix (real stores)."""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from torch import nn

from tracker_core import (
    ExperimentsManager,
    FineTuningParams,
    IterationFailedError,
    MetricValue,
    RunStatus,
)
from tracker_core.finetune import parse_iteration_name, prepare_iteration, run_iteration
from tracker_core.methods import FineTuningMethod, connect_kwargs
from tracker_core.stores import RunQuery
from tracker_core.testing.faults import FaultyProxy, Killed
from tracker_core.testing.harness import BackendUnderTest


@attrs.frozen
class ToyParams(FineTuningParams):
    lr: float
    quality: float  # what evaluate reports: the test decides the ranking


def tiny_model() -> nn.Module:
    return nn.Linear(8, 4)  # 36 parameters


class ToyMethod(FineTuningMethod[ToyParams]):
    """Training adds ``lr`` to every weight; evaluation reports ``params.quality``.

    ``fail_on`` / ``crash_on`` hold 1-based train-call numbers that raise RuntimeError /
    Killed; ``fail_all`` makes every run fail.
    """

    params_type = ToyParams
    main_metric = "quality"
    model_format = "state_dict"

    def __init__(self, sets: Sequence[ToyParams], name: str | None = None) -> None:
        self.name = name or f"toy-{uuid.uuid4().hex[:8]}"
        self.model_factory = tiny_model
        self.sets = list(sets)
        self.fail_on: set[int] = set()
        self.crash_on: set[int] = set()
        self.fail_all = False
        self.trained: list[ToyParams] = []
        self.received: list[dict[str, torch.Tensor]] = []

    def initial_model(self) -> nn.Module:
        torch.manual_seed(0)
        return tiny_model()

    def initial_params(self, seed: int | None = None) -> Sequence[ToyParams]:
        return self.sets

    def train(self, model: Any, params: ToyParams, manager: ExperimentsManager) -> Any:
        self.trained.append(params)
        self.received.append(weights(model))
        call = len(self.trained)
        if call in self.crash_on:
            raise Killed(f"crash on train call {call}")
        if self.fail_all or call in self.fail_on:
            raise RuntimeError(f"boom on train call {call}")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(params.lr)
        manager.save_metric(MetricValue("train_loss", 1.0 - params.quality, step=0))
        return model

    def evaluate(self, model: Any, params: ToyParams, manager: ExperimentsManager) -> float:
        return params.quality


def weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def shifted(state: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    return {k: v + by for k, v in state.items()}


SETS = [
    ToyParams(lr=0.1, quality=0.2),
    ToyParams(lr=0.2, quality=0.9),
    ToyParams(lr=0.3, quality=0.5),
    ToyParams(lr=0.4, quality=0.7),
]


@pytest.fixture
def tmpdir_watch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every temporary file of the process goes here, so tests can check it is left empty."""
    watched = tmp_path / "tmp"
    watched.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(watched))
    return watched


def connect(backend: BackendUnderTest, method: ToyMethod, **kwargs: Any) -> ExperimentsManager:
    return backend.connect(**connect_kwargs(method), **kwargs)


@pytest.fixture
def managers(backend: BackendUnderTest) -> Iterator[list[ExperimentsManager]]:
    opened: list[ExperimentsManager] = []
    yield opened
    for m in opened:
        m.close()


def runs_of(manager: ExperimentsManager, experiment_id: str) -> dict[str, RunStatus]:
    return {r.run_name: r.status for r in manager.tracking.search_runs(RunQuery((experiment_id,)))}


def test_two_iterations_warm_start(
    backend: BackendUnderTest, tmpdir_watch: Path, managers: list[ExperimentsManager]
) -> None:
    method = ToyMethod(SETS[:3])
    manager = connect(backend, method, n_top_runs=2)
    managers.append(manager)
    initial = weights(method.initial_model())

    first = run_iteration(method, manager, "batch-1")
    assert first.started_from_initial and not first.resumed
    assert first.start_run_id == manager.get_initial_model_run_id()
    assert [r.params for r in first.runs] == SETS[:3]
    assert all(r.status == RunStatus.FINISHED and r.trained for r in first.runs)
    assert all(same(w, initial) for w in method.received)  # every run starts from the initial
    best1 = next(r for r in first.runs if r.params == SETS[1])
    assert first.best_run_id == best1.run_id and first.best_metric == pytest.approx(0.9)
    assert [r.has_model for r in first.runs] == [False, True, False]  # only the best is kept
    assert first.best_model_uri and manager.artifacts.exists(first.best_model_uri)
    assert list(tmpdir_watch.iterdir()) == []

    downloaded = weights(manager.download_model_by_run_id(first.best_run_id))
    assert same(downloaded, shifted(initial, 0.2))

    method.received.clear()
    second = run_iteration(method, manager, "batch-2")
    # warm start: the first iteration's best model and its top-2 params, best first
    assert second.start_run_id == first.best_run_id and not second.started_from_initial
    assert [r.params for r in second.runs] == [SETS[1], SETS[2]]
    assert len(method.received) == 2 and all(same(w, downloaded) for w in method.received)
    assert second.iteration_name == f"{method.name} / iteration / {first.best_run_id} / batch-2"
    # the previous iteration is removed, its model files included; the initial model is kept
    assert second.deleted_iteration_id == first.experiment_id
    assert [e.experiment_id for e in manager.get_experiments()] == [second.experiment_id]
    deleted = manager.tracking.get_experiment(first.experiment_id)
    assert deleted is None or deleted.lifecycle_stage == "deleted"
    assert not manager.artifacts.exists(first.best_model_uri)
    assert manager.has_initial_model()
    assert same(weights(manager.download_initial_model()), initial)
    assert second.best_model_uri and manager.artifacts.exists(second.best_model_uri)
    assert list(tmpdir_watch.iterdir()) == []

    # the same batch again: the complete iteration is resumed, nothing is trained
    trained = len(method.trained)
    again = run_iteration(method, manager, "batch-2")
    assert again.resumed and len(method.trained) == trained
    assert again.experiment_id == second.experiment_id
    assert again.best_run_id == second.best_run_id
    assert not any(r.trained for r in again.runs)


def test_crash_mid_iteration_resumes(
    backend: BackendUnderTest, tmpdir_watch: Path, managers: list[ExperimentsManager]
) -> None:
    method = ToyMethod(SETS)
    method.crash_on = {3}
    manager = connect(backend, method)
    managers.append(manager)
    with pytest.raises(Killed):
        run_iteration(method, manager, "batch-1")
    assert len(method.trained) == 3
    assert list(tmpdir_watch.iterdir()) == []
    (experiment,) = manager.get_experiments()
    statuses = runs_of(manager, experiment.experiment_id)
    assert sorted(statuses.values()) == [RunStatus.FINISHED, RunStatus.FINISHED, RunStatus.RUNNING]
    assert statuses[SETS[2].id] == RunStatus.RUNNING  # left unfinished, to be restarted

    # a new process: a new manager; the same method, no longer crashing
    method.crash_on = set()
    resumed_manager = connect(backend, method)
    managers.append(resumed_manager)
    result = run_iteration(method, resumed_manager, "batch-1")
    assert result.resumed and result.experiment_id == experiment.experiment_id
    assert method.trained[3:] == [SETS[2], SETS[3]]  # runs 1-2 were not redone
    assert [r.trained for r in result.runs] == [False, False, True, True]
    assert all(r.status == RunStatus.FINISHED for r in result.runs)
    assert result.best_run_id == result.runs[1].run_id
    assert list(tmpdir_watch.iterdir()) == []


def test_failed_run_does_not_count(
    backend: BackendUnderTest, tmpdir_watch: Path, managers: list[ExperimentsManager]
) -> None:
    sets = [*SETS[:2], ToyParams(lr=0.5, quality=0.99), SETS[3]]  # the failing run "looks" best
    method = ToyMethod(sets)
    method.fail_on = {3}
    manager = connect(backend, method)
    managers.append(manager)
    result = run_iteration(method, manager, "batch-1")
    failed = result.runs[2]
    assert failed.status == RunStatus.FAILED and failed.metric is None and not failed.has_model
    assert failed.error is not None and "boom on train call 3" in failed.error
    assert result.failed_runs == (failed,)
    assert result.best_run_id == result.runs[1].run_id  # 0.9, not the failed 0.99
    assert list(tmpdir_watch.iterdir()) == []

    # calling again with the same batch redoes nothing: finished and failed runs are skipped
    again = run_iteration(method, manager, "batch-1")
    assert again.resumed and len(method.trained) == 4
    assert again.runs[2].status == RunStatus.FAILED
    assert again.best_run_id == result.best_run_id


def test_every_run_failing_keeps_previous_iteration(
    backend: BackendUnderTest, tmpdir_watch: Path, managers: list[ExperimentsManager]
) -> None:
    method = ToyMethod(SETS[:2])
    manager = connect(backend, method)
    managers.append(manager)
    first = run_iteration(method, manager, "batch-1")
    assert first.best_run_id is not None and first.best_model_uri is not None
    best_weights = weights(manager.download_model_by_run_id(first.best_run_id))

    method.fail_all = True
    with pytest.raises(IterationFailedError) as caught:
        run_iteration(method, manager, "batch-2")
    message = str(caught.value)
    assert "every run" in message and "boom on train call" in message
    assert list(tmpdir_watch.iterdir()) == []
    # the previous iteration and its best model are intact
    assert [e.experiment_id for e in manager.get_experiments()] == [first.experiment_id]
    assert manager.artifacts.exists(first.best_model_uri)
    assert same(weights(manager.download_model_by_run_id(first.best_run_id)), best_weights)

    # once the method is fixed, the same batch runs again from the previous best
    method.fail_all = False
    retried = run_iteration(method, manager, "batch-2")
    assert retried.start_run_id == first.best_run_id and not retried.resumed
    assert all(r.status == RunStatus.FINISHED for r in retried.runs)
    assert retried.deleted_iteration_id == first.experiment_id


def test_completion_defers_deleting_an_iteration_still_in_use(
    backend: BackendUnderTest, managers: list[ExperimentsManager]
) -> None:
    """Step 7 never deletes an iteration under a live worker: it is deleted by a later
    completion, once that worker is done."""
    method = ToyMethod(SETS[:2])
    manager = connect(backend, method)
    late = connect(backend, method)
    managers.extend([manager, late])
    first = run_iteration(method, manager, "batch-1")
    # a slow worker still trains a run of the first iteration
    old_iteration = parse_iteration_name(first.iteration_name)
    assert old_iteration is not None
    late.set_iteration(old_iteration)
    late.set_run(ToyParams(lr=0.9, quality=0.1))

    second = run_iteration(method, manager, "batch-2")
    assert second.deleted_iteration_id is None  # deferred, not deleted under the worker
    kept = manager.get_experiment(first.experiment_id)
    assert kept is not None and kept.lifecycle_stage == "active"
    late.save_metric(MetricValue("quality", 0.1))
    late.finish_run()  # the worker is done: nothing it did failed

    third = run_iteration(method, manager, "batch-3")
    assert third.deleted_iteration_id == second.experiment_id
    gone = manager.get_experiment(first.experiment_id)
    assert gone is None or gone.lifecycle_stage == "deleted"
    assert [e.experiment_id for e in manager.get_experiments()] == [third.experiment_id]


def test_a_run_another_worker_holds_is_left_for_the_end_and_not_trained_again(
    backend: BackendUnderTest, managers: list[ExperimentsManager]
) -> None:
    """Two workers on one batch: the run of the first params set is held by the other
    worker, which ends it only once this one has trained every other set. This worker does
    not wait for it first: it trains the others, comes back to it at the end, and skips it
    once it ended (one worker trains a run; an ended run is never trained again)."""
    method = ToyMethod(SETS)
    mine, other = connect(backend, method), connect(backend, method)
    managers.extend([mine, other])
    prepare_iteration(method, other, "batch-1")
    other.set_run(SETS[0])  # held: its lease is live
    others_first = threading.Event()

    def hold_then_end() -> None:
        deadline = time.monotonic() + 20
        while len(method.trained) < len(SETS) - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(method.trained) == len(SETS) - 1:
            others_first.set()
        other.save_metric(MetricValue("quality", SETS[0].quality))
        other.finish_run()

    holder = threading.Thread(target=hold_then_end)
    holder.start()
    try:
        result = run_iteration(method, mine, "batch-1")
    finally:
        holder.join()
    assert others_first.is_set(), "the worker waited for the held run before training others"
    assert method.trained == SETS[1:]
    assert [(r.params, r.trained, r.status) for r in result.runs] == [
        (SETS[0], False, RunStatus.FINISHED),
        *[(p, True, RunStatus.FINISHED) for p in SETS[1:]],
    ]
    assert result.best_metric == 0.9


def test_held_runs_that_ended_meanwhile_are_skipped_in_one_read(
    backend: BackendUnderTest, managers: list[ExperimentsManager]
) -> None:
    """Two runs held by other workers end while this worker trains the others: back round
    to them, it reads the iteration's runs once and skips both, taking neither again."""
    holders: list[ExperimentsManager] = []

    class EndingOthers(ToyMethod):
        def train(self, model: Any, params: ToyParams, manager: ExperimentsManager) -> Any:
            if params == SETS[-1]:  # the holders end their runs while this one trains
                for other, held in zip(holders, SETS, strict=False):
                    other.save_metric(MetricValue("quality", held.quality))
                    other.finish_run()
            return super().train(model, params, manager)

    method = EndingOthers(SETS)
    mine = connect(backend, method)
    holders.extend([connect(backend, method), connect(backend, method)])
    managers.extend([mine, *holders])
    plan = prepare_iteration(method, holders[0], "batch-1")
    holders[1].set_iteration(plan.iteration)
    holders[0].set_run(SETS[0])
    holders[1].set_run(SETS[1])
    taken: list[ToyParams] = []
    set_run = mine.set_run

    def counted(params: Any, *, wait: float = 0.0) -> bool:
        taken.append(params)
        return set_run(params, wait=wait)

    mine.set_run = counted  # type: ignore[method-assign]
    result = run_iteration(method, mine, "batch-1")
    assert method.trained == SETS[2:]
    assert taken == SETS  # the held ones once each (found held), never again
    assert [(r.params, r.trained, r.status) for r in result.runs] == [
        *[(p, False, RunStatus.FINISHED) for p in SETS[:2]],
        *[(p, True, RunStatus.FINISHED) for p in SETS[2:]],
    ]


class _IterationMadeMeanwhile(FaultyProxy):
    """A tracking store where, just before this worker's ``call``-th listing of iterations (a
    page of them), ``meanwhile`` runs: another worker doing its work between two of this
    worker's reads."""

    def __init__(self, target: Any, call: int, meanwhile: Any) -> None:
        super().__init__(target)
        self.listings, self.call, self.meanwhile = 0, call, meanwhile

    def search_experiments(self, *args: Any, **kwargs: Any) -> Any:
        self.listings += 1
        if self.listings == self.call:
            self.meanwhile()
        return self._target.search_experiments(*args, **kwargs)


def test_a_batch_iteration_made_while_planning_it_is_joined(
    backend: BackendUnderTest, managers: list[ExperimentsManager]
) -> None:
    """Two workers start the same batch; one of them creates its iteration and saves a model
    in it between the other's two reads (is the newest iteration this batch's? which iteration
    holds the model to start from?). The other joins that iteration: it never makes a second
    iteration of the batch that starts from the batch's own model (chaos seed 14)."""
    method = ToyMethod(SETS[:2])
    fast, slow = connect(backend, method), connect(backend, method)
    managers.extend([fast, slow])
    first = run_iteration(method, fast, "batch-1")
    done: list[Any] = []
    proxy = slow.tracking.wrap(
        lambda store: _IterationMadeMeanwhile(
            store, 2, lambda: done.append(run_iteration(method, fast, "batch-2"))
        )
    )
    joined = run_iteration(method, slow, "batch-2")
    (second,) = done
    assert proxy.listings >= 2 and second.start_run_id == first.best_run_id
    assert joined.resumed and joined.experiment_id == second.experiment_id
    assert joined.best_run_id == second.best_run_id
    assert [e.experiment_id for e in fast.get_experiments()] == [second.experiment_id]
