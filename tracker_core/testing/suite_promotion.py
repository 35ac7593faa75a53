"""Behaviour suite: champion and challenger in the model registry (invariant 3's promotion part).

- an iteration's best model is promoted only if it beats the champion on the holdout; both
  scores and the decision are recorded on the run; the previous champion keeps a rollback alias;
- ``mlflow.pytorch.load_model("models:/<name>@champion")`` loads it (``state_dict``: its files
  download from the same URI);
- no cleanup (``delete_previous_iteration``, deleting an iteration, gc) deletes the champion's
  or the rollback model's files; their iteration goes once no alias points at it;
- promotion is crash-safe: killed between registering and moving the alias, or after moving it
  and before the decision was written, or with a create answer lost, a repeat leaves one
  champion and one version per run; a repeated completion decides nothing new.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tracker_core.errors import ModelProtectedError, TransientError
from tracker_core.manager import ExperimentsManager
from tracker_core.promotion import Outcome
from tracker_core.testing.faults import FaultyProxy, Killed
from tracker_core.testing.harness import BackendUnderTest
from tracker_core.testing.support import Params, iteration, mgr, stored_models, weights
from tracker_core.values import FineTuningIteration, MetricValue

__all__ = ["mgr"]  # completed at the end


def scored_model(score: float) -> Any:
    """A tiny model whose holdout score (:func:`holdout`) is ``score``."""
    import torch

    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.fill_(0.5)
        model.bias.fill_(score)
    return model


def holdout(model: Any) -> float:
    """The fixed holdout evaluation of the suite's models: the first bias (rounded: float32)."""
    state = model.state_dict() if hasattr(model, "state_dict") else model
    return round(float(state["bias"][0]), 6)


def one_iteration(manager: ExperimentsManager, batch: str, runs: list[tuple[float, float]]) -> str:
    """An iteration of runs ``(batch metric, holdout score)``; returns the best run's id."""
    manager.set_iteration(iteration(manager, batch))
    for i, (quality, score) in enumerate(runs):
        manager.set_run(Params(lr=0.1 * (i + 1)))
        manager.save_metric(MetricValue(manager.main_metric, quality))
        manager.save_model(scored_model(score))
        manager.finish_run()
    best, _ = manager.get_best_current_run_id()
    assert best is not None
    return best


def _promoting(backend: BackendUnderTest, **kwargs: Any) -> ExperimentsManager:
    kwargs.setdefault("model_format", "state_dict")
    kwargs.setdefault("model_factory", lambda: scored_model(0.0))
    return backend.connect(params_type=Params, **kwargs)


# --------------------------------------------------------------------------- the gate
def test_a_challenger_serves_only_if_it_beats_the_champion_on_the_holdout(
    backend: BackendUnderTest,
) -> None:
    manager = _promoting(backend)
    promoter = manager.promotion
    first = one_iteration(manager, "b1", [(0.5, 0.6), (0.4, 0.9)])
    decision = manager.promote(holdout).decision
    assert decision is not None and decision.outcome == Outcome.PROMOTED
    assert decision.run_id == first and decision.holdout == 0.6
    assert decision.champion_run_id is None and decision.reason == "first champion"
    champion = promoter.champion()
    assert champion is not None and champion.run_id == first and champion.holdout == 0.6
    assert champion.run is not None
    assert champion.version.source == manager.tracker.models.uri_of(champion.run)

    # a batch the challenger overfits: best on its own metric, worse on the holdout
    overfit = one_iteration(manager, "b2", [(0.95, 0.3), (0.2, 0.1)])
    rejected = manager.promote(holdout).decision
    assert rejected is not None and rejected.outcome == Outcome.REJECTED
    assert (rejected.run_id, rejected.holdout) == (overfit, 0.3)
    assert (rejected.champion_run_id, rejected.champion_holdout) == (first, 0.6)
    assert rejected.version is None and not rejected.promoted
    recorded = manager.get_run_by_id(overfit)
    assert recorded is not None
    assert json.loads(recorded.tags["tracker.promotion"])["outcome"] == "rejected"
    assert recorded.metrics["holdout"] == 0.3 and recorded.metrics["champion_holdout"] == 0.6
    assert promoter.champion().run_id == first  # type: ignore[union-attr]

    better = one_iteration(manager, "b3", [(0.7, 0.8)])
    promoted = manager.promote(holdout).decision
    assert promoted is not None and promoted.outcome == Outcome.PROMOTED
    assert (promoted.champion_run_id, promoted.champion_holdout) == (first, 0.6)
    now, before = promoter.champion(), promoter.champion("previous-champion")
    assert now is not None and before is not None
    assert (now.run_id, before.run_id) == (better, first)
    assert now.version.number > before.version.number

    # repeated: the same decision, nothing new registered
    again = manager.promote(holdout).decision
    assert again == promoted
    assert [v.run_id for v in manager.registry.search_versions(promoter.name)] == [first, better]  # type: ignore[union-attr]


