"""The search's values without a store: the space is checked against the params class, the
policy a method and a task choose, percentile ranks, and a method's declarations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from tracker_core import ExperimentsManager, FineTuningParams
from tracker_core.errors import ConfigurationError
from tracker_core.finetune import method_policy
from tracker_core.methods import FineTuningMethod, load_method
from tracker_core.search import Search, SearchSpace, TopN, resolve_policy
from tracker_core.search_study import _ranks
from tracker_core.testing.support import Optimizer
from tracker_core.testing.support import Params as P


def space(**overrides: Any) -> SearchSpace[P]:
    dists: dict[str, Any] = {
        "lr": FloatDistribution(1e-4, 1e-1, log=True),
        "epochs": IntDistribution(1, 5),
        "optimizer": CategoricalDistribution(["adam", "sgd"]),
        **overrides,
    }
    return SearchSpace(P, **{k: v for k, v in dists.items() if v is not None})


def test_a_space_maps_optuna_values_to_typed_params_and_back() -> None:
    s = space()
    params = s.params_of({"lr": 0.01, "epochs": 3, "optimizer": "sgd"})
    assert params == P(lr=0.01, epochs=3, optimizer=Optimizer.SGD)
    assert s.values_of(params) == {"lr": 0.01, "epochs": 3, "optimizer": "sgd"}
    assert s.values_of(P(lr=0.5)) is None  # outside the distribution
    assert s.to_json()["epochs"] == {
        "name": "IntDistribution",
        "attributes": {"log": False, "step": 1, "low": 1, "high": 5},
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"depth": IntDistribution(1, 3)}, "'depth', which is not a field of Params"),
        ({"lr": (1e-4, 1e-1)}, "expected an Optuna distribution"),
        ({"epochs": FloatDistribution(0.5, 4.5)}, "does not fit Params"),
        ({"optimizer": CategoricalDistribution(["adam", "rmsprop"])}, "does not fit Params"),
        ({"lr": None}, "outside the search space need a default: lr"),
    ],
)
def test_a_space_the_params_class_refuses_is_refused_naming_the_field(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        space(**overrides)


def test_a_space_needs_a_params_class_and_a_field() -> None:
    with pytest.raises(ConfigurationError, match="FineTuningParams subclass"):
        SearchSpace(dict, x=FloatDistribution(0, 1))  # type: ignore[type-var]
    with pytest.raises(ConfigurationError, match="has no field"):
        SearchSpace(P)


def test_the_policy_in_force() -> None:
    s = space()
    assert resolve_policy(None, s, P) == TopN()
    assert resolve_policy(None, s, P, "top_n", 3) == TopN(3)
    searched = resolve_policy(None, s, P, "search", 6)
    assert isinstance(searched, Search) and searched.space is s and searched.max_runs == 6
    assert isinstance(searched.pruner, optuna.pruners.MedianPruner)
    own = Search(max_runs=2, pruner=None, history=3)
    assert resolve_policy(own, s, P, "search") == attrs.evolve(own, space=s)
    with pytest.raises(ConfigurationError, match="one of top_n, search, got 'grid'"):
        resolve_policy(None, s, P, "grid")
    with pytest.raises(ConfigurationError, match="needs a search space"):
        resolve_policy(None, None, P, "search")
    with pytest.raises(ConfigurationError, match="max_runs must be an int from 1"):
        resolve_policy(None, s, P, "search", 0)

    @attrs.frozen
    class Other(FineTuningParams):
        lr: float

    with pytest.raises(ConfigurationError, match="over Params, but the method's params are Other"):
        resolve_policy(None, s, Other, "search")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_runs": True}, "max_runs"),
        ({"sampler": "tpe"}, "sampler must be an Optuna sampler"),
        ({"pruner": "median"}, "pruner must be an Optuna pruner or None"),
        ({"history": 0}, "history must be None or an int >= 1"),
        ({"staleness": -0.1}, "staleness must be a number from 0 to 1"),
    ],
)
def test_a_search_refuses_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Search(**kwargs)


def test_a_sampler_is_the_same_for_the_same_seed() -> None:
    assert isinstance(Search().make_sampler(3), optuna.samplers.TPESampler)
    given = optuna.samplers.RandomSampler(seed=1)
    made = Search(sampler=given).make_sampler(3)
    assert made is not given and type(made) is optuna.samplers.RandomSampler
    factory = Search(sampler=lambda seed: optuna.samplers.RandomSampler(seed=seed))
    assert isinstance(factory.make_sampler(5), optuna.samplers.RandomSampler)
    with pytest.raises(ConfigurationError, match="returned str, not an Optuna sampler"):
        Search(sampler=lambda seed: "tpe").make_sampler(1)  # type: ignore[arg-type,return-value]


def test_percentile_ranks_share_ties_and_follow_the_direction() -> None:
    assert _ranks([0.2, 0.9, 0.5], is_loss=False) == [1.0, 0.0, 0.5]
    assert _ranks([0.2, 0.9, 0.5], is_loss=True) == [0.0, 1.0, 0.5]
    assert _ranks([0.7, 0.7, 0.1], is_loss=False) == [0.25, 0.25, 1.0]
    assert _ranks([0.3], is_loss=False) == [0.5]


class Declared(FineTuningMethod[P]):
    name = "declared"
    params_type = P
    main_metric = "quality"

    def initial_model(self) -> Any:
        return None

    def initial_params(self, seed: int | None = None) -> Sequence[P]:
        return [P(lr=0.01)]

    def train(self, model: Any, params: P, manager: ExperimentsManager) -> Any:
        return model

    def evaluate(self, model: Any, params: P, manager: ExperimentsManager) -> float:
        return 0.0


def test_a_methods_declarations_are_checked_and_give_its_policy() -> None:
    method = Declared()
    assert method_policy(method) == TopN()
    method.search_space = space()
    method.search = Search(max_runs=3)
    method.proposal = "search"
    policy = method_policy(method, max_runs=2)
    assert isinstance(policy, Search) and policy.space is method.search_space
    assert policy.max_runs == 2
    assert method_policy(method, "top_n") == TopN()
    for attr, value, message in [
        ("search_space", {"lr": [0.1]}, "search_space must be None or a"),
        ("search", "tpe", "search must be None or a"),
        ("proposal", "grid", "proposal must be one of top_n, search, got 'grid'"),
    ]:
        bad = Declared()
        setattr(bad, attr, value)
        with pytest.raises(ConfigurationError, match=message):
            load_method(bad)
