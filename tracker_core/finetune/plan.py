"""Steps 1-3, planning an iteration: :func:`prepare_iteration` and the :class:`IterationPlan`
it returns.

1. **Initial model setup**: upload the method's initial model if none was uploaded yet; pick
   the model to start from (the best model of the newest iteration holding one, else the initial
   model). Nothing is downloaded here: each run loads it when it trains.
2. **Hyper-parameter selection**, by the proposal policy (:mod:`tracker_core.search`): the
   previous iteration's top-N params, else the method's initial sets (``top_n``, the
   default); or (``search``) the previous best (else the initial sets) and sets an Optuna
   sampler proposes from every earlier iteration's runs, up to ``max_runs``
   (:mod:`tracker_core.search_study`). Plus, either way, the params of the runs an earlier
   attempt of the same batch created.
3. **Iteration creation**: ``FineTuningIteration(plugin, batch_id, run_id=<start run>)``, or
   the newest iteration of that batch when it is resumed. A search creates it before step 2:
   its history ends where the iteration begins, so a resumed iteration proposes the same sets.

The plan is a value that can be sent to other processes as JSON (:meth:`IterationPlan.to_json`);
every later step begins with ``_enter``, which makes the plan's iteration current in the
manager of the process it runs in. :func:`parse_iteration_name` reads the iteration back from
an experiment name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from tracker_core import tags as T
from tracker_core.errors import ConfigurationError, InvalidParamsError, ModelNotFoundError
from tracker_core.finetune.champion import start_policy, starting_run
from tracker_core.manager import ExperimentsManager
from tracker_core.methods import FineTuningMethod, _check_method
from tracker_core.params import FineTuningParams
from tracker_core.search import ProposalPolicy, Search, TopN, resolve_policy
from tracker_core.search_study import propose
from tracker_core.values import (
    ExperimentRecord,
    FineTuningIteration,
    RunRecord,
    RunStatus,
    validate_name,
)

__all__ = ["IterationPlan", "parse_iteration_name", "prepare_iteration"]

log = logging.getLogger(__name__)


@attrs.frozen
class IterationPlan:
    """What steps 1-3 decided (:func:`prepare_iteration`): the iteration, the model it starts
    from and the params sets to try, in order.

    ``ended`` tells, for the params sets whose run had already ended when the plan was made
    (a resumed iteration), how it ended; ``proposal`` names the policy that chose the sets
    (``search`` also prunes the runs, with the method's pruner). :meth:`to_json` /
    :meth:`from_json` carry a plan to other processes (the task service's run jobs).
    """

    iteration: FineTuningIteration
    experiment_id: str
    start_run_id: str
    initial_run_id: str
    #: the iteration deleted at step 7 (the one the starting model comes from), if any
    previous_experiment_id: str | None
    #: the iteration existed already (an earlier attempt created it)
    resumed: bool
    params: tuple[FineTuningParams, ...]
    ended: Mapping[str, RunStatus] = attrs.field(factory=dict, eq=False)
    proposal: str = TopN.name

    @property
    def started_from_initial(self) -> bool:
        return self.start_run_id == self.initial_run_id

    @property
    def unfinished(self) -> tuple[FineTuningParams, ...]:
        """The params sets whose run had not ended when the plan was made."""
        return tuple(p for p in self.params if p.id not in self.ended)

    def params_by_id(self, params_id: str) -> FineTuningParams:
        for p in self.params:
            if p.id == params_id:
                return p
        raise ConfigurationError(
            f"params {params_id!r} are not one of the planned sets of {str(self.iteration)!r}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "plugin_name": self.iteration.plugin_name,
            "batch_id": self.iteration.batch_id,
            "iteration_run_id": self.iteration.run_id,
            "iteration": str(self.iteration),
            "experiment_id": self.experiment_id,
            "start_run_id": self.start_run_id,
            "initial_run_id": self.initial_run_id,
            "previous_experiment_id": self.previous_experiment_id,
            "resumed": self.resumed,
            "params": [{"id": p.id, "values": p.to_mlflow()} for p in self.params],
            "ended": {k: v.value for k, v in self.ended.items()},
            "proposal": self.proposal,
        }

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], params_type: type[FineTuningParams]
    ) -> IterationPlan:
        """The plan :meth:`to_json` described; ``params_type`` rebuilds the typed params."""
        params = []
        for item in data["params"]:
            p = params_type.from_mlflow(item["values"])
            if p.id != item["id"]:
                raise InvalidParamsError(
                    f"params {item['id']} of the plan rebuild as {p.id} with "
                    f"{params_type.__name__}: the method's params type changed since it was made"
                )
            params.append(p)
        return cls(
            iteration=FineTuningIteration(
                data["plugin_name"], data["batch_id"], run_id=data["iteration_run_id"]
            ),
            experiment_id=str(data["experiment_id"]),
            start_run_id=str(data["start_run_id"]),
            initial_run_id=str(data["initial_run_id"]),
            previous_experiment_id=data["previous_experiment_id"],
            resumed=bool(data["resumed"]),
            params=tuple(params),
            ended={k: RunStatus(v) for k, v in data.get("ended", {}).items()},
            proposal=str(data.get("proposal", TopN.name)),
        )


def parse_iteration_name(name: str) -> FineTuningIteration | None:
    """The :class:`FineTuningIteration` an experiment name was made from, or None."""
    parts = name.split(" / ")
    if len(parts) != 4 or parts[1] != "iteration":
        return None
    plugin, _, run_id, batch = parts
    try:
        return FineTuningIteration(plugin, batch, run_id=run_id or None)
    except ConfigurationError:
        return None


def prepare_iteration(
    method: FineTuningMethod[Any],
    manager: ExperimentsManager,
    batch_id: str,
    *,
    seed: int | None = 0,
    proposal: str | None = None,
    max_runs: int | None = None,
) -> IterationPlan:
    """Steps 1-3: upload the initial model if needed, choose the starting model and the
    params sets, and create (or resume) the iteration, which is left current in ``manager``.

    ``proposal`` (``"top_n"`` or ``"search"``; None: the method's own ``proposal``) and
    ``max_runs`` (the most params sets to try; None: the policy's) choose the policy; see
    :func:`method_policy`. Downloads nothing: each run loads the starting model when it
    trains (step 4).
    """
    _check_method(method)
    _check_manager(manager, method)
    validate_name(batch_id, "batch_id")
    policy = method_policy(method, proposal, max_runs)
    if manager.current_iteration is not None:
        manager.finish_iteration()

    # 1. initial model setup
    if not manager.has_initial_model():
        log.info("uploading the initial model of %r", method.name)
        manager.upload_initial_model(method.initial_model())
    initial_run_id = manager.get_initial_model_run_id()
    if initial_run_id is None:
        raise ModelNotFoundError(f"the initial model of {method.name!r} could not be found")

    newest = _newest_iteration(manager)
    existing = newest if newest is not None and _batch_of(newest) == batch_id else None
    found = None if existing is not None else _previous_iteration(manager)
    if found is not None and _made_since(found[0], batch_id, newest):
        # another worker created this batch's iteration (and saved a model in it) while this
        # one looked for the previous iteration: join it, never start a second one from it
        existing, found = found[0], None
    resumed_iteration = parse_iteration_name(existing.name) if existing is not None else None
    previous: ExperimentRecord | None = None
    start_run: RunRecord | None = None
    previous_best_run: RunRecord | None = None  # the previous iteration's best (top params)
    if resumed_iteration is not None:
        start_run_id = resumed_iteration.run_id or initial_run_id
        start_run = manager.get_run_by_id(start_run_id)
        if start_run is not None and start_run_id != initial_run_id:
            previous = manager.get_experiment(start_run.experiment_id)
            if previous is not None and previous.lifecycle_stage != "active":
                previous = None
        previous_best_run = start_run
        if existing is not None and start_policy(method) == "champion":  # not the start's
            before = manager.tracker.iterations.newest_with_model(existing)
            if before is not None:
                previous, previous_best_run = before
        log.info("resuming iteration %r", str(resumed_iteration))
    else:
        if found is not None:
            previous, previous_best_run = found
            start_run = starting_run(method, manager, previous_best_run)  # the champion's?
            start_run_id = start_run.run_id
            log.info("starting from the best model of %r (run %s)", previous.name, start_run_id)
        else:
            start_run_id = initial_run_id
            log.info("starting from the initial model (run %s)", start_run_id)
    iteration = resumed_iteration or FineTuningIteration(method.name, batch_id, run_id=start_run_id)

    # 2. hyper-parameter selection (a search creates the iteration first: step 3)
    # a resumed iteration whose starting iteration is already gone (a crash after step 7)
    # only finishes the runs it has; any other iteration proposes its sets
    start_is_gone = (
        resumed_iteration is not None and start_run_id != initial_run_id and previous is None
    )
    params: list[FineTuningParams] = []
    if not start_is_gone:
        previous_best = previous_best_run if previous is not None else None
        params = _select(method, manager, policy, iteration, previous, previous_best, seed)
    ended: dict[str, RunStatus] = {}
    if existing is not None:  # runs already created by an earlier attempt are kept
        for run in sorted(
            manager.get_runs(existing.experiment_id),
            key=lambda r: (r.start_time_ms, r.run_id),
        ):
            if run.status.is_terminal:
                ended.setdefault(run.run_name, run.status)
            try:
                params.append(method.params_type.from_mlflow(run.params))
            except InvalidParamsError:
                # created by a worker that died before logging its params: its params set
                # is among the ones above (the run gets its params when that set resumes it)
                log.warning("run %s (%s) has no params yet; skipped", run.run_id, run.run_name)
    params = _dedupe(params)
    if not params:
        raise ConfigurationError(f"fine-tuning method {method.name!r} proposed no params sets")
    log.info("%d params set(s) to try", len(params))

    # 3. iteration creation
    if manager.current_experiment_id is None:
        manager.set_iteration(iteration)
    experiment_id = manager.current_experiment_id
    assert experiment_id is not None
    return IterationPlan(
        iteration=iteration,
        experiment_id=experiment_id,
        start_run_id=start_run_id,
        initial_run_id=initial_run_id,
        previous_experiment_id=None if previous is None else previous.experiment_id,
        resumed=existing is not None,
        params=tuple(params),
        ended={p.id: ended[p.id] for p in params if p.id in ended},
        proposal=policy.name,
    )


def method_policy(
    method: FineTuningMethod[Any], proposal: str | None = None, max_runs: int | None = None
) -> ProposalPolicy:
    """The proposal policy of ``method`` in force for a caller asking for ``proposal`` and
    ``max_runs`` (None: the method's own; see :func:`tracker_core.search.resolve_policy`)."""
    return resolve_policy(
        method.search,
        method.search_space,
        method.params_type,
        proposal or method.proposal,
        max_runs,
    )


def _select(
    method: FineTuningMethod[Any],
    manager: ExperimentsManager,
    policy: ProposalPolicy,
    iteration: FineTuningIteration,
    previous: ExperimentRecord | None,
    previous_best: RunRecord | None,
    seed: int | None,
) -> list[FineTuningParams]:
    """Step 2 by the policy: the top-N of the previous iteration, else the initial sets; or
    the search's proposals (the previous best, else the initial sets, first)."""
    if isinstance(policy, Search):
        manager.set_iteration(iteration)  # 3. first: the search's history ends here
        fixed: list[FineTuningParams] = []
        if previous_best is not None:
            try:
                fixed = [method.params_type.from_mlflow(previous_best.params)]
            except InvalidParamsError:
                log.warning(
                    "the previous best run %s has other params; not retried", previous_best.run_id
                )
        if not fixed:
            fixed = list(method.initial_params(seed))
        return propose(manager, policy, seed=seed, fixed=fixed)
    params: list[FineTuningParams] = []
    if previous is not None:
        params = list(
            manager.get_top_params_by_experiment_id(previous.experiment_id, method.params_type)
            or []
        )
    if not params:
        params = list(method.initial_params(seed))
    return params[: policy.max_runs]


def _enter(manager: ExperimentsManager, plan: IterationPlan) -> None:
    """Make the plan's iteration current in ``manager`` (another process's plan: a run job)."""
    if manager.current_experiment_id == plan.experiment_id:
        return
    manager.set_iteration(plan.iteration)
    if manager.current_experiment_id != plan.experiment_id:
        found = manager.current_experiment_id
        manager.finish_iteration()
        raise ConfigurationError(
            f"iteration {str(plan.iteration)!r} is experiment {found} now, not "
            f"{plan.experiment_id} as planned (was it deleted and made again?); "
            "prepare the iteration again"
        )


def _check_manager(manager: ExperimentsManager, method: FineTuningMethod[Any]) -> None:
    mismatches = [
        f"{what}: manager {mine!r}, method {theirs!r}"
        for what, mine, theirs in (
            ("plugin name", manager.plugin_name, method.name),
            ("main metric", manager.main_metric, method.main_metric),
            ("is_loss", manager.is_loss, bool(method.is_loss)),
        )
        if mine != theirs
    ]
    if mismatches:
        raise ConfigurationError(
            "the manager does not match the fine-tuning method ("
            + "; ".join(mismatches)
            + "); build it with tracker_core.connect(..., **connect_kwargs(method))"
        )


def _newest_iteration(manager: ExperimentsManager) -> ExperimentRecord | None:
    """The newest iteration of this plugin: resumed when it was made for the batch asked for
    (only the newest iteration is resumed; an older one of the same batch is a start)."""
    for experiment in manager.get_experiments():
        return experiment
    return None


def _batch_of(experiment: ExperimentRecord) -> str | None:
    return experiment.tags.get(T.TAG_BATCH)


def _made_since(
    experiment: ExperimentRecord, batch_id: str, newest: ExperimentRecord | None
) -> bool:
    """Whether ``experiment`` is an iteration of ``batch_id`` created after ``newest`` was
    the newest iteration (by another worker preparing the same batch)."""
    if _batch_of(experiment) != batch_id:
        return False
    if newest is None:
        return True
    return (
        experiment.experiment_id != newest.experiment_id
        and experiment.creation_time_ms >= newest.creation_time_ms
    )


def _previous_iteration(manager: ExperimentsManager) -> tuple[ExperimentRecord, RunRecord] | None:
    """The newest iteration that holds a model of a FINISHED run, with that run
    (:meth:`~tracker_core.ExperimentsManager.get_last_model_run`). Runs still unfinished in it
    (a straggling worker, a crash) do not matter: its best model so far is the start, and its
    deletion at step 7 waits for its live workers."""
    run = manager.get_last_model_run()
    experiment = manager.get_experiment(run.experiment_id) if run is not None else None
    if run is None or experiment is None:
        return None
    return experiment, run


def _dedupe(params: Sequence[FineTuningParams]) -> list[FineTuningParams]:
    seen: dict[str, FineTuningParams] = {}
    for p in params:
        if not isinstance(p, FineTuningParams):
            raise ConfigurationError(f"params must be FineTuningParams, got {type(p).__name__}")
        seen.setdefault(p.id, p)
    return list(seen.values())
