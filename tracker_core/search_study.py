"""Proposing an iteration's params sets with an Optuna sampler fed from the tracking store:
:func:`propose`, and :func:`history` (the earlier runs as Optuna trials).

**The tracking store stays the one source of truth.** The study is an in-memory Optuna study
built from the history each time an iteration is planned, used for the proposal and thrown
away; nothing is stored on Optuna's side, so there is nothing to keep in sync, to migrate or
to lose, and every worker sees the same history.

**The history** is every FINISHED run (and every pruned one, see :mod:`tracker_core.pruning`)
of the plugin's earlier iterations, deleted ones included (an iteration deleted at step 7 is
only moved to MLflow's deleted experiments, which keep their runs until ``mlflow gc``).
"Earlier" is fixed by the current iteration: iterations created before it, runs ended
before it was created. A resumed iteration therefore sees the same history, and with the
same seed the sampler proposes the same sets: the same runs, by params identity, so a crash
never duplicates work. (As for run leases, hosts' clocks must agree to well within a run.)

**Drift.** A batch's metric is comparable only within its batch (the data changed, and with
it the metric's level), so each finished run's value is its percentile rank among its
iteration's finished runs (0: the best, 1: the worst), plus ``Search.staleness`` (0.05) per
iteration of age: the optimum moves, so of two runs that were equally good in their batch the
more recent one counts more (without it, the best runs of every batch tie at 0 and a sampler
that sorts them, as TPE does, keeps the oldest). The study minimises that value. Runs are
numbered oldest first, so samplers that weigh recent trials more (TPE ramps down trials older
than the newest 25) do so by batch; ``Search.history`` keeps only the most recent iterations.
A pruned run enters as Optuna's PRUNED trial with its value where it stopped (TPE ranks those
after every completed one). ``benchmarks/bench_search.py`` measures these choices.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from tracker_core import tags as T
from tracker_core.errors import ConfigurationError, InvalidParamsError
from tracker_core.manager import ExperimentsManager
from tracker_core.params import FineTuningParams
from tracker_core.quiet import quiet
from tracker_core.search import Search, SearchSpace, optuna_module
from tracker_core.stores import ExperimentQuery, RunQuery
from tracker_core.values import ExperimentRecord, RunRecord, RunStatus

if TYPE_CHECKING:
    from optuna import Study
    from optuna.trial import FrozenTrial

__all__ = ["history", "propose"]

log = logging.getLogger(__name__)

P = TypeVar("P", bound=FineTuningParams)

#: experiment ids per run search (one query each)
_IDS_PER_QUERY = 50
#: asks for a params set not proposed yet before the space counts as exhausted
_MAX_REPEATS = 20


def propose(
    manager: ExperimentsManager,
    search: Search,
    *,
    seed: int | None = 0,
    fixed: Sequence[FineTuningParams] | None = None,
) -> list[Any]:
    """The params sets of the manager's current iteration under ``search``: ``fixed`` first
    (default: the previous best, the incumbent), then sets proposed by the sampler up to
    ``search.max_runs`` in all (fewer when the space holds no other set). Deterministic for
    the same ``seed``, batch and history (see the module docstring)."""
    space = _space(search)
    experiment_id = manager.current_experiment_id
    iteration = manager.current_iteration
    if experiment_id is None or iteration is None:
        raise ConfigurationError("propose() needs a current iteration: call set_iteration first")
    current = manager.get_experiment(experiment_id)
    assert current is not None
    if fixed is None:
        fixed = _incumbent(manager, space)
    trials = history(manager, space, current, recent=search.history, staleness=search.staleness)
    study = _study(search, trials, _seed(seed, iteration.batch_id), current.experiment_id)
    out: dict[str, FineTuningParams] = {}
    for p in list(fixed)[: search.max_runs]:
        if p.id in out:
            continue
        out[p.id] = p
        values = space.values_of(p)
        if values is not None:  # the sampler sees it as running, and proposes elsewhere
            study.enqueue_trial(values)
            study.ask(fixed_distributions=dict(space.distributions))
    repeats = 0
    while len(out) < search.max_runs and repeats < _MAX_REPEATS:
        trial = study.ask(fixed_distributions=dict(space.distributions))
        p = space.params_of(trial.params)
        if p.id in out:
            repeats += 1
            continue
        out[p.id] = p
    log.info(
        "search: %d params set(s) proposed from %d earlier run(s) (%d fixed)",
        len(out),
        len(trials),
        min(len(fixed), search.max_runs),
    )
    return list(out.values())


def history(
    manager: ExperimentsManager,
    space: SearchSpace[Any],
    before: ExperimentRecord,
    *,
    recent: int | None = None,
    staleness: float = 0.0,
) -> list[FrozenTrial]:
    """The plugin's runs that ended before the iteration ``before`` was created, in
    iterations created before it (deleted ones too), as Optuna trials oldest first (see the
    module docstring); the ``recent`` most recent iterations with such runs (None: all),
    their values worse by ``staleness`` per iteration of age. Runs whose params fall outside
    ``space`` are left out."""
    experiments = _earlier_iterations(manager, before)
    by_experiment: dict[str, list[RunRecord]] = defaultdict(list)
    for run in _ended_runs(manager, [e.experiment_id for e in experiments]):
        if run.end_time_ms is not None and run.end_time_ms <= before.creation_time_ms:
            by_experiment[run.experiment_id].append(run)
    kept = [e for e in experiments if by_experiment.get(e.experiment_id)]
    if recent is not None:
        kept = kept[-recent:]
    trials: list[FrozenTrial] = []
    for age, experiment in zip(range(len(kept) - 1, -1, -1), kept, strict=True):
        runs = sorted(
            by_experiment[experiment.experiment_id], key=lambda r: (r.start_time_ms, r.run_id)
        )
        trials.extend(_trials(manager, space, experiment, runs, age * staleness))
    return trials


# ---------------------------------------------------------------------- the study
def _study(search: Search, trials: Sequence[FrozenTrial], seed: int, name: str) -> Study:
    """An in-memory study of ``trials`` (minimising the normalised rank), with the sampler."""
    optuna = optuna_module()
    storage = optuna.storages.InMemoryStorage()
    study_name = f"tracker-core-{name}"
    with quiet("optuna.storages._in_memory", lambda r: r.levelno <= logging.INFO):
        storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], study_name)
    study: Study = optuna.Study(
        study_name, storage, sampler=search.make_sampler(seed), pruner=optuna.pruners.NopPruner()
    )
    study.add_trials(trials)
    return study


def _seed(seed: int | None, batch_id: str) -> int:
    """The sampler's seed for one iteration: the driver's seed and the batch, hashed."""
    digest = hashlib.sha256(f"{seed}/{batch_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _space(search: Search) -> SearchSpace[Any]:
    if search.space is None:
        raise ConfigurationError("this Search has no space: give Search(space=...)")
    return search.space


def _incumbent(manager: ExperimentsManager, space: SearchSpace[Any]) -> list[FineTuningParams]:
    """The best run's params of the previous iteration (the one holding the last model)."""
    run = manager.get_last_model_run()
    if run is None or manager.is_initial_run(run.run_id):
        return []
    try:
        return [space.params_type.from_mlflow(run.params)]
    except InvalidParamsError:
        return []


