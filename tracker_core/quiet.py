"""Expected chatter of the libraries tracker-core drives kept out of the user's output, for
tracker-core's own calls only.

:func:`quiet` drops the records that match a predicate, on one logger, emitted by the calling
thread while the block runs; nothing else changes. The filter is attached for the block only
(removed when no tracker-core call needs it any more), so the library's logging configuration,
other threads and other users of the library in the process see every record as before.
MLflow's backend uses it for MLflow's lines, the search for Optuna's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

__all__ = ["Predicate", "quiet"]

#: which records to drop
Predicate = Callable[[logging.LogRecord], bool]

_lock = threading.Lock()


class _ScopedFilter(logging.Filter):
    """Drops a record if a predicate registered by its emitting thread matches it."""

    def __init__(self) -> None:
        super().__init__("tracker_core.quiet")
        self.active: dict[int, list[Predicate]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        predicates = self.active.get(record.thread or 0)
        return not (predicates and any(p(record) for p in predicates))


_filters: dict[str, _ScopedFilter] = {}


@contextlib.contextmanager
def quiet(logger_name: str, predicate: Predicate) -> Iterator[None]:
    """Drop the records of ``logger_name`` that match ``predicate`` and that the current
    thread emits inside the block (records logged to that very logger, not its children)."""
    logger = logging.getLogger(logger_name)
    ident = threading.get_ident()
    with _lock:
        scoped = _filters.setdefault(logger_name, _ScopedFilter())
        if scoped not in logger.filters:
            logger.addFilter(scoped)
        scoped.active.setdefault(ident, []).append(predicate)
    try:
        yield
    finally:
        with _lock:
            predicates = scoped.active[ident]
            predicates.remove(predicate)
            if not predicates:
                del scoped.active[ident]
            if not scoped.active:
                logger.removeFilter(scoped)
