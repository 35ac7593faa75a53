"""The initial model: what the first fine-tuning iteration starts from.

It lives in its own experiment (``<plugin> / <INITIAL_EXPERIMENT_NAME>``, kind ``initial``) as
the run named :data:`~tracker_core.values.INITIAL_RUN_NAME`, written and marked like any model
(:mod:`tracker_core.models`). It is uploaded once: concurrent uploaders agree (the first to
hold the run's lease uploads, the others wait for it and upload nothing), and it is uploaded
again if its files were deleted behind tracker-core's back. Iteration cleanup never removes it
(:meth:`tracker_core.iterations.Iterations.delete` refuses its experiment).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from tracker_core import tags as T
from tracker_core.errors import ModelNotFoundError
from tracker_core.iterations import Iterations
from tracker_core.models import ModelKeeper, is_marked
from tracker_core.runs import RunTracker, looked_up_again
from tracker_core.stores import TrackingStore
from tracker_core.values import INITIAL_RUN_NAME, ExperimentRecord, RunRecord, RunStatus

__all__ = ["InitialModel"]

log = logging.getLogger(__name__)


class InitialModel:
    """The initial model of ``iterations.plugin_name``. Caches nothing of its own."""

    def __init__(
        self, tracking: TrackingStore, iterations: Iterations, runs: RunTracker, models: ModelKeeper
    ) -> None:
        self._tracking = tracking
        self._iterations = iterations
        self._runs = runs
        self._models = models

    @property
    def plugin_name(self) -> str:
        return self._iterations.plugin_name

    def experiment(self, create: bool = False) -> ExperimentRecord | None:
        """The initial model's experiment (created if ``create``); None if it does not exist."""
        return self._iterations.initial(create)

    def run(self) -> RunRecord | None:
        """The initial model's run, marked or not; None if it was never created."""
        experiment = self._iterations.initial()
        if experiment is None:
            return None
        return self._runs.first(experiment.experiment_id, run_name=INITIAL_RUN_NAME)

    def marked_run(self) -> RunRecord | None:
        """The initial model's run if it holds a completely written model (files unchecked)."""
        run = self.run()
        return run if run is not None and is_marked(run) else None

    def require(self) -> RunRecord:
        """:meth:`marked_run`, or :class:`ModelNotFoundError` naming the fix."""
        run = self.marked_run()
        if run is None:
            raise ModelNotFoundError(
                f"no initial model uploaded for plugin {self.plugin_name!r}: "
                "call upload_initial_model(model) first"
            )
        return run

    def exists(self, run: RunRecord | None = None) -> bool:
        """Whether the initial model is marked and its files are there."""
        run = run if run is not None else self.run()
        return run is not None and is_marked(run) and self._models.files_exist(run)

    def upload(self, model: Any, model_format: str, requirements: Sequence[str] | None) -> bool:
        """Upload the initial model unless it exists; True if this call uploaded it.

        The run's lease is held while writing (waiting for another uploader if need be), and
        the run is read again once held: another worker may have uploaded it meanwhile.
        """
        experiment = self._iterations.initial(create=True)
        assert experiment is not None
        tags = {T.TAG_PLUGIN: self.plugin_name}

        def take() -> RunRecord | None:
            run, created = self._runs.get_or_create(
                experiment.experiment_id, INITIAL_RUN_NAME, tags
            )
            if self.exists(run):
                log.info(
                    "initial model of %r already uploaded (run %s)", self.plugin_name, run.run_id
                )
                return None
            self._runs.start(run, None, created=created, wait=math.inf, hold_terminal=True)
            return run

        run = looked_up_again(take, "the initial model", self._runs.leases.clock)
        if run is None:
            return False
        try:
            run = self._runs.get_existing(run.run_id)
            if self.exists(run):
                return False  # another worker uploaded it while this one waited
            self._models.write_and_mark(run, model, model_format, requirements)
            self._tracking.set_terminated(run.run_id, RunStatus.FINISHED)
        finally:
            self._runs.release()
        log.info("uploaded initial model of %r (run %s)", self.plugin_name, run.run_id)
        return True
