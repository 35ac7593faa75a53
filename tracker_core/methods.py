"""Fine-tuning methods as plug-ins: what a user implements to run iterations.

A method is an object of a :class:`FineTuningMethod` subclass. It names itself (the seed's
``meta.name``, used as the plugin name of every experiment it creates), says which metric ranks
its runs, builds the initial model, proposes the initial hyper-parameter sets, and trains and
evaluates one run::

    @attrs.frozen
    class MyParams(FineTuningParams):
        lr: float
        epochs: int = 2

    class MyMethod(FineTuningMethod[MyParams]):
        name = "my-method"
        params_type = MyParams
        main_metric = "recall_at_5"          # higher is better (is_loss = False)

        def initial_model(self): return build_model()
        def initial_params(self, seed=None): return grid_params(MyParams, lr=[1e-3, 1e-2])
        def train(self, model, params, manager):
            ...                               # manager.save_metric(MetricValue("loss", x))
            return model
        def evaluate(self, model, params, manager): return recall_at_5(model)

The contract of one run, as the driver (:func:`tracker_core.finetune.run_iteration`) calls it:

1. ``train(model, params, manager)`` receives the iteration's *starting* model (a fresh copy
   for every run), fine-tunes it, may log any metrics through ``manager.save_metric`` and
   returns the fine-tuned model (the same object or a new one).
2. ``evaluate(model, params, manager)`` returns the main metric of the fine-tuned model as a
   finite float. The driver logs it as the run's final value of :attr:`main_metric`, which is
   the value that ranks runs (lower is better when :attr:`is_loss`), whatever ``train`` logged
   under that name before.
3. An exception from either marks the run FAILED; it does not count as a quality.

A long ``train`` may call :func:`tracker_core.finetune.check_stop` now and then: it returns at
once unless the iteration was asked to stop (a task canceled in the task service), and then
raises :class:`~tracker_core.finetune.IterationStopped`, which leaves the run unfinished, as a
crash would, so a later call for the same batch resumes it.

How each iteration's params sets are chosen is the method's :attr:`~FineTuningMethod.proposal`
(a task may choose): the seed's top-N rule by default, or ``"search"`` over
:attr:`~FineTuningMethod.search_space`, as :attr:`~FineTuningMethod.search` says
(:mod:`tracker_core.search`); a ``train`` that logs an intermediate value every epoch and
then calls :func:`tracker_core.finetune.check_prune` lets the search's pruner stop a weak run.

Methods are found by name through the entry-point group ``tracker_core.methods`` (see
:func:`load_method`) or passed as objects.
"""

from __future__ import annotations

import abc
import importlib
import importlib.metadata
import itertools
import random
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from tracker_core.codecs import ModelFactory
from tracker_core.errors import ConfigurationError
from tracker_core.manager import ExperimentsManager
from tracker_core.params import FineTuningParams
from tracker_core.registry import import_object
from tracker_core.search import POLICIES, Search, SearchSpace

__all__ = [
    "METHOD_GROUP",
    "FineTuningMethod",
    "available_methods",
    "connect_kwargs",
    "grid_params",
    "load_method",
    "sample_params",
]

METHOD_GROUP = "tracker_core.methods"

P = TypeVar("P", bound=FineTuningParams)


