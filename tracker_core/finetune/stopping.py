"""Stopping an iteration on request: :class:`IterationStopped`, :func:`check_stop` and
:func:`stop_requested`.

The steps make the ``should_stop`` check a supervisor gave them current for this context
(``_stop_scope``), so that a method can stop from inside ``train`` at its own safe points by
calling :func:`check_stop` (or testing :func:`stop_requested`), without being passed the
check. What the driver does when asked to stop is in :mod:`.driver`.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["IterationStopped", "check_stop", "stop_requested"]


class IterationStopped(BaseException):
    """The iteration was asked to stop (see :func:`check_stop`).

    A ``BaseException``, like ``KeyboardInterrupt``: it is not a failure of the run, so the
    driver leaves the run unfinished instead of marking it FAILED, and the next call of
    :func:`run_iteration` for the same batch resumes it.
    """


#: the stop check of the iteration running in this context (set by run_iteration)
_stop_check: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "tracker_core_stop_check", default=None
)


def stop_requested() -> bool:
    """Whether the iteration running in this thread was asked to stop.

    False outside :func:`run_iteration`, or when it was given no ``should_stop``. Threads a
    method starts do not inherit the check unless started with ``contextvars.copy_context``.
    """
    check = _stop_check.get()
    return bool(check is not None and check())


def check_stop() -> None:
    """Raise :class:`IterationStopped` if the iteration was asked to stop; else return.

    Call it from ``train`` at points where stopping is safe (between epochs, every N
    steps): a canceled task then stops within one step instead of at the end of the run.
    """
    if stop_requested():
        raise IterationStopped("the iteration was asked to stop")


@contextmanager
def _stop_scope(should_stop: Callable[[], bool] | None) -> Iterator[None]:
    token = _stop_check.set(should_stop)
    try:
        yield
    finally:
        _stop_check.reset(token)
