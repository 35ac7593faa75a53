"""The manager's iterations: the initial model, the iteration experiments (current, previous,
last finished), their safe deletion, and lookups for tools.

A part of :class:`~tracker_core.manager.ExperimentsManager` (see :mod:`tracker_core.facade`);
the work is done by :mod:`tracker_core.iterations` and :mod:`tracker_core.initial`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tracker_core import tags as T
from tracker_core.errors import ConfigurationError, NoActiveIterationError, TrackerError
from tracker_core.facade.state import ManagerState
from tracker_core.values import ExperimentRecord, FineTuningIteration, RunRecord, RunStatus

log = logging.getLogger(__name__)

__all__ = ["IterationsAPI"]


class IterationsAPI(ManagerState):
    """The seed's iteration methods: the initial model, the current and previous iterations,
    their deletion, lookups."""

    # ------------------------------------------------------------------ initial model
    def _get_initial_experiment(self, create: bool = False) -> ExperimentRecord | None:
        return self._initial.experiment(create)

    def get_initial_run_id(self) -> str | None:
        """The run id of the initial model's run, or None if it was never created."""
        run = self._initial.run()
        return run.run_id if run else None

    def is_initial_run(self, run_id: str) -> bool:
        """Whether ``run_id`` is the initial model's run."""
        return run_id is not None and run_id == self.get_initial_run_id()

    def has_initial_model(self) -> bool:
        """Whether the initial model was uploaded completely (marked) and its files are there."""
        return self._initial.exists()

    def get_initial_model_run_id(self) -> str | None:
        """The initial model's run id; None (and an error logged) if no initial model exists."""
        run = self._initial.marked_run()
        if run is None:
            log.error("no initial model uploaded for plugin %r", self._plugin_name)
        return run.run_id if run else None

    def upload_initial_model(self, model: Any, model_format: str | None = None) -> bool:
        """Upload the initial model once; False (nothing uploaded) if it exists. Ends any
        current iteration first; concurrent uploaders agree on one upload; missing files are
        uploaded again (see :mod:`tracker_core.initial`)."""
        with self._lock:
            self.finish_iteration()
            fmt = model_format or self.model_format
            return self._initial.upload(model, fmt, self.requirements)

    # ------------------------------------------------------------------ iterations
    def get_experiments(self) -> list[ExperimentRecord]:
        """Every iteration experiment of this plugin, newest first (the initial one excluded)."""
        return self._iterations.all()

    def get_previous_iteration_id(self) -> str | None:
        """The newest iteration created before the current one; None without a current iteration."""
        if self._experiment is None:
            log.warning("get_previous_iteration_id: no current iteration is set")
            return None
        found = self._iterations.previous(self._experiment)
        return found.experiment_id if found else None

    def get_last_iteration_id(self) -> str | None:
        """The newest iteration other than the current one."""
        found = self._iterations.latest(self._iterations.query(self._experiment))
        return found.experiment_id if found else None

    def get_last_finished_iteration_id(self) -> str | None:
        """The newest iteration, other than the current one, that has runs, all ended."""
        return self._iterations.last_finished(self._experiment)

    def get_last_model_run(self) -> RunRecord | None:
        """The run holding the model the next iteration starts from: the best model of a
        FINISHED run in the newest iteration (created before the current one, if any) that
        holds one. Iterations in which every run failed are skipped. :meth:`download_last_model`,
        :meth:`get_top_params` and :meth:`delete_previous_iteration` use this iteration."""
        found = self._iterations.newest_with_model(self._experiment)
        return found[1] if found else None

    def _set_experiment_with_name(self, experiment_name: str) -> None:
        """Make the experiment with that name (created if needed) the current iteration."""
        batch = self._iteration.batch_id if self._iteration else ""
        tags = self._iterations.tags(T.KIND_ITERATION, batch)
        self._experiment = self._iterations.get_or_create(experiment_name, tags)

    def _set_experiment_with_id(self, experiment_id: str) -> None:
        """Make the experiment with that id the current iteration."""
        experiment = self._iterations.get(experiment_id)
        if experiment is None or experiment.lifecycle_stage != "active":
            raise TrackerError(f"experiment {experiment_id} does not exist or is deleted")
        self._experiment = experiment

    def set_iteration(self, iteration: FineTuningIteration) -> None:
        """Start (or resume) the iteration; its experiment is created if it does not exist.
        A current run is ended implicitly (see :meth:`set_run`)."""
        if iteration.plugin_name != self._plugin_name:
            raise ConfigurationError(
                f"iteration is for plugin {iteration.plugin_name!r}, "
                f"this manager tracks {self._plugin_name!r}"
            )
        with self._lock:
            self.finish_iteration()
            self._iteration = iteration
            try:
                self._set_experiment_with_name(str(iteration))
            except BaseException:
                self._iteration = None
                raise
            log.info("iteration %r (%s)", str(iteration), self.current_experiment_id)

    def finish_iteration(self) -> None:
        """End the current iteration (a current run ends implicitly, see :meth:`set_run`)."""
        with self._lock:
            self._end_run_implicitly()
            self._iteration = None
            self._experiment = None

    def _require_iteration(self) -> ExperimentRecord:
        if self._experiment is None:
            raise NoActiveIterationError(
                "no current fine-tuning iteration: call set_iteration(...) first"
            )
        return self._experiment

    def delete_previous_iteration(self) -> None:
        """Delete the iteration the current one started from (see :meth:`get_last_model_run`):
        its models, then the experiment. Refused, nothing deleted, while the current iteration
        holds no model of a FINISHED run (:class:`NoModelToKeepError`) or live workers hold
        runs of the previous one (:class:`IterationInUseError`); never the initial experiment
        (see :mod:`tracker_core.iterations`). The current iteration is pruned first (see
        :meth:`~tracker_core.models.ModelKeeper.prune`)."""
        with self._lock:
            if self._experiment is None:
                log.warning("delete_previous_iteration: no current iteration is set")
                return
            # what a worker killed between ending its run and pruning left in this one
            self.models.prune(self._experiment.experiment_id, self.keep)
            self._iterations.delete_previous(self._experiment)

    def delete_iteration(self, experiment_id: str, *, defer: bool = False) -> bool:
        """Delete one iteration (never the initial or current one); True once deleted. While
        live workers hold its runs: :class:`IterationInUseError`, or with ``defer`` marked for
        :meth:`delete_pending_iterations` and False (see :mod:`tracker_core.iterations`)."""
        with self._lock:
            return self._iterations.delete_or_defer(
                experiment_id, current_id=self.current_experiment_id, defer=defer
            )

    def delete_pending_iterations(self) -> list[str]:
        """Delete the deferred iterations no live worker holds any more; their ids."""
        with self._lock:
            return self._iterations.delete_pending(current_id=self.current_experiment_id)

    def abandon_iteration(self) -> None:
        """Forget the current run and iteration *without* ending them, as after an interrupt:
        the run stays RUNNING, its lease released (resumable at once); queued metrics are
        sent if the store allows, then dropped."""
        with self._lock:
            try:
                self.flush_metrics()
            except Exception:
                log.warning("could not flush the metrics of the abandoned run", exc_info=True)
            self._runs.release()
            self._iteration = None
            self._experiment = None

    # ------------------------------------------------------------------ lookups for tools
    def get_experiment(self, experiment_id: str) -> ExperimentRecord | None:
        """The experiment with that id (active or deleted); None if there is none."""
        return self._iterations.get(experiment_id)

    def get_experiment_by_name(self, name: str) -> ExperimentRecord | None:
        """The active experiment with that name; None if there is none."""
        return self._iterations.by_name(name)

    def get_runs(
        self, experiment_id: str, *, statuses: Sequence[RunStatus] = (), marked_only: bool = False
    ) -> list[RunRecord]:
        """Active runs of an experiment, optionally only those holding a marked model."""
        tags = {T.TAG_MODEL_UPLOADED: T.TRUE} if marked_only else {}
        return self._iterations.runs(experiment_id, tuple(statuses), tags=tags)

    def has_unfinished_runs(self, experiment_id: str) -> bool:
        """Whether any run of the experiment is still RUNNING or SCHEDULED."""
        return self._iterations.has_unfinished_runs(experiment_id)

    def get_best_model_run(self, experiment_id: str) -> RunRecord | None:
        """The run holding the best model of an experiment: a model of a FINISHED run."""
        return self.models.best_run(experiment_id)
