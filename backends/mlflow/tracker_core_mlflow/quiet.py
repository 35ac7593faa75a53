"""MLflow's expected chatter kept out of the user's output, for tracker-core's own calls only.

MLflow logs through its own ``mlflow`` logger (its own stderr handler, INFO, not propagated),
so its lines reach a newcomer's terminal whatever their logging configuration. Two of them are
noise when they come from tracker-core: the pickle WARNING of ``mlflow.pytorch.save_model``
on every save (tracker-core states the format's trade-off itself, once) and the database
migration INFO lines when a SQLite tracking database is opened.

:func:`quiet` (from :mod:`tracker_core.quiet`) drops the records that match a predicate, on
one logger, emitted by the calling thread while the block runs; nothing else changes.

:func:`root_logger_kept` undoes what an import does to the root logger (MLflow's pytorch
flavour calls ``logging.basicConfig(level=logging.ERROR)`` when it is imported).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from tracker_core.quiet import Predicate, quiet

__all__ = ["Predicate", "quiet", "root_logger_kept"]


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