# ---------------------------------------------------------------------- the history
def _earlier_iterations(
    manager: ExperimentsManager, before: ExperimentRecord
) -> list[ExperimentRecord]:
    """The plugin's iterations created before ``before`` (deleted too), oldest first."""
    query = ExperimentQuery(
        tags={T.TAG_PLUGIN: manager.plugin_name, T.TAG_KIND: T.KIND_ITERATION},
        created_before_ms=before.creation_time_ms,
        include_deleted=True,
    )
    found = [
        e
        for e in manager.tracking.iter_experiments(query, page_size=100)
        if e.experiment_id != before.experiment_id
    ]
    return sorted(found, key=lambda e: (e.creation_time_ms, int(e.experiment_id)))


def _ended_runs(manager: ExperimentsManager, experiment_ids: Sequence[str]) -> Iterator[RunRecord]:
    for start in range(0, len(experiment_ids), _IDS_PER_QUERY):
        chunk = tuple(experiment_ids[start : start + _IDS_PER_QUERY])
        query = RunQuery(
            chunk, statuses=(RunStatus.FINISHED, RunStatus.KILLED), include_deleted=True
        )
        yield from manager.tracking.search_runs(query)


def _trials(
    manager: ExperimentsManager,
    space: SearchSpace[Any],
    experiment: ExperimentRecord,
    runs: Sequence[RunRecord],
    stale: float,
) -> list[FrozenTrial]:
    """One iteration's runs as trials: finished ones by their percentile rank among the
    iteration's finished runs plus ``stale``, pruned ones by their value where they stopped."""
    optuna = optuna_module()
    complete = optuna.trial.TrialState.COMPLETE
    pruned = optuna.trial.TrialState.PRUNED
    metric, is_loss = manager.main_metric, manager.is_loss
    finished = [r for r in runs if r.status == RunStatus.FINISHED and metric in r.metrics]
    ranks = dict(
        zip(
            (r.run_id for r in finished),
            _ranks([r.metrics[metric] for r in finished], is_loss),
            strict=True,
        )
    )
    out: list[FrozenTrial] = []
    for run in runs:
        values = _values(space, run)
        if values is None:
            continue
        attrs = {"run_id": run.run_id, "batch_id": experiment.tags.get(T.TAG_BATCH, "")}
        if run.run_id in ranks:
            out.append(
                optuna.trial.create_trial(
                    state=complete,
                    value=ranks[run.run_id] + stale,
                    params=values,
                    distributions=dict(space.distributions),
                    user_attrs=attrs,
                )
            )
        elif run.status == RunStatus.KILLED and run.tags.get(T.TAG_PRUNED) == T.TRUE:
            out.append(
                optuna.trial.create_trial(
                    state=pruned,
                    params=values,
                    distributions=dict(space.distributions),
                    user_attrs=attrs,
                    intermediate_values=_stopped_at(run, is_loss),
                )
            )
    return out


