"""The manager's core: one object composed of its :class:`~tracker_core.retrying.Stores` and
its services, and the flows that span them.

Services (each receives what it needs and never calls back up):

- :class:`~tracker_core.lease.Leases`: who holds which run, on the manager's clock;
- :class:`~tracker_core.models.ModelKeeper`: write, mark, rank, prune, serve models;
- :class:`~tracker_core.runs.RunTracker`: the current run, its metrics, how it ends;
- :class:`~tracker_core.iterations.Iterations`: iteration experiments and their deletion;
- :class:`~tracker_core.initial.InitialModel`: the initial model, uploaded once;
- :class:`~tracker_core.reconcile.Reconciler`: what crashes leave (gc, verify);
- :class:`~tracker_core.ranking.TopRuns`: best quality and top params;
- :class:`~tracker_core.lineage.Lineage`: the permanent record of each iteration;
- :class:`~tracker_core.promotion.Promoter`: the champion in the model registry.

:class:`Tracker` adds the *session* (the current iteration; the current run is the run
service's) and the flows that combine services under one lock: entering an iteration, taking
and ending a run (a FAILED run's model deleted, a FINISHED one's iteration pruned), saving a
model, cleaning up. The seed's names for all of this are
:class:`~tracker_core.manager.ExperimentsManager`, an adapter over a :class:`Tracker`.

Thread-safety: the session is guarded by :attr:`Tracker.lock`; sharing one manager between
threads is safe but runs their work one after another. Managers share no state.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs

from tracker_core.accumulators import MetricsAccumulator
from tracker_core.champion_versions import ChampionVersions
from tracker_core.clock import SYSTEM_CLOCK, Clock
from tracker_core.codecs import ModelFactory
from tracker_core.errors import (
    ConfigurationError,
    LeaseLostError,
    NoActiveIterationError,
    TrackerError,
)
from tracker_core.initial import InitialModel
from tracker_core.iterations import Iterations
from tracker_core.lease import Leases
from tracker_core.lineage import Lineage
from tracker_core.models import ModelKeeper
from tracker_core.params import FineTuningParams
from tracker_core.promotion import Promoter, PromotionConfig
from tracker_core.ranking import Ranking, TopRuns
from tracker_core.reconcile import Reconciler
from tracker_core.retry import Retrier, RetryConfig
from tracker_core.retrying import Stores
from tracker_core.runs import EndedRun, RunTracker, looked_up_again
from tracker_core.tags import KIND_ITERATION, TAG_PARAMS_ID, TAG_PARAMS_TYPE, TAG_PLUGIN
from tracker_core.values import (
    ExperimentRecord,
    FineTuningIteration,
    RunRecord,
    RunStatus,
)

__all__ = ["ActiveRun", "Settings", "Tracker"]

log = logging.getLogger(__name__)


@attrs.frozen
class Settings:
    """What a manager was configured with (checked by the manager before it gets here)."""

    main_metric: str
    plugin_name: str
    is_loss: bool
    n_top_runs: int
    keep: int
    model_format: str
    model_factory: ModelFactory | None
    params_type: type[FineTuningParams] | None
    requirements: tuple[str, ...] | None
    lease_seconds: float
    retry: RetryConfig
    #: the tracking store's URI, as given (shown in logs redacted)
    tracking_uri: str | None
    promotion: PromotionConfig = attrs.field(factory=PromotionConfig)


@attrs.frozen
class ActiveRun:
    """What ``with manager.run(params) as run`` yields. ``finished``: the run ended in an
    earlier attempt, so the block has nothing to do (skip it with ``continue``)."""

    run_id: str
    params: FineTuningParams
    finished: bool


class Tracker:
    """A manager's stores, services and session (see the module docstring)."""

    def __init__(
        self,
        stores: Stores,
        settings: Settings,
        *,
        accumulators: Iterable[MetricsAccumulator] = (),
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.stores, self.settings = stores, settings
        self.ranking = Ranking(settings.main_metric, settings.is_loss)
        self.leases = Leases(stores.tracking, lease_seconds=settings.lease_seconds, clock=clock)
        self.models = ModelKeeper(stores, self.ranking)
        self.runs = RunTracker(stores.tracking, self.leases, settings.main_metric, accumulators)
        self.iterations = Iterations(settings.plugin_name, stores, self.models, self.leases)
        self.initial = InitialModel(stores.tracking, self.iterations, self.runs, self.models)
        self.reconcile = Reconciler(stores, self.models, clock)
        self.top = TopRuns(stores.tracking, self.ranking)
        self.lineage = Lineage(stores.tracking, self.iterations, self.runs)
        versions = ChampionVersions(
            stores.tracking,
            stores.registry,
            self.models,
            self.iterations,
            settings.promotion,
            clock,
            Retrier(settings.retry),
        )
        self.promoter = Promoter(
            stores.tracking,
            versions,
            self.iterations,
            self.runs,
            self.leases,
            self.lineage,
            self.ranking,
        )
        self.lock = threading.RLock()
        self.iteration: FineTuningIteration | None = None
        self.experiment: ExperimentRecord | None = None

    # ------------------------------------------------------------------ iterations
    def require_iteration(self) -> ExperimentRecord:
        if self.experiment is None:
            raise NoActiveIterationError(
                "no current fine-tuning iteration: call set_iteration(...) first"
            )
        return self.experiment

    def enter(self, iteration: FineTuningIteration) -> None:
        """Make ``iteration`` current (its experiment created if needed); a current run ends
        implicitly first."""
        if iteration.plugin_name != self.settings.plugin_name:
            raise ConfigurationError(
                f"iteration is for plugin {iteration.plugin_name!r}, "
                f"this manager tracks {self.settings.plugin_name!r}"
            )
        with self.lock:
            self.leave()
            tags = self.iterations.tags(KIND_ITERATION, iteration.batch_id)
            self.experiment = self.iterations.get_or_create(str(iteration), tags)
            self.iteration = iteration
            log.info("iteration %r (%s)", str(iteration), self.experiment.experiment_id)

    def enter_experiment(self, experiment: ExperimentRecord) -> None:
        """Make an existing, active experiment the current iteration."""
        if experiment.lifecycle_stage != "active":
            raise TrackerError(f"experiment {experiment.experiment_id} is deleted")
        with self.lock:
            self.experiment = experiment

    def leave(self) -> None:
        """End the current iteration (a current run ends implicitly)."""
        with self.lock:
            self.end_run_implicitly()
            self.iteration = None
            self.experiment = None

    def abandon(self) -> None:
        """Forget the current run and iteration *without* ending them, as after an interrupt:
        the run stays RUNNING, its lease released; queued metrics are sent if the store
        allows, then dropped."""
        with self.lock:
            try:
                self.runs.flush()
            except Exception:
                log.warning("could not flush the metrics of the abandoned run", exc_info=True)
            self.runs.release()
            self.iteration = None
            self.experiment = None

    def last_model(self) -> tuple[ExperimentRecord, RunRecord] | None:
        """The newest iteration (before the current one) holding a model of a FINISHED run,
        with that run: what the next iteration starts from."""
        return self.iterations.newest_with_model(self.experiment)

    # ------------------------------------------------------------------ runs
    def find_or_create_run(self, params: FineTuningParams) -> tuple[RunRecord, bool]:
        """The current iteration's run of ``params``, created if missing (True if created)."""
        experiment = self.require_iteration()
        assert self.iteration is not None
        tags = {
            TAG_PLUGIN: self.settings.plugin_name,
            TAG_PARAMS_ID: params.id,
            TAG_PARAMS_TYPE: f"{type(params).__module__}:{type(params).__qualname__}",
        }
        values = {**self.iteration.to_params(), **params.to_mlflow()}
        return self.runs.get_or_create(experiment.experiment_id, params.id, tags, values)

    def take_run(self, params: FineTuningParams, wait: float = 0.0) -> bool:
        """Start or resume the run of ``params`` in the current iteration (a current run
        ends implicitly first); True if it already ended in an earlier attempt. A run found
        can be deleted while it is taken (a twin): then it is looked up again."""
        if not isinstance(params, FineTuningParams):
            raise ConfigurationError(
                f"params must be FineTuningParams, got {type(params).__name__}"
            )
        with self.lock:
            self.require_iteration()
            self.end_run_implicitly()

            def take() -> bool:
                run, created = self.find_or_create_run(params)
                return self.runs.start(run, params, created=created, wait=wait)

            return looked_up_again(take, params.id, self.leases.clock)

    def end_run(self, status: RunStatus) -> None:
        """End the current run with ``status`` and settle its model."""
        with self.lock:
            if self.runs.run is None:
                log.warning("finish_run: no active run")
                return
            self._settle(self.runs.finish(status))

    def end_run_implicitly(self) -> None:
        """End the current run because the caller moved on (see the run service)."""
        with self.lock:
            self._settle(self.runs.end_implicitly())

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
                self.models.prune(run.experiment_id, self.settings.keep)
        except TrackerError as exc:
            log.warning("run %s ended; settling its model failed: %s", run.run_id, exc)

    @contextlib.contextmanager
    def run(self, params: FineTuningParams, *, wait: float = 0.0) -> Iterator[ActiveRun]:
        """``with manager.run(params) as run:`` - take the run, then the block, then the end:
        FINISHED when the block completes, FAILED when it raises an ``Exception``
        (re-raised), left unfinished and resumable on an interrupt."""
        finished = self.take_run(params, wait)
        active = ActiveRun(self.runs.run.run_id if self.runs.run else "", params, finished)

        def still_current() -> bool:
            return self.runs.run is not None and self.runs.run.run_id == active.run_id

        try:
            yield active
        except Exception:
            with self.lock:
                if still_current() and not finished:
                    try:
                        self.end_run(RunStatus.FAILED)
                    except Exception:  # never hide the block's own error
                        log.warning("could not mark run %s FAILED", active.run_id, exc_info=True)
            raise
        except BaseException:
            with self.lock:
                if still_current():
                    self.runs.release()
            raise
        with self.lock:
            if still_current():
                self.end_run(RunStatus.FINISHED)

    # ------------------------------------------------------------------ models
    def write_model(self, model: Any) -> str:
        """Upload the current run's model and mark it (nothing ranked); returns its URI."""
        run = self.runs.require()
        self.runs.flush()
        return self.models.write_and_mark(
            run,
            model,
            self.settings.model_format,
            self.settings.requirements,
            before_mark=self.runs.require,
        )

    def save_model(self, model: Any, best_only: bool = True) -> bool:
        """Save the current run's model; True if written (see the manager's ``save_model``)."""
        with self.lock:
            experiment = self.require_iteration()
            run = self.runs.require()
            try:
                if best_only:
                    self.runs.flush()
                    fresh = self.runs.get_existing(run.run_id)
                    self.runs.check_lease(fresh)
                    if not self.models.among_best(fresh, self.settings.keep):
                        return False
                self.write_model(model)
            except LeaseLostError:
                raise
            except Exception as exc:
                self.runs.model_not_saved(exc)
                raise
            self.runs.model_saved(ranked=best_only)
            if best_only:
                try:
                    self.models.prune(experiment.experiment_id, self.settings.keep)
                except TrackerError as exc:  # the model is saved; the run's end prunes again
                    log.warning("could not prune iteration %s: %s", experiment.name, exc)
            return True

    def load(self, run: RunRecord) -> Any:
        return self.models.load(run, self.settings.model_format, self.settings.model_factory)

    def load_best(self, pick: Callable[[], RunRecord | None]) -> Any:
        """The model of the run ``pick()`` returns, else the initial model; picked again if
        it is deleted while read."""
        return self.models.load_best(
            pick, self.initial.require, self.settings.model_format, self.settings.model_factory
        )

    def upload_initial_model(self, model: Any, model_format: str | None = None) -> bool:
        """Upload the initial model once (ends any current iteration first)."""
        with self.lock:
            self.leave()
            fmt = model_format or self.settings.model_format
            return self.initial.upload(model, fmt, self.settings.requirements)

    def delete_model(self, run: RunRecord) -> bool:
        """Delete a run's model (unmark, then files); never the initial model's."""
        with self.lock:
            if self.iterations.is_initial(run.experiment_id):
                raise ConfigurationError("deleting the initial model is not allowed")
            return self.models.delete(run)

    # ------------------------------------------------------------------ cleanup
    def delete_previous(self) -> None:
        """Prune the current iteration, then delete the iteration it started from (see
        :meth:`~tracker_core.iterations.Iterations.delete_previous`)."""
        with self.lock:
            if self.experiment is None:
                log.warning("delete_previous_iteration: no current iteration is set")
                return
            # what a worker killed between ending its run and pruning left in this one
            self.models.prune(self.experiment.experiment_id, self.settings.keep)
            self.iterations.delete_previous(self.experiment)

    def delete_iteration(self, experiment_id: str, *, defer: bool = False) -> bool:
        with self.lock:
            current = self.experiment.experiment_id if self.experiment else None
            return self.iterations.delete_or_defer(experiment_id, current_id=current, defer=defer)

    def delete_pending(self) -> list[str]:
        with self.lock:
            current = self.experiment.experiment_id if self.experiment else None
            return self.iterations.delete_pending(current_id=current)

    # ------------------------------------------------------------------ life
    def top_params(
        self, experiment_id: str, params_type: type[FineTuningParams] | None
    ) -> list[FineTuningParams] | None:
        """The typed params of the best ``n_top_runs`` FINISHED runs; None for the initial
        experiment or if there are none."""
        if self.iterations.is_initial(experiment_id):
            return None
        current = type(self.runs.params) if self.runs.params is not None else None
        preferred = (params_type, self.settings.params_type, current)
        return self.top.params(experiment_id, self.settings.n_top_runs, *preferred)

    def close(self) -> None:
        """End the current run implicitly, flush, release the stores."""
        try:
            with self.lock:
                self.end_run_implicitly()
        finally:
            self.runs.close()
            self.stores.close()

    def at_exit(self) -> None:
        """Interpreter exit: queued metrics sent and a held run let go, each call tried once;
        a store that is gone costs one line (WARNING if metric values were lost, else DEBUG)."""
        self.stores.single_attempt()
        run_id, queued = (self.runs.run.run_id if self.runs.run else None), len(self.runs.metrics)
        try:
            self.runs.flush()
        except Exception as exc:
            log.warning(
                "%d metric value(s) of run %s could not be sent at exit: %s",
                *(queued, run_id, _one_line(exc)),
            )
        try:
            self.runs.release(at_exit=True)
        except Exception as exc:
            log.debug("could not let go of run %s at exit: %s", run_id, _one_line(exc))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
