"""How an iteration's params sets are chosen: the values a method (or a hand-written loop)
declares.

- :class:`SearchSpace`: Optuna distributions over fields of the params class, which stays the
  one source of types (every distribution is checked by constructing params from it; fields
  outside the space keep their defaults);
- :class:`TopN`: the seed's rule and the default: the previous iteration's top-N params sets,
  else the method's initial sets;
- :class:`Search`: each iteration's sets proposed by an Optuna sampler (TPE by default)
  seeded with every earlier iteration's runs, plus the previous best so the incumbent is
  always retried; a budget of runs per iteration; a pruner (median by default) that stops
  runs clearly worse than the iteration's others at the same step.

:func:`resolve_policy` turns a method's declarations (``search_space``, ``search``,
``proposal``) and a task's ``proposal`` / ``max_runs`` into the policy in force. The proposing
is :mod:`tracker_core.search_study`, the pruning :mod:`tracker_core.pruning`. Optuna is
imported only when a search is declared or used (the extra ``search``:
``pip install 'tracker-core[search]'``).
"""

from __future__ import annotations

import enum
import json
import types
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import attrs

from tracker_core.errors import ConfigurationError, InvalidParamsError
from tracker_core.params import FineTuningParams

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.pruners import BasePruner
    from optuna.samplers import BaseSampler

__all__ = [
    "MAX_RUNS",
    "POLICIES",
    "ProposalPolicy",
    "Search",
    "SearchSpace",
    "TopN",
    "optuna_module",
    "resolve_policy",
]

P = TypeVar("P", bound=FineTuningParams)

#: the largest budget of runs per iteration
MAX_RUNS = 10_000
#: the policies by name, as a task's ``proposal`` gives them
POLICIES = ("top_n", "search")


def optuna_module() -> types.ModuleType:
    """The ``optuna`` module, or a :class:`ConfigurationError` that says how to install it."""
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - optuna is pinned in the dev environment
        raise ConfigurationError(
            "the search policy needs Optuna: pip install 'tracker-core[search]'"
        ) from exc
    return optuna


@attrs.frozen(init=False)
class SearchSpace(Generic[P]):
    """Optuna distributions over fields of ``params_type``::

        SearchSpace(
            MyParams,
            lr=FloatDistribution(1e-4, 1e-1, log=True),
            epochs=IntDistribution(1, 5),
            optimizer=CategoricalDistribution(["adam", "sgd"]),
        )

    Every name must be a field of ``params_type``; every field outside the space must have a
    default (it keeps it). Each distribution is checked against the field's declared type by
    constructing params from its bounds or choices (an ``Enum`` field takes its members'
    values as choices), so a space that could propose params the class refuses is refused
    here, with the params class's own message.
    """

    params_type: type[P]
    distributions: Mapping[str, BaseDistribution]

    def __init__(self, params_type: type[P], /, **distributions: BaseDistribution) -> None:
        self.__attrs_init__(params_type, types.MappingProxyType(dict(distributions)))
        self._check()

    def _check(self) -> None:
        dist = optuna_module().distributions
        cls = self.params_type
        if not (isinstance(cls, type) and issubclass(cls, FineTuningParams)):
            raise ConfigurationError(
                f"a search space needs a FineTuningParams subclass, got {cls!r}"
            )
        if not self.distributions:
            raise ConfigurationError(f"the search space of {cls.__name__} has no field")
        fields = attrs.fields_dict(cls)
        for name, distribution in self.distributions.items():
            if name not in fields:
                raise ConfigurationError(
                    f"the search space names {name!r}, which is not a field of {cls.__name__} "
                    f"(fields: {', '.join(fields)})"
                )
            if not isinstance(distribution, dist.BaseDistribution):
                raise ConfigurationError(
                    f"search space field {name!r}: expected an Optuna distribution (optuna."
                    f"distributions.FloatDistribution, ...), got {type(distribution).__name__}"
                )
        missing = [
            n
            for n, f in fields.items()
            if n not in self.distributions and f.default is attrs.NOTHING
        ]
        if missing:
            raise ConfigurationError(
                f"fields of {cls.__name__} outside the search space need a default: "
                + ", ".join(missing)
            )
        for name, distribution in self.distributions.items():
            for value in _probes(distribution):
                try:
                    made = self.params_of({**self._lows(), name: value})
                except InvalidParamsError as exc:
                    raise ConfigurationError(
                        f"search space field {name!r} does not fit {cls.__name__}: {exc}"
                    ) from exc
                if self.values_of(made) is None:
                    raise ConfigurationError(
                        f"search space field {name!r}: {value!r} comes back from "
                        f"{cls.__name__} as {getattr(made, name)!r}, outside the distribution"
                    )

    def _lows(self) -> dict[str, Any]:
        return {name: _probes(d)[0] for name, d in self.distributions.items()}

    def params_of(self, values: Mapping[str, Any]) -> P:
        """The params of the space's values (fields outside the space at their defaults)."""
        return self.params_type(**values)

    def values_of(self, params: FineTuningParams) -> dict[str, Any] | None:
        """The space's values of ``params``, as Optuna takes them (an ``Enum`` member by its
        value); None if a value lies outside its distribution."""
        out: dict[str, Any] = {}
        for name, distribution in self.distributions.items():
            value = getattr(params, name, None)
            if isinstance(value, enum.Enum):
                value = value.value
            try:
                inside = distribution._contains(distribution.to_internal_repr(value))
            except (ValueError, TypeError):
                inside = False
            if not inside:
                return None
            out[name] = value
        return out

    def to_json(self) -> dict[str, Any]:
        """The space as JSON: ``{field: Optuna's JSON of its distribution}``."""
        to_json = optuna_module().distributions.distribution_to_json
        return {name: json.loads(to_json(d)) for name, d in self.distributions.items()}