class FineTuningMethod(abc.ABC, Generic[P]):
    """A fine-tuning method: the plug-in a user writes. See the module docstring.

    Attributes (class or instance attributes):
        name: the method's name (the seed's ``meta.name``); the plugin name of its experiments.
        params_type: its :class:`FineTuningParams` subclass.
        main_metric: the metric :meth:`evaluate` returns; it ranks runs.
        is_loss: True if lower :attr:`main_metric` is better.
        model_format: the model format to store (None: the backend's default).
        model_factory: builds an empty model, needed by the ``state_dict`` format to load weights.
        max_parallel_runs: the most runs of one iteration the task service may train at once
            (on as many workers); None (the default): no cap of the method's own. A method
            whose runs cannot share what they use (one licence, one dataset server, every GPU
            of a host) caps it; 1 trains its params sets one after another in one process.
        search_space: the params' :class:`~tracker_core.search.SearchSpace` (Optuna
            distributions over fields of :attr:`params_type`), for the ``search`` policy;
            None (the default): the method cannot be searched.
        search: how the method is searched when it is (:class:`~tracker_core.search.Search`:
            budget, sampler, pruner, intermediate metric); None: ``Search()``'s defaults.
        proposal: the policy that chooses each iteration's params sets unless the caller (a
            task's ``proposal``) says otherwise: ``"top_n"`` (the default: the previous
            iteration's top-N, else :meth:`initial_params`) or ``"search"`` (proposed by an
            Optuna sampler from every earlier iteration, weak runs pruned).
    """

    name: str
    params_type: type[P]
    main_metric: str
    is_loss: bool = False
    model_format: str | None = None
    model_factory: ModelFactory | None = None
    max_parallel_runs: int | None = None
    search_space: SearchSpace[Any] | None = None
    search: Search | None = None
    proposal: str = "top_n"
    #: what an iteration starts from: "champion" (the default with a holdout) or "last"
    start_from: str | None = None

    def evaluate_holdout(self, model: Any) -> float:
        """Optional: the main metric of ``model`` on a fixed holdout set, the same for every
        batch. Implementing it turns on promotion (:mod:`tracker_core.promotion`)."""
        raise NotImplementedError

    @abc.abstractmethod
    def initial_model(self) -> Any:
        """The model the first iteration starts from (uploaded once, kept forever)."""

    @abc.abstractmethod
    def initial_params(self, seed: int | None = None) -> Sequence[P]:
        """The params sets of the first iteration; ``seed`` for methods that sample a space."""

    @abc.abstractmethod
    def train(self, model: Any, params: P, manager: ExperimentsManager) -> Any:
        """Fine-tune ``model`` with ``params`` and return it; log metrics via ``save_metric``."""

    @abc.abstractmethod
    def evaluate(self, model: Any, params: P, manager: ExperimentsManager) -> float:
        """The main metric of the fine-tuned ``model`` (a finite number)."""

    def next_batch_id(self) -> str | None:
        """Optional hook: the data batch to fine-tune on when a task names none.

        The task service calls it when a task is created without a ``batch_id`` (the seed's
        "current clickstream batch will be released and used"). Return the batch id, or None
        to let the caller generate a sortable one. It may be called more than once for one
        request (a repeated idempotency key), so releasing a batch here should be idempotent.
        The default returns None.
        """
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {getattr(self, 'name', '?')!r}>"


def connect_kwargs(method: FineTuningMethod[Any]) -> dict[str, Any]:
    """The :func:`tracker_core.connect` keyword arguments a method determines::

    manager = tracker_core.connect("./models", **connect_kwargs(method))
    """
    _check_method(method)
    kwargs: dict[str, Any] = {
        "plugin_name": method.name,
        "main_metric": method.main_metric,
        "is_loss": method.is_loss,
        "params_type": method.params_type,
    }
    if method.model_format is not None:
        kwargs["model_format"] = method.model_format
    if method.model_factory is not None:
        kwargs["model_factory"] = method.model_factory
    return kwargs