def _values(space: SearchSpace[Any], run: RunRecord) -> dict[str, Any] | None:
    try:
        params = space.params_type.from_mlflow(run.params)
    except InvalidParamsError:
        log.debug("run %s: params of another type; not in the search history", run.run_id)
        return None
    return space.values_of(params)


def _stopped_at(run: RunRecord, is_loss: bool) -> dict[int, float]:
    """A pruned run's value where it stopped, signed so that lower is better."""
    try:
        step = int(run.tags[T.TAG_PRUNED_STEP])
        value = float(run.tags[T.TAG_PRUNED_VALUE])
    except (KeyError, ValueError):
        return {}
    return {step: value if is_loss else -value}


def _ranks(values: Sequence[float], is_loss: bool) -> list[float]:
    """Percentile ranks in [0, 1], 0 for the best, ties sharing their mean rank; 0.5 for a
    single value (it says nothing about the rest of the space)."""
    n = len(values)
    if n == 1:
        return [0.5]
    order = sorted(range(n), key=lambda i: values[i] if is_loss else -values[i])
    ranks = [0.0] * n
    first = 0
    while first < n:
        last = first
        while last + 1 < n and values[order[last + 1]] == values[order[first]]:
            last += 1
        for position in range(first, last + 1):
            ranks[order[position]] = (first + last) / 2 / (n - 1)
        first = last + 1
    return ranks