def _probes(distribution: BaseDistribution) -> list[Any]:
    """Values a distribution can propose that exercise the field's type: bounds or choices."""
    choices = getattr(distribution, "choices", None)
    if choices is not None:
        return list(choices)
    return [distribution.low, distribution.high]  # type: ignore[attr-defined]


@attrs.frozen
class TopN:
    """The seed's rule (the default): the previous iteration's top-N params sets (the
    manager's ``n_top_runs``), else the method's initial sets; ``max_runs`` keeps the first
    that many."""

    name: ClassVar[str] = "top_n"
    max_runs: int | None = attrs.field(default=None)

    @max_runs.validator
    def _check_max_runs(self, _attribute: Any, value: int | None) -> None:
        if value is not None:
            _check_budget(value)


def _check_budget(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RUNS:
        raise ConfigurationError(f"max_runs must be an int from 1 to {MAX_RUNS}, got {value!r}")


def _default_pruner() -> BasePruner:
    """The median stopping rule once two runs of the iteration completed, from step 1."""
    pruner: BasePruner = optuna_module().pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    return pruner


def _check_sampler(_self: Any, _attribute: Any, value: object) -> None:
    samplers = optuna_module().samplers
    if value is not None and not (isinstance(value, samplers.BaseSampler) or callable(value)):
        raise ConfigurationError(
            "sampler must be an Optuna sampler or a callable seed -> sampler, got "
            f"{type(value).__name__}"
        )


def _check_pruner(_self: Any, _attribute: Any, value: object) -> None:
    pruners = optuna_module().pruners
    if value is not None and not isinstance(value, pruners.BasePruner):
        raise ConfigurationError(
            f"pruner must be an Optuna pruner or None, got {type(value).__name__}"
        )


def _check_history(_self: Any, _attribute: Any, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigurationError(f"history must be None or an int >= 1, got {value!r}")


def _check_staleness(_self: Any, _attribute: Any, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigurationError(f"staleness must be a number from 0 to 1, got {value!r}")


@attrs.frozen
class Search:
    """Each iteration's params sets proposed by an Optuna sampler fed from the tracking store.

    - ``space``: the :class:`SearchSpace` (None: the method's ``search_space``);
    - ``max_runs``: the params sets per iteration, the previous best among them;
    - ``sampler``: an Optuna sampler (deep-copied for every proposal, so it starts from the
      same state each time), or a callable ``seed -> sampler`` (called with a seed derived
      from the driver's ``seed`` and the batch); None: ``TPESampler(seed=...)``;
    - ``pruner``: an Optuna pruner (deep-copied for every decision); None: no pruning;
      default: ``MedianPruner(n_startup_trials=2, n_warmup_steps=1)``;
    - ``intermediate_metric``: the metric whose values at each step the pruner compares
      (None: the main metric), lower is better when ``intermediate_is_loss`` (None: as the
      main metric);
    - ``history``: how many of the most recent earlier iterations feed the sampler (None:
      all of them); ``staleness``: how much a run's value (its percentile rank in its
      iteration, 0 the best, 1 the worst) worsens per iteration of age, so that of two
      equally good runs the recent one counts more (see :mod:`tracker_core.search_study`
      on drift).
    """

    name: ClassVar[str] = "search"
    space: SearchSpace[Any] | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(SearchSpace))
    )
    max_runs: int = attrs.field(default=8)
    sampler: BaseSampler | Callable[[int], BaseSampler] | None = attrs.field(
        default=None, validator=_check_sampler, eq=False
    )
    pruner: BasePruner | None = attrs.field(
        factory=_default_pruner, validator=_check_pruner, eq=False
    )
    intermediate_metric: str | None = None
    intermediate_is_loss: bool | None = None
    history: int | None = attrs.field(default=None, validator=_check_history)
    staleness: float = attrs.field(default=0.05, validator=_check_staleness)

    @max_runs.validator
    def _check_max_runs(self, _attribute: Any, value: int) -> None:
        _check_budget(value)

    def make_sampler(self, seed: int) -> BaseSampler:
        """A sampler in the same state for the same ``seed``, every time."""
        import copy

        optuna_module()
        from optuna.samplers import BaseSampler, TPESampler

        if self.sampler is None:
            return TPESampler(seed=seed)
        if isinstance(self.sampler, BaseSampler):
            return copy.deepcopy(self.sampler)
        sampler = self.sampler(seed)
        if not isinstance(sampler, BaseSampler):
            raise ConfigurationError(
                f"the sampler factory returned {type(sampler).__name__}, not an Optuna sampler"
            )
        return sampler


#: a proposal policy: :class:`TopN` or :class:`Search`
ProposalPolicy = TopN | Search


def resolve_policy(
    search: Search | None,
    space: SearchSpace[Any] | None,
    params_type: type[FineTuningParams],
    proposal: str = TopN.name,
    max_runs: int | None = None,
) -> ProposalPolicy:
    """The policy in force: ``proposal`` (``"top_n"`` or ``"search"``) with ``max_runs``;
    a search as a method's ``search`` says (None: ``Search()``), over its own space or else
    the method's ``space``. Raises :class:`ConfigurationError` for an unknown policy, a
    search without a space, or a space over another params class."""
    if proposal not in POLICIES:
        raise ConfigurationError(f"proposal must be one of {', '.join(POLICIES)}, got {proposal!r}")
    if max_runs is not None:
        _check_budget(max_runs)
    if proposal == TopN.name:
        return TopN(max_runs)
    policy = search if search is not None else Search()
    if policy.space is None:
        if space is None:
            raise ConfigurationError(
                "the search policy needs a search space: declare the method's search_space "
                "(a tracker_core.search.SearchSpace) or give Search(space=...)"
            )
        policy = attrs.evolve(policy, space=space)
    assert policy.space is not None
    if policy.space.params_type is not params_type:
        raise ConfigurationError(
            f"the search space is over {policy.space.params_type.__name__}, but the "
            f"method's params are {params_type.__name__}"
        )
    if max_runs is not None:
        policy = attrs.evolve(policy, max_runs=max_runs)
    return policy