def _check_method(method: object) -> None:
    if not isinstance(method, FineTuningMethod):
        raise ConfigurationError(
            f"a fine-tuning method must be a FineTuningMethod, got {type(method).__name__}"
        )
    for attr in ("name", "params_type", "main_metric"):
        if not getattr(method, attr, None):
            raise ConfigurationError(f"fine-tuning method {type(method).__name__} has no {attr!r}")
    if not (
        isinstance(method.params_type, type) and issubclass(method.params_type, FineTuningParams)
    ):
        raise ConfigurationError(
            f"{type(method).__name__}.params_type must be a FineTuningParams subclass"
        )
    cap = getattr(method, "max_parallel_runs", None)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigurationError(
            f"{type(method).__name__}.max_parallel_runs must be None or an int >= 1, got {cap!r}"
        )
    space = getattr(method, "search_space", None)
    if space is not None and not isinstance(space, SearchSpace):
        raise ConfigurationError(
            f"{type(method).__name__}.search_space must be None or a tracker_core.search."
            f"SearchSpace, got {type(space).__name__}"
        )
    search = getattr(method, "search", None)
    if search is not None and not isinstance(search, Search):
        raise ConfigurationError(
            f"{type(method).__name__}.search must be None or a tracker_core.search.Search, "
            f"got {type(search).__name__}"
        )
    if getattr(method, "proposal", "top_n") not in POLICIES:
        raise ConfigurationError(
            f"{type(method).__name__}.proposal must be one of {', '.join(POLICIES)}, "
            f"got {method.proposal!r}"
        )


# ---------------------------------------------------------------------- params helpers
def grid_params(params_type: type[P], **choices: Sequence[Any]) -> list[P]:
    """Every distinct combination of ``choices`` (field name -> values), in a stable order.

    Combinations that normalise to the same params (``lr=[1, 1.0]``) are one params set."""
    names = list(choices)
    grid: dict[str, P] = {}
    for combo in itertools.product(*(choices[n] for n in names)):
        params = params_type(**dict(zip(names, combo, strict=True)))
        grid.setdefault(params.id, params)
    return list(grid.values())


def sample_params(
    params_type: type[P], n: int, seed: int | None, **choices: Sequence[Any]
) -> list[P]:
    """``n`` distinct combinations of ``choices`` drawn with ``random.Random(seed)``."""
    grid = grid_params(params_type, **choices)
    if n >= len(grid):
        return grid
    return random.Random(seed).sample(grid, n)


# ---------------------------------------------------------------------- discovery
def available_methods() -> list[str]:
    """Names of the methods installed in the entry-point group ``tracker_core.methods``."""
    return sorted({ep.name for ep in importlib.metadata.entry_points(group=METHOD_GROUP)})


def _instantiate(obj: Any, where: str) -> FineTuningMethod[Any]:
    if not isinstance(obj, FineTuningMethod) and callable(obj):
        obj = obj()  # a method class, or a factory of methods
    if not isinstance(obj, FineTuningMethod):
        raise ConfigurationError(
            f"{where} is not a FineTuningMethod (nor a class or factory of one): "
            f"{type(obj).__name__}"
        )
    _check_method(obj)
    return obj


def load_method(spec: str | FineTuningMethod[Any]) -> FineTuningMethod[Any]:
    """A method object from a name or a ``module:attr`` path.

    - an object is returned as it is (after checking it);
    - ``"package.module:attr"`` imports ``attr`` (a method, a method class, or a factory);
    - any other string is an entry-point name in the group ``tracker_core.methods``, loaded
      only when asked for. An unknown name raises :class:`ConfigurationError` listing the
      installed ones.
    """
    if isinstance(spec, FineTuningMethod):
        _check_method(spec)
        return spec
    if ":" in spec:
        try:
            obj = import_object(spec)
        except (ImportError, AttributeError) as exc:
            raise ConfigurationError(f"cannot import fine-tuning method {spec!r}: {exc}") from exc
        return _instantiate(obj, spec)
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=METHOD_GROUP)}
    if spec not in eps:
        installed = ", ".join(sorted(eps)) or "none"
        raise ConfigurationError(
            f"no fine-tuning method named {spec!r} in the entry-point group {METHOD_GROUP!r} "
            f"(installed: {installed}); pass a 'module:attr' path instead"
        )
    try:
        loaded = eps[spec].load()
    except Exception as exc:
        raise ConfigurationError(f"cannot load fine-tuning method {spec!r}: {exc}") from exc
    return _instantiate(loaded, f"entry point {spec!r}")