def test_min_delta_is_the_margin_to_beat(backend: BackendUnderTest) -> None:
    from tracker_core.promotion import PromotionConfig

    manager = _promoting(backend, promotion=PromotionConfig(min_delta=0.1))
    one_iteration(manager, "b1", [(0.5, 0.5)])
    assert manager.promote(holdout).decision.outcome == Outcome.PROMOTED  # type: ignore[union-attr]
    one_iteration(manager, "b2", [(0.9, 0.55)])  # better, but by less than min_delta
    assert manager.promote(holdout).decision.outcome == Outcome.REJECTED  # type: ignore[union-attr]
    one_iteration(manager, "b3", [(0.9, 0.65)])
    assert manager.promote(holdout).decision.outcome == Outcome.PROMOTED  # type: ignore[union-attr]


def test_a_loss_holdout_promotes_the_lower_score(backend: BackendUnderTest) -> None:
    manager = _promoting(backend, is_loss=True)
    one_iteration(manager, "b1", [(0.5, 0.5)])
    manager.promote(holdout)
    one_iteration(manager, "b2", [(0.1, 0.7)])  # a higher loss on the holdout
    assert manager.promote(holdout).decision.outcome == Outcome.REJECTED  # type: ignore[union-attr]
    one_iteration(manager, "b3", [(0.4, 0.2)])
    assert manager.promote(holdout).decision.outcome == Outcome.PROMOTED  # type: ignore[union-attr]


def test_mlflow_loads_the_champion_from_the_registry(backend: BackendUnderTest) -> None:
    """``models:/<name>@champion`` loads with plain MLflow: mlflow.pytorch; a state_dict
    model's files download from the same URI."""
    if "mlflow" not in backend.capabilities:
        pytest.skip("the backend is not read by plain MLflow")
    import mlflow.artifacts
    import mlflow.pytorch
    import torch

    manager = _promoting(backend, model_format="mlflow.pytorch")
    best = one_iteration(manager, "b1", [(0.5, 0.6)])
    manager.promote(holdout)
    name = manager.promotion.name
    with backend.mlflow_env():
        loaded = mlflow.pytorch.load_model(f"models:/{name}@champion")
    assert weights(loaded) == weights(scored_model(0.6))
    assert manager.promotion.champion().run_id == best  # type: ignore[union-attr]

    plain = _promoting(backend)
    one_iteration(plain, "b1", [(0.5, 0.4)])
    plain.promote(holdout)
    with backend.mlflow_env():
        folder = mlflow.artifacts.download_artifacts(f"models:/{plain.promotion.name}@champion")
    state = torch.load(Path(folder) / "state_dict.pt", weights_only=True)
    assert holdout(state) == pytest.approx(0.4)


