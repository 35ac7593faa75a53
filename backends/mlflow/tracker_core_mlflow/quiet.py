"""MLflow's expected chatter kept out of the user's output, for tracker-core's own calls only.

MLflow logs through its own ``mlflow`` logger (its own stderr handler, INFO, not propagated),
so its lines reach a newcomer's terminal whatever their logging configuration. Two of them are
noise when they come from tracker-core: the pickle WARNING of ``mlflow.pytorch.save_model``
on every save (tracker-core states the format's trade-off itself, once) and the database
migration INFO lines when a SQLite tracking database is opened.

:func:`quiet` drops the records that match a predicate, on one logger, emitted by the calling
thread while the block runs; nothing else changes. The filter is attached for the block only
(removed when no tracker-core call needs it any more), so MLflow's logging configuration,
other threads and other MLflow users in the process see every record as before.

:func:`root_logger_kept` undoes what an import does to the root logger (MLflow's pytorch
flavour calls ``logging.basicConfig(level=logging.ERROR)`` when it is imported).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

__all__ = ["Predicate", "quiet", "root_logger_kept"]

#: which records to drop
Predicate = Callable[[logging.LogRecord], bool]

_lock = threading.Lock()


class _ScopedFilter(logging.Filter):
    """Drops a record if a predicate registered by its emitting thread matches it."""

    def __init__(self) -> None:
        super().__init__("tracker_core_mlflow.quiet")
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


@contextlib.contextmanager
def root_logger_kept() -> Iterator[None]:
    """Put the root logger's level and handlers back as they were before the block, if the
    block changed them (handlers the block added are removed, removed ones restored)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        if root.level != level:
            root.setLevel(level)
        if root.handlers != handlers:
            for handler in [h for h in root.handlers if h not in handlers]:
                root.removeHandler(handler)
            for handler in [h for h in handlers if h not in root.handlers]:
                root.addHandler(handler)
