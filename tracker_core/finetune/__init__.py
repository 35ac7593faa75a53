"""The fine-tuning process: one iteration of a method, steps 1-8 of ``seeds/run-fine-tuning.md``.

:func:`run_iteration` does, in order:

1. **Initial model setup**: upload the method's initial model if none was uploaded yet; pick
   the model to start from (the best model of the newest iteration holding one, else the initial
   model); each run loads it from a local working copy.
2. **Hyper-parameter selection**: the previous iteration's top-N params, else the method's
   initial sets; or, with the ``search`` policy, the previous best plus the sets an Optuna
   sampler proposes from every earlier iteration (:mod:`tracker_core.search`).
3. **Iteration creation**: ``FineTuningIteration(plugin, batch_id, run_id=<start run>)``.
4.-6. **Runs**: for each params set, start or resume its run (a run that finished in an
   earlier attempt is skipped), train a fresh copy of the starting model, evaluate and log
   the main metric, save the model if it is among the best, finish the run. A run whose
   method raises is FAILED and does not count; one the search's pruner stops ends KILLED
   (tagged ``tracker.pruned``) and does not count either.
7. **Iteration completion**: finish the iteration and delete the iteration it started from
   (its models included); while live workers still hold runs of that iteration its deletion
   is deferred to a later completion. The initial model is never deleted.
8. **Model cleanup**: the local working copy (and every temporary file) is removed, on every
   path, success or failure.

The steps are also callable one by one, which is how the task service trains the params sets
of one iteration on several workers at once: :func:`prepare_iteration` (steps 1-3, returns an
:class:`IterationPlan`, a value that can be sent to other processes as JSON), :func:`train_run`
(steps 4-6 and 8 for one params set, in any process, concurrently with the others),
:func:`complete_iteration` (step 7, once every run has ended), and :func:`run_prepared` (steps
4-8 one after another, then 7). :func:`run_iteration` is :func:`prepare_iteration` followed by
:func:`run_prepared`: the sequential case, with the same code for every step.

An iteration is identified by its plugin and ``batch_id``: calling :func:`run_iteration` again
with the same batch resumes the newest iteration of that batch (finished runs are skipped, an
unfinished one restarts), and is a no-op that returns the same result once it is complete.

The parts, one concept a module (every name above is importable from this package):

- :mod:`.plan`: steps 1-3, :func:`prepare_iteration` and the :class:`IterationPlan` it returns;
- :mod:`.run`: steps 4-6 and 8 for one params set, :func:`train_run`;
- :mod:`.completion`: step 7, :func:`complete_iteration`;
- :mod:`.driver`: the sequential driver, :func:`run_iteration` and :func:`run_prepared`, and
  what happens on progress, on a stop request and on each kind of failure;
- :mod:`.results`: what an iteration and its runs ended as (:class:`RunResult`,
  :class:`IterationResult`) and how far one is (:class:`IterationProgress`);
- :mod:`.stopping`: stopping on request (:class:`IterationStopped`, :func:`check_stop`,
  :func:`stop_requested`);
- :mod:`.pruning`: stopping a weak run inside ``train`` (:func:`check_prune`,
  :class:`RunPruned`), with the ``search`` policy's pruner.
"""

from tracker_core.finetune.completion import complete_iteration
from tracker_core.finetune.driver import run_iteration, run_prepared
from tracker_core.finetune.plan import (
    IterationPlan,
    method_policy,
    parse_iteration_name,
    prepare_iteration,
)
from tracker_core.finetune.pruning import RunPruned, check_prune
from tracker_core.finetune.results import IterationProgress, IterationResult, RunResult
from tracker_core.finetune.run import train_run
from tracker_core.finetune.stopping import IterationStopped, check_stop, stop_requested

__all__ = [
    "IterationPlan",
    "IterationProgress",
    "IterationResult",
    "IterationStopped",
    "RunPruned",
    "RunResult",
    "check_prune",
    "check_stop",
    "complete_iteration",
    "method_policy",
    "parse_iteration_name",
    "prepare_iteration",
    "run_iteration",
    "run_prepared",
    "stop_requested",
    "train_run",
]
