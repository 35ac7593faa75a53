"""The sequential driver: :func:`run_iteration` runs one iteration in this process, as
:func:`~tracker_core.finetune.prepare_iteration` (steps 1-3) followed by :func:`run_prepared`
(steps 4-6 and 8 for one params set after another, then step 7), with the same code for every
step as the task service's parallel jobs.

Progress and stopping (for a supervisor such as the task service):

- ``on_progress`` is called with an :class:`IterationProgress` once the params sets are known
  and after every run (trained, failed or skipped);
- ``should_stop`` is polled before every run (and while it waits for runs other workers
  hold); when it returns True the driver raises :class:`IterationStopped` there. A method
  can stop sooner from inside ``train`` by calling :func:`check_stop` (or testing
  :func:`stop_requested`) at its own safe points. Either way the current run is left
  unfinished, exactly as after a crash, so calling :func:`run_iteration` again with the same
  batch resumes it.

Several processes on one batch (a worker each, sharing the iteration through the runs'
leases) spread over its params sets: each trains the params sets in order, skipping a run that
another live worker holds and coming back to it at the end (the runs ended meanwhile are found
in one read and skipped), where it waits for that run to end (skipped, as finished) or for its
worker's lease to expire (then trained: its worker died).
One worker trains a run at a time, and a run that ended is never trained again (a run the
search's pruner stopped ended too, KILLED: it is skipped like the others, whichever worker
pruned it).

Failure semantics:

- an exception from the method (``train``/``evaluate``, or a non-finite metric) fails that run
  only (FAILED, with the error logged and reported in the result);
- a failure of the stores (tracking or artifact side, after retries) or an interrupt
  (``KeyboardInterrupt``, ``SystemExit``, any ``BaseException``) stops the iteration: the
  current run is left unfinished, so the next call with the same batch restarts it;
- if no run of the iteration succeeded, :class:`~tracker_core.errors.IterationFailedError` is
  raised naming the failures; the failed iteration is moved to MLflow's deleted experiments
  (restorable from the UI, and out of the way so the same batch can be retried) and the
  previous iteration, with its best model, is kept.
"""

from __future__ import annotations

import collections
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tracker_core.errors import RunInUseError
from tracker_core.finetune.completion import complete_iteration
from tracker_core.finetune.plan import IterationPlan, _enter, prepare_iteration
from tracker_core.finetune.results import IterationProgress, IterationResult
from tracker_core.finetune.run import _pruning, _StartModel, _train_taken
from tracker_core.finetune.stopping import IterationStopped, _stop_scope
from tracker_core.manager import ExperimentsManager
from tracker_core.methods import FineTuningMethod
from tracker_core.params import FineTuningParams

__all__ = ["run_iteration", "run_prepared"]

log = logging.getLogger(__name__)

#: how often a worker whose every run left is held by other workers looks whether one ended
#: (or its worker's lease expired)
HELD_POLL_SECONDS = 0.5


