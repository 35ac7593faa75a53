"""The sequential driver: :func:`run_iteration` runs one iteration in this process, as
:func:`~tracker_core.finetune.prepare_iteration` (steps 1-3) followed by :func:`run_prepared`
(steps 4-6 and 8 for one params set after another, then step 7), with the same code for every
step as the task service's parallel jobs.

Progress and stopping (for a supervisor such as the task service):

- ``on_progress`` is called with an :class:`IterationProgress` once the params sets are known
  and after every run (trained, failed or skipped);
- ``should_stop`` is polled before every run; when it returns True the driver raises
  :class:`IterationStopped` there. A method can stop sooner from inside ``train`` by calling
  :func:`check_stop` (or testing :func:`stop_requested`) at its own safe points. Either way
  the current run is left unfinished, exactly as after a crash, so calling
  :func:`run_iteration` again with the same batch resumes it.

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

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tracker_core.finetune.completion import complete_iteration
from tracker_core.finetune.plan import IterationPlan, _enter, prepare_iteration
from tracker_core.finetune.results import IterationProgress, IterationResult
from tracker_core.finetune.run import _pruning, _StartModel, _train_one
from tracker_core.finetune.stopping import IterationStopped, _stop_scope
from tracker_core.manager import ExperimentsManager
from tracker_core.methods import FineTuningMethod

__all__ = ["run_iteration", "run_prepared"]

log = logging.getLogger(__name__)


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
    """Steps 4-6 for every params set, in order: ``{params id: (trained, error)}``."""
    params = plan.params
    pruning = _pruning(method, manager, plan)
    done: dict[str, tuple[bool, str | None]] = {}
    pruned: set[str] = set()

    def report() -> None:
        if on_progress is not None:
            failed = sum(1 for _, error in done.values() if error is not None)
            on_progress(IterationProgress(len(params), len(done), failed, len(pruned)))

    report()
    for index, p in enumerate(params, 1):
        if should_stop is not None and should_stop():
            log.info("stop requested: leaving the iteration before run %d/%d", index, len(params))
            raise IterationStopped(f"stopped before run {index} of {len(params)}")
        label = f"{index}/{len(params)}"
        trained, error, was_pruned = _train_one(
            method, manager, p, start, should_stop, label, pruning
        )
        done[p.id] = (trained, error)
        if was_pruned:
            pruned.add(p.id)
        report()
    return done
