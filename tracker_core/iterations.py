"""The iterations of one plugin: experiments found by tags, newest first, and deleted safely.

Every iteration is an MLflow experiment named after its
:class:`~tracker_core.values.FineTuningIteration` and tagged with the plugin, the kind
(``iteration``; the initial model's experiment is ``initial``) and the batch, so every lookup
is one server-side filtered query, paged, whatever the number of experiments.

Deleting an iteration deletes its models first (unmark, then files), then the experiment. It
is refused, with nothing deleted, for the initial experiment, the current iteration, and an
iteration where a live worker still holds a run (:class:`~tracker_core.errors.IterationInUseError`):
deleting it would fail that worker's next call. Such a deletion can instead be *deferred*: the
experiment is tagged ``tracker.delete_pending`` and :meth:`Iterations.delete_pending` removes it
once its runs ended or their workers died. An iteration holding the champion's or the rollback
model (a run tagged ``tracker.protected``, see :mod:`tracker_core.promotion`) is refused the
same way (:class:`~tracker_core.errors.ModelProtectedError`) and deferred: it is deleted by the
first cleanup after no alias points at its models any more.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

from tracker_core import leases
from tracker_core import tags as T
from tracker_core.errors import (
    ConfigurationError,
    IterationInUseError,
    ModelProtectedError,
    NoModelToKeepError,
    TrackerError,
)
from tracker_core.lease import Leases
from tracker_core.models import ModelKeeper
from tracker_core.retrying import Stores
from tracker_core.stores import ExperimentQuery, RunQuery
from tracker_core.values import INITIAL_EXPERIMENT_NAME, ExperimentRecord, RunRecord, RunStatus

__all__ = ["TAG_DELETE_PENDING", "Iterations"]

log = logging.getLogger(__name__)

TAG_DELETE_PENDING = "tracker.delete_pending"
_UNFINISHED = (RunStatus.RUNNING, RunStatus.SCHEDULED)


class Iterations:
    """Iteration experiments of ``plugin_name``. Caches only the initial experiment's record."""

    def __init__(
        self,
        plugin_name: str,
        stores: Stores,
        models: ModelKeeper,
        leases: Leases,
    ) -> None:
        self.plugin_name = plugin_name
        self._tracking, self._artifacts = stores.tracking, stores.artifacts
        self._models = models
        self._leases = leases
        #: the plugin's experiments that are not iterations, by name (see plugin_experiment)
        self._named: dict[str, ExperimentRecord | None] = {}

    # ------------------------------------------------------------------ naming and creation
    def tags(self, kind: str, batch_id: str = "") -> dict[str, str]:
        out = {T.TAG_PLUGIN: self.plugin_name, T.TAG_KIND: kind}
        if batch_id:
            out[T.TAG_BATCH] = batch_id
        return out

    def get_or_create(self, name: str, tags: Mapping[str, str]) -> ExperimentRecord:
        existing = self.by_name(name)
        if existing is not None:
            return existing
        location = self._artifacts.experiment_location(name, uuid.uuid4().hex[:12])
        created = self._tracking.create_experiment(name, location, tags)
        log.info("created experiment %r (%s) at %s", name, created.experiment_id, location)
        return created

    @property
    def initial_name(self) -> str:
        return f"{self.plugin_name} / {INITIAL_EXPERIMENT_NAME}"

    def plugin_experiment(
        self, suffix: str, kind: str, create: bool = False
    ) -> ExperimentRecord | None:
        """The plugin's experiment ``"<plugin> / <suffix>"`` of ``kind`` that is not an iteration
        (the initial model's, the lineage's): remembered while active, created if ``create``;
        None if it does not exist."""
        name = f"{self.plugin_name} / {suffix}"
        known = self._named.get(name)
        if known is None or known.lifecycle_stage != "active":
            known = self.get_or_create(name, self.tags(kind)) if create else self.by_name(name)
            self._named[name] = known
        return known

    def initial(self, create: bool = False) -> ExperimentRecord | None:
        """The initial model's experiment (created if ``create``); None if it does not exist."""
        return self.plugin_experiment(INITIAL_EXPERIMENT_NAME, T.KIND_INITIAL, create)

    def forget_initial(self) -> None:
        self._named.pop(self.initial_name, None)

    def is_initial(self, experiment_id: str) -> bool:
        initial = self.initial()
        return initial is not None and initial.experiment_id == experiment_id

    # ------------------------------------------------------------------ lookups
    def get(self, experiment_id: str) -> ExperimentRecord | None:
        return self._tracking.get_experiment(experiment_id)

    def by_name(self, name: str) -> ExperimentRecord | None:
        return self._tracking.get_experiment_by_name(name)

    def query(self, exclude: ExperimentRecord | None = None, **extra: Any) -> ExperimentQuery:
        names = (exclude.name,) if exclude is not None else ()
        return ExperimentQuery(tags=self.tags(T.KIND_ITERATION), exclude_names=names, **extra)

    def all(self) -> list[ExperimentRecord]:
        """Every iteration of the plugin, newest first (the initial experiment excluded)."""
        return list(self._tracking.iter_experiments(self.query()))

    def latest(self, query: ExperimentQuery) -> ExperimentRecord | None:
        page, _ = self._tracking.search_experiments(query, 1)
        return page[0] if page else None

    def previous(self, current: ExperimentRecord) -> ExperimentRecord | None:
        """The newest iteration created before ``current``."""
        return self.latest(self.query(current, created_before_ms=current.creation_time_ms + 1))

    def last_finished(self, exclude: ExperimentRecord | None) -> str | None:
        """The newest iteration other than ``exclude`` that has runs, all ended. One cheap
        query per iteration checked, newest first."""
        tracking = self._tracking
        for experiment in tracking.iter_experiments(self.query(exclude), page_size=5):
            eid = experiment.experiment_id
            if tracking.has_runs(eid, ()) and not tracking.has_runs(eid, _UNFINISHED):
                return eid
        return None

    def newest_with_model(
        self, before: ExperimentRecord | None
    ) -> tuple[ExperimentRecord, RunRecord] | None:
        """The newest iteration created before ``before`` (of all, when None) that holds a
        servable model (a model of a FINISHED run), with its best run: what the next
        iteration starts from, and what "the previous iteration" means for the last model,
        the top params and cleanup. Iterations in which every run failed, or that are still
        running with no run finished, are skipped. One query per iteration looked at."""
        if before is None:
            query = self.query()
        else:
            query = self.query(before, created_before_ms=before.creation_time_ms + 1)
        for experiment in self._tracking.iter_experiments(query, page_size=5):
            best = self._models.best_run(experiment.experiment_id)
            if best is not None:
                return experiment, best
            log.debug("iteration %r holds no model of a FINISHED run", experiment.name)
        return None

    def runs(
        self, experiment_id: str, statuses: tuple[RunStatus, ...] = (), **query: Any
    ) -> list[RunRecord]:
        run_query = RunQuery((experiment_id,), statuses=statuses, **query)
        return self._tracking.search_runs(run_query)

    def has_unfinished_runs(self, experiment_id: str) -> bool:
        """Whether any run of the experiment is still RUNNING or SCHEDULED (one query)."""
        return self._tracking.has_runs(experiment_id, _UNFINISHED)

    def live_runs(self, experiment_id: str) -> list[RunRecord]:
        """Unfinished runs that a live worker holds (see :mod:`tracker_core.leases`)."""
        return [r for r in self.runs(experiment_id, _UNFINISHED) if self._leases.is_live(r)]

    # ------------------------------------------------------------------ deletion
    def delete(self, experiment_id: str, *, current_id: str | None) -> None:
        """Delete the iteration's models, then the experiment (and, on a store with real
        folders, the experiment's folder once it is empty).

        Raises :class:`ConfigurationError` for the initial experiment or the current iteration,
        :class:`IterationInUseError` while a live worker holds one of its runs,
        :class:`ModelProtectedError` while it holds the champion's or the rollback model.
        """
        if self.is_initial(experiment_id):
            raise ConfigurationError("the initial experiment is never deleted by iteration cleanup")
        if experiment_id == current_id:
            raise ConfigurationError("refusing to delete the current iteration")
        protected = self.runs(experiment_id, tags={T.TAG_PROTECTED: T.TRUE})
        if protected:
            raise ModelProtectedError(
                f"iteration {experiment_id} holds the registered champion or rollback model "
                f"(run {protected[0].run_id}); it is kept while an alias points at it"
            )
        live = self.live_runs(experiment_id)
        if live:
            holders = ", ".join(
                f"{r.run_id} ({leases.lease_state(r, self._leases.ttl_ms).owner or 'starting'})"
                for r in live
            )
            raise IterationInUseError(
                f"iteration {experiment_id} still has {len(live)} run(s) held by live workers "
                f"({holders}); nothing was deleted. Delete it once they end (or their workers "
                "die and their leases expire), or defer it: delete_iteration(..., defer=True)"
            )
        try:
            # marked first: a deletion cut short (a killed worker) after the last model went
            # leaves an iteration that no longer holds a model, which "the previous iteration"
            # never names again; the mark has the next cleanup (delete_pending) finish it
            self.mark_pending(experiment_id)
            for run in self._models.marked_runs(experiment_id):
                self._models.delete(run)
            self._tracking.delete_experiment(experiment_id)
        except TrackerError:
            # several workers finishing an iteration each delete the previous one: if another
            # deleted it meanwhile (its runs went with it, so unmarking one failed), it is done
            found = self.get(experiment_id)
            if found is not None and found.lifecycle_stage == "active":
                raise
            log.info("iteration %s was deleted meanwhile by another worker", experiment_id)
            return
        log.info("deleted iteration %s", experiment_id)
        self._remove_folder(experiment_id)

    def _remove_folder(self, experiment_id: str) -> None:
        """The deleted experiment's folder, once empty (stores with real folders only)."""
        if not self._artifacts.has_directories:
            return
        found = self.get(experiment_id)
        if found is not None:
            self._models.remove_empty_folders(found.artifact_location)

    def delete_previous(self, current: ExperimentRecord) -> None:
        """Delete the iteration ``current`` started from: the newest one before it that holds
        a servable model (:meth:`newest_with_model`), if any (see :meth:`delete`).

        Raises :class:`NoModelToKeepError`, nothing deleted, while ``current`` holds no model
        of a FINISHED run: the previous iteration holds the only fine-tuned model. An iteration
        that holds the champion's or the rollback model is deferred instead; deferred
        iterations that may go now are deleted first.
        """
        self.delete_pending(current_id=current.experiment_id)
        found = self.newest_with_model(current)
        if found is None:
            log.info("delete_previous_iteration: no previous iteration holds a model")
            return
        previous, _ = found
        if self._models.best_run(current.experiment_id) is None:
            raise NoModelToKeepError(
                f"the current iteration {current.name!r} holds no model of a FINISHED run: "
                f"deleting the previous iteration ({previous.experiment_id}) would lose the "
                "only fine-tuned model; nothing was deleted"
            )
        try:
            self.delete(previous.experiment_id, current_id=current.experiment_id)
        except ModelProtectedError as exc:
            self.mark_pending(previous.experiment_id)
            log.info("deletion of iteration %s deferred: %s", previous.experiment_id, exc)

    def delete_or_defer(self, experiment_id: str, *, current_id: str | None, defer: bool) -> bool:
        """:meth:`delete`; True once deleted. While live workers hold its runs, or it holds the
        champion's or the rollback model, with ``defer`` the iteration is marked for
        :meth:`delete_pending` instead (False)."""
        try:
            self.delete(experiment_id, current_id=current_id)
        except (IterationInUseError, ModelProtectedError) as exc:
            if not defer:
                raise
            self.mark_pending(experiment_id)
            log.log(
                logging.INFO if isinstance(exc, ModelProtectedError) else logging.WARNING,
                "deletion of iteration %s deferred: %s",
                *(experiment_id, exc),
            )
            return False
        return True

    def delete_pending(self, *, current_id: str | None) -> list[str]:
        """Delete the deferred iterations no live worker holds any more; their ids."""
        return [
            experiment.experiment_id
            for experiment in self.pending()
            if experiment.experiment_id != current_id
            and self.delete_or_defer(experiment.experiment_id, current_id=current_id, defer=True)
        ]

    def mark_pending(self, experiment_id: str) -> None:
        """Tag the iteration for :meth:`delete_pending`."""
        self._tracking.set_experiment_tag(experiment_id, TAG_DELETE_PENDING, T.TRUE)

    def pending(self) -> list[ExperimentRecord]:
        """Iterations whose deletion was deferred, newest first."""
        query = ExperimentQuery(tags={**self.tags(T.KIND_ITERATION), TAG_DELETE_PENDING: T.TRUE})
        return list(self._tracking.iter_experiments(query))