def run_iteration(
    method: FineTuningMethod[Any],
    manager: ExperimentsManager,
    batch_id: str,
    *,
    seed: int | None = 0,
    work_dir: str | Path | None = None,
    on_progress: Callable[[IterationProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    proposal: str | None = None,
    max_runs: int | None = None,
) -> IterationResult:
    """Run (or resume) one fine-tuning iteration of ``method`` on the data batch ``batch_id``.

    ``manager`` must track ``method`` (same plugin name, main metric and direction; build it
    with ``connect(artifact_uri, **connect_kwargs(method))``). ``seed`` is passed to
    ``method.initial_params``; keep it fixed so a resumed first iteration proposes the same
    sets. Temporary files (the local copy of the starting model) go to a fresh folder under
    ``work_dir`` (default: the system temporary folder), removed before returning or raising.

    ``on_progress`` and ``should_stop`` are for supervisors (see the module docstring):
    progress reports, and a stop check polled before every run and offered to the method
    through :func:`check_stop`.

    Returns an :class:`IterationResult`. Raises
    :class:`~tracker_core.errors.IterationFailedError` if no run succeeded,
    :class:`IterationStopped` if asked to stop, and store errors (after retries) as they are;
    see the module docstring for what is kept in each case.

    It is :func:`prepare_iteration` followed by :func:`run_prepared`.
    """
    with _stop_scope(should_stop):
        plan = prepare_iteration(
            method, manager, batch_id, seed=seed, proposal=proposal, max_runs=max_runs
        )
        return run_prepared(
            method,
            manager,
            plan,
            work_dir=work_dir,
            on_progress=on_progress,
            should_stop=should_stop,
        )


# ---------------------------------------------------------------------- steps 4-8, in order
def run_prepared(
    method: FineTuningMethod[Any],
    manager: ExperimentsManager,
    plan: IterationPlan,
    *,
    work_dir: str | Path | None = None,
    on_progress: Callable[[IterationProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> IterationResult:
    """Steps 4-8 of a prepared iteration, one params set after another in this process,
    then step 7 (:func:`complete_iteration`). What :func:`run_iteration` does after
    :func:`prepare_iteration`; the same semantics."""
    with _stop_scope(should_stop):
        _enter(manager, plan)
        work = Path(tempfile.mkdtemp(prefix="tracker-core-iteration-", dir=work_dir))
        try:
            try:
                outcomes = _run_all(
                    method,
                    manager,
                    plan,
                    _StartModel(manager, plan.start_run_id, work / "model"),
                    on_progress,
                    should_stop,
                )
            except BaseException:
                manager.abandon_iteration()
                raise
            return complete_iteration(method, manager, plan, outcomes)
        finally:
            # 8. model cleanup
            shutil.rmtree(work, ignore_errors=True)


def _run_all(
    method: FineTuningMethod[Any],
    manager: ExperimentsManager,
    plan: IterationPlan,
    start: _StartModel,
    on_progress: Callable[[IterationProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, tuple[bool, str | None]]:
    """Steps 4-6 for every params set, in order, a run another live worker holds put back at
    the end of the line (see the module docstring): ``{params id: (trained, error)}``.
    A pruned run ended, like any other: it is not trained again."""
    params = plan.params
    pruning = _pruning(method, manager, plan)
    done: dict[str, tuple[bool, str | None]] = {}
    #: the params sets this call found or left pruned (for the progress reports)
    pruned: set[str] = set()
    line = collections.deque(enumerate(params, 1))
    #: runs found held one after another since the last run taken or the last pause
    held_in_a_row = 0
    #: the params sets put back since the iteration's runs were last read
    put_back: set[str] = set()
    said_held: set[str] = set()

    def report() -> None:
        if on_progress is not None:
            failed = sum(1 for _, error in done.values() if error is not None)
            on_progress(IterationProgress(len(params), len(done), failed, len(pruned)))

    def skip(index: int, p: FineTuningParams) -> None:
        log.info("run %d/%d %r finished in an earlier attempt; skipped", index, len(params), p)
        done[p.id] = (False, None)
        report()

    report()
    while line:
        index, p = line.popleft()
        if p.id in put_back:
            # back round to the held runs: those their workers ended meanwhile, in one read
            if held_in_a_row > len(line):  # every run left is held: give them a moment
                time.sleep(HELD_POLL_SECONDS)
                held_in_a_row = 0
            put_back.clear()
            ended = _ended_runs(manager)
            for entry in [(index, p), *line]:
                if entry[1].id in ended:
                    skip(*entry)
            line = collections.deque(e for e in line if e[1].id not in ended)
            if p.id in ended:
                continue
        label = f"{index}/{len(params)}"
        if should_stop is not None and should_stop():
            log.info("stop requested: leaving the iteration before run %s", label)
            raise IterationStopped(f"stopped before run {index} of {len(params)}")
        try:
            taken_ended = manager.set_run(p)
        except RunInUseError:
            if p.id not in said_held:
                said_held.add(p.id)
                log.info("run %s is held by another worker; back to it later", label)
            line.append((index, p))
            put_back.add(p.id)
            held_in_a_row += 1
            continue
        held_in_a_row = 0
        if taken_ended:
            skip(index, p)
        else:
            trained, error, was_pruned = _train_taken(method, manager, p, start, label, pruning)
            done[p.id] = (trained, error)
            if was_pruned:
                pruned.add(p.id)
            report()
    return done


def _ended_runs(manager: ExperimentsManager) -> set[str]:
    """The params ids of the current iteration's runs that ended."""
    experiment_id = manager.current_experiment_id
    assert experiment_id is not None
    return {r.run_name for r in manager.get_runs(experiment_id) if r.status.is_terminal}
