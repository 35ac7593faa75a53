"""Pruning inside ``train``: :func:`check_prune` and :class:`RunPruned`.

With the ``search`` policy and a pruner, the driver makes the pruning of the run it trains
current for this context (``_prune_scope``, as :mod:`.stopping` does for stop requests). A
method that logs an intermediate value every epoch (``manager.save_metric(MetricValue(
"val_recall", v, step=epoch))``) calls :func:`check_prune` after it: when the pruner finds
the run clearly worse than the iteration's others at that step, :class:`RunPruned` is raised
and the driver ends the run pruned (KILLED, tagged ``tracker.pruned``; see
:mod:`tracker_core.pruning`). Without a pruner :func:`check_prune` returns at once, so a
method can call it whatever the policy.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

from tracker_core.pruning import RunPruning

__all__ = ["RunPruned", "check_prune"]


class RunPruned(BaseException):
    """The run was pruned (see :func:`check_prune`).

    A ``BaseException``, like :class:`~tracker_core.finetune.IterationStopped`: a method's
    ``except Exception`` does not swallow it, and it is not a failure of the run.
    """


_pruning: contextvars.ContextVar[RunPruning | None] = contextvars.ContextVar(
    "tracker_core_pruning", default=None
)


def check_prune() -> None:
    """Raise :class:`RunPruned` if the pruner stops the run being trained at its last
    reported step; else return (at once when there is no pruner).

    Each call sends the run's queued metric values and reads the iteration's runs from the
    tracking store: call it where an intermediate value was just logged (every epoch), not
    every batch.
    """
    pruning = _pruning.get()
    if pruning is not None and pruning.should_prune():
        step = pruning.last[0] if pruning.last is not None else None
        raise RunPruned(f"pruned at step {step}: {pruning.metric} is clearly worse than the others")


@contextmanager
def _prune_scope(pruning: RunPruning | None) -> Iterator[None]:
    token = _pruning.set(pruning)
    try:
        yield
    finally:
        _pruning.reset(token)
