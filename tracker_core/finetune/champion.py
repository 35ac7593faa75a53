"""What a method's promotion settings mean to the driver: whether it has a holdout
evaluation (:meth:`~tracker_core.methods.FineTuningMethod.evaluate_holdout`), and which run an
iteration starts from (its ``start_from`` policy: ``"champion"``, the default for a method
with a holdout, or ``"last"``, the last iteration's best, the default otherwise)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tracker_core.continual import START_FROM, start_run
from tracker_core.errors import ConfigurationError
from tracker_core.manager import ExperimentsManager
from tracker_core.methods import FineTuningMethod
from tracker_core.values import RunRecord

__all__ = ["holdout_of", "start_policy", "starting_run"]


def holdout_of(method: FineTuningMethod[Any]) -> Callable[[Any], float] | None:
    """The method's holdout evaluation, or None if it implements none."""
    if type(method).evaluate_holdout is FineTuningMethod.evaluate_holdout:
        return None
    return method.evaluate_holdout


def start_policy(method: FineTuningMethod[Any]) -> str:
    """The method's ``start_from``, or its default (see the module docstring)."""
    policy = getattr(method, "start_from", None)
    if policy is None:
        return "champion" if holdout_of(method) is not None else "last"
    if policy not in START_FROM:
        raise ConfigurationError(
            f"{type(method).__name__}.start_from must be one of {START_FROM} or None, "
            f"got {policy!r}"
        )
    return str(policy)


def starting_run(
    method: FineTuningMethod[Any], manager: ExperimentsManager, last_best: RunRecord
) -> RunRecord:
    """The run a new iteration of ``method`` starts from, given the last iteration's best."""
    return start_run(manager.tracker, start_policy(method), last_best)
