"""The manager's runs: starting or resuming the run of a params set, ending it, its metrics
and its quality.

A part of :class:`~tracker_core.manager.ExperimentsManager` (see :mod:`tracker_core.facade`);
the work is done by :mod:`tracker_core.runs` (leases, metrics queue, how a run ends) and
:mod:`tracker_core.ranking`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import attrs

from tracker_core import tags as T
from tracker_core.errors import ConfigurationError, InvalidMetricError, TrackerError
from tracker_core.facade.state import ManagerState
from tracker_core.models import is_marked
from tracker_core.params import FineTuningParams
from tracker_core.runs import EndedRun, looked_up_again
from tracker_core.values import MetricValue, RunRecord, RunStatus

__all__ = ["ActiveRun", "RunsAPI"]

log = logging.getLogger(__name__)


@attrs.frozen
class ActiveRun:
    """What ``with manager.run(params) as run`` yields. ``finished``: the run ended in an
    earlier attempt, so the block has nothing to do (skip it with ``continue``)."""

    run_id: str
    params: FineTuningParams
    finished: bool


class RunsAPI(ManagerState):
    """The seed's run and metric methods."""

    # ------------------------------------------------------------------ runs
    def _start_run(self, params: FineTuningParams) -> tuple[RunRecord, bool]:
        """Find or create the current iteration's run for ``params`` (True if created)."""
        experiment = self._require_iteration()
        assert self._iteration is not None
        tags = {
            T.TAG_PLUGIN: self._plugin_name,
            T.TAG_PARAMS_ID: params.id,
            T.TAG_PARAMS_TYPE: f"{type(params).__module__}:{type(params).__qualname__}",
        }
        mlflow_params = {**self._iteration.to_params(), **params.to_mlflow()}
        return self._runs.get_or_create(experiment.experiment_id, params.id, tags, mlflow_params)

    def _save_params(self) -> None:
        """Log the iteration's and the current run's params again (idempotent)."""
        run, params = self._runs.require(), self._runs.params
        assert self._iteration is not None and params is not None
        values = {**self._iteration.to_params(), **params.to_mlflow()}
        self._remote.track("log_params", self.tracking.log_batch, run.run_id, (), values)

    def _set_run(self, params: FineTuningParams, wait: float = 0.0) -> bool:
        """Start or resume the run of ``params``; True if it is new or unfinished (to train).

        The run found can be deleted while this worker takes it: it was a twin (two workers
        created the run at once, see :meth:`~tracker_core.runs.RunTracker.get_or_create`).
        Then the lookup is made again."""

        def take() -> bool:
            run, created = self._start_run(params)
            return not self._runs.start(run, params, created=created, wait=wait)

        return looked_up_again(take, params.id)

    def set_run(self, params: FineTuningParams, *, wait: float = 0.0) -> bool:
        """Start the run of ``params`` in the current iteration, or resume an unfinished one.

        True if it already ended in an earlier attempt (skip it). A run held by another live
        worker is waited for up to ``wait`` seconds (``math.inf``: until it ends or its worker
        dies), then :class:`~tracker_core.errors.RunInUseError`. A current run is ended first:
        FINISHED if it logged the main metric, else left resumable (see :mod:`tracker_core.runs`).
        """
        if not isinstance(params, FineTuningParams):
            raise ConfigurationError(
                f"params must be FineTuningParams, got {type(params).__name__}"
            )
        with self._lock:
            self._require_iteration()
            self._end_run_implicitly()
            return not self._set_run(params, wait)

    @contextlib.contextmanager
    def run(self, params: FineTuningParams, *, wait: float = 0.0) -> Iterator[ActiveRun]:
        """``with manager.run(params) as run:`` - :meth:`set_run`, then the block, then the end:
        FINISHED when the block completes (the main metric must have been logged), FAILED
        when it raises an ``Exception`` (re-raised), left unfinished and resumable on an
        interrupt (``KeyboardInterrupt``, ``SystemExit``). ``run.finished`` tells that the run
        ended in an earlier attempt: ``continue`` to skip it."""
        finished = self.set_run(params, wait=wait)
        active = ActiveRun(self.current_run_id or "", params, finished)

        def still_current() -> bool:
            return self.current_run_id == active.run_id

        try:
            yield active
        except Exception:
            with self._lock:
                if still_current() and not finished:
                    try:
                        self.finish_run(as_failed=True)
                    except Exception:  # never hide the block's own error
                        log.warning("could not mark run %s FAILED", active.run_id, exc_info=True)
            raise
        except BaseException:
            with self._lock:
                if still_current():
                    self._runs.release()
            raise
        with self._lock:
            if still_current():
                self.finish_run()

    def finish_run(self, as_failed: bool = False) -> None:
        """End the current run, FINISHED or (``as_failed``) FAILED, once its queued metrics
        reached the store (not ended, the error raised, if they cannot be sent). FINISHED
        needs a value of the main metric (:class:`InvalidMetricError`) and, if a
        ``save_model`` of the run failed, a later one that succeeded
        (:class:`~tracker_core.errors.ModelNotSavedError`). A FAILED run's model is deleted
        (it is never served); a FINISHED one's is now served, and the iteration pruned."""
        with self._lock:
            if self._runs.run is None:
                log.warning("finish_run: no active run")
                return
            status = RunStatus.FAILED if as_failed else RunStatus.FINISHED
            self._settle(self._runs.finish(status))

    def _end_run_implicitly(self) -> None:
        """End the current run because the caller moved on (see :meth:`set_run`)."""
        self._settle(self._runs.end_implicitly())

    def _settle(self, ended: EndedRun | None) -> None:
        """The model of a run this worker just ended: deleted if the run FAILED (it would
        never be served); if it FINISHED, it now counts among the ``keep`` best, so the
        iteration is pruned (see :mod:`tracker_core.models`). The run has ended either way:
        a store failure here is logged, and the next save or end prunes again."""
        if ended is None or not ended.holds_model:
            return
        run = ended.run
        try:
            if ended.status != RunStatus.FINISHED:
                log.info("run %s ended %s: deleting its model", run.run_id, ended.status.value)
                self.models.delete(run)
            elif ended.ranked:
                self.models.prune(run.experiment_id, self.keep)
        except TrackerError as exc:
            log.warning("run %s ended; settling its model failed: %s", run.run_id, exc)

    def _forget_run(self) -> None:
        """Drop the current run as a dying process would (tests simulate crashes with it)."""
        with self._lock:
            self._runs.forget()

    def get_run_by_id(self, run_id: str, models_only: bool = False) -> RunRecord | None:
        """The run with that id; with ``models_only``, None unless it holds a marked model."""
        run = self._runs.get(run_id)
        if run is None or (models_only and not is_marked(run)):
            return None
        return run

    def _get_run(self, run_id: str) -> RunRecord:
        return self._runs.get_existing(run_id)

    # ------------------------------------------------------------------ metrics and quality
    def save_metric(self, metric_value: MetricValue) -> None:
        """Feed the value to the accumulators and queue what they yield (the value itself
        when none takes its name). Queued values are sent in batches, and always by
        :meth:`finish_run`, :meth:`save_model`, :meth:`get_quality` and at exit
        (see :mod:`tracker_core.metrics`)."""
        if not isinstance(metric_value, MetricValue):
            raise InvalidMetricError(f"expected a MetricValue, got {type(metric_value).__name__}")
        with self._lock:
            self._runs.add_metric(metric_value)

    def flush_metrics(self) -> None:
        """Send queued metric values now. A retried batch never logs a value twice; a batch
        that cannot be sent stays queued."""
        with self._lock:
            self._runs.flush()

    def get_quality(self) -> float:
        """The current run's main metric, final value. Raises if there is no run or no value."""
        with self._lock:
            return self._runs.quality()

    def _get_best_quality(self, experiment_id: str) -> tuple[str | None, float]:
        """Best FINISHED run of the experiment by the main metric, and its quality."""
        return self._top.best_quality(experiment_id, self.n_top_runs)

    def get_best_quality(self) -> tuple[str | None, float]:
        """Best finished run of the current iteration and its quality."""
        return self._get_best_quality(self._require_iteration().experiment_id)