# --------------------------------------------------------------------------- cleanup
def test_cleanup_never_deletes_the_champion_or_the_rollback_model(
    backend: BackendUnderTest,
) -> None:
    manager = _promoting(backend)
    ids: dict[str, str] = {}
    best: dict[str, str] = {}

    def step(batch: str, score: float) -> None:
        best[batch] = one_iteration(manager, batch, [(0.5, score)])
        ids[batch] = manager.current_experiment_id or ""
        manager.promote(holdout)
        manager.delete_previous_iteration()

    step("b1", 0.5)  # champion
    step("b2", 0.6)  # champion; b1 holds the rollback model: kept
    assert manager.get_experiment(ids["b1"]).lifecycle_stage == "active"  # type: ignore[union-attr]
    with pytest.raises(ModelProtectedError):
        manager.delete_iteration(ids["b1"])
    assert manager.delete_iteration(ids["b1"], defer=True) is False
    step("b3", 0.1)  # rejected; b2 holds the champion: kept, b1 the rollback: kept
    assert manager.get_experiment(ids["b2"]).lifecycle_stage == "active"  # type: ignore[union-attr]
    assert stored_models(manager, ids["b1"]) == {best["b1"]}
    for orphan in manager.find_orphaned_models().orphans:  # gc --delete
        manager.delete_orphaned_model(orphan)
    assert stored_models(manager, ids["b2"]) == {best["b2"]}
    with pytest.raises(ModelProtectedError):
        manager.tracker.models.delete(manager.get_run_by_id(best["b2"]))  # type: ignore[arg-type]

    step("b4", 0.7)  # champion b4, rollback b2: b1 lost its last alias and goes, b3 goes
    assert manager.get_experiment(ids["b1"]).lifecycle_stage == "deleted"  # type: ignore[union-attr]
    assert manager.get_experiment(ids["b3"]).lifecycle_stage == "deleted"  # type: ignore[union-attr]
    assert stored_models(manager, ids["b2"]) == {best["b2"]}
    previous = manager.promotion.champion("previous-champion")
    assert previous is not None and previous.run_id == best["b2"]
    assert holdout(manager.tracker.load(previous.run)) == 0.6  # type: ignore[arg-type]

    manager.promotion.rollback(by="tester")  # b2 serves again, b4 is the rollback model
    step("b5", 0.2)  # rejected against b2 (0.6); b4 kept
    assert manager.get_experiment(ids["b4"]).lifecycle_stage == "active"  # type: ignore[union-attr]
    assert stored_models(manager, ids["b4"]) == {best["b4"]}


# --------------------------------------------------------------------------- crash safety
def _versions(manager: ExperimentsManager) -> list[tuple[str | None, tuple[str, ...]]]:
    """Each version's run and the aliases on it (read through the aliases: a search of
    versions does not return them on every registry)."""
    registry, name = manager.registry, manager.promotion.name
    assert registry is not None
    aliased = {
        alias: found.version
        for alias in ("champion", "previous-champion")
        if (found := registry.get_version_by_alias(name, alias)) is not None
    }
    return [
        (v.run_id, tuple(a for a, number in aliased.items() if number == v.version))
        for v in registry.search_versions(name)
    ]


def _killed_promoting(
    backend: BackendUnderTest, method: str, point: str
) -> tuple[ExperimentsManager, FaultyProxy, str, str]:
    """A champion (b1's best), then b2's better challenger promoted by a worker killed at
    ``method`` of the registry: the manager, its registry proxy, both runs."""
    manager = _promoting(backend)
    first = one_iteration(manager, "b1", [(0.5, 0.5)])
    manager.promote(holdout)
    second = one_iteration(manager, "b2", [(0.5, 0.8)])
    faulty = manager.registry.wrap(FaultyProxy)  # type: ignore[union-attr]
    faulty.fail(method, error=Killed(f"kill point: {point}"))
    with pytest.raises(Killed):
        manager.promote(holdout)
    return manager, faulty, first, second


def test_killed_between_registering_and_moving_the_alias_a_repeat_promotes_once(
    backend: BackendUnderTest,
) -> None:
    manager, faulty, first, second = _killed_promoting(backend, "set_alias", "after create_version")
    assert faulty.calls["create_version"] == 1
    assert manager.promotion.champion().run_id == first  # type: ignore[union-attr]

    decision = manager.promote(holdout).decision  # the completion, repeated
    assert decision is not None and decision.outcome == Outcome.PROMOTED
    assert faulty.calls["create_version"] == 1  # the version was found, not made again
    assert sorted(_versions(manager)) == sorted(
        [(first, ("previous-champion",)), (second, ("champion",))]
    )


def test_killed_after_moving_the_alias_a_repeat_records_the_promotion(
    backend: BackendUnderTest,
) -> None:
    manager, _, first, second = _killed_promoting(backend, "set_version_tags", "after set_alias")
    assert manager.promotion.champion().run_id == second  # type: ignore[union-attr]
    assert "tracker.promotion" not in manager.get_run_by_id(second).tags  # type: ignore[union-attr]

    again = _promoting(backend, plugin_name=manager.plugin_name)  # the job's successor
    again.set_iteration(iteration(again, "b2"))
    decision = again.promote(holdout).decision
    assert decision is not None and decision.outcome == Outcome.PROMOTED
    assert decision.champion_run_id == first
    assert sorted(_versions(manager)) == sorted(
        [(first, ("previous-champion",)), (second, ("champion",))]
    )
    assert again.promote(holdout).decision == decision


def test_a_lost_answer_to_create_version_leaves_one_version(backend: BackendUnderTest) -> None:
    manager = _promoting(backend)
    best = one_iteration(manager, "b1", [(0.5, 0.5)])
    faulty = manager.registry.wrap(FaultyProxy)  # type: ignore[union-attr]
    faulty.fail("create_version", error=TransientError("answer lost"), after_call=True)
    decision = manager.promote(holdout).decision
    assert decision is not None and decision.outcome == Outcome.PROMOTED
    assert faulty.calls["create_version"] == 2  # the retry made a twin: deleted
    assert _versions(manager) == [(best, ("champion",))], _versions(manager)


def test_a_person_promotes_and_rolls_back_recorded_with_who(backend: BackendUnderTest) -> None:
    manager = _promoting(backend)
    good = one_iteration(manager, "b1", [(0.5, 0.7)])
    manager.promote(holdout)
    worse = one_iteration(manager, "b2", [(0.5, 0.2)])
    assert manager.promote(holdout).decision.outcome == Outcome.REJECTED  # type: ignore[union-attr]
    forced = manager.promotion.promote_run(worse, by="alice", reason="the holdout is stale")
    assert forced.outcome == Outcome.PROMOTED and forced.decided_by == "alice"
    champion = manager.promotion.champion()
    assert champion is not None and champion.run_id == worse
    assert champion.version.tags["tracker.promoted_by"] == "alice"
    back = manager.promotion.rollback(by="bob")
    assert back.outcome == Outcome.ROLLED_BACK and back.run_id == good
    champion = manager.promotion.champion()
    assert champion is not None and champion.run_id == good
    assert champion.version.tags["tracker.promoted_by"] == "bob"
    assert manager.promotion.champion("previous-champion").run_id == worse  # type: ignore[union-attr]


def test_the_lineage_experiment_is_no_iteration(backend: BackendUnderTest) -> None:
    """The lineage experiment is no iteration: listing and cleanup never see it."""
    manager = _promoting(backend)
    one_iteration(manager, "b1", [(0.5, 0.5)])
    manager.promote(holdout)
    names = [e.name for e in manager.get_experiments()]
    assert all("lineage" not in n for n in names)
    assert (
        FineTuningIteration(plugin_name=manager.plugin_name, batch_id="b1").experiment_name in names
    )


__all__ += sorted(name for name in dict(globals()) if name.startswith("test_"))
