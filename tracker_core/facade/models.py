"""The manager's models: saving with best-only retention, deleting, the best runs and their
URLs, downloads, and the top params of an iteration.

A part of :class:`~tracker_core.manager.ExperimentsManager` (see :mod:`tracker_core.facade`);
the work is done by :mod:`tracker_core.models` (write, mark, prune, serve) and
:mod:`tracker_core.ranking`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tracker_core.errors import (
    ConfigurationError,
    LeaseLostError,
    ModelFilesMissingError,
    ModelNotFoundError,
    TrackerError,
)
from tracker_core.facade.state import ManagerState
from tracker_core.models import is_marked
from tracker_core.params import FineTuningParams
from tracker_core.values import RunRecord

log = logging.getLogger(__name__)

P = TypeVar("P", bound=FineTuningParams)

__all__ = ["ModelsAPI"]


class ModelsAPI(ManagerState):
    """The seed's model methods: save, delete, best runs and URLs, downloads, top params."""

    # ------------------------------------------------------------------ saving and deleting models
    def _marked_runs(self, experiment_id: str) -> list[RunRecord]:
        """Runs of the experiment holding a completely written model, best first."""
        return self.models.marked_runs(experiment_id)

    def _model_uri(self, run: RunRecord) -> str:
        return self.models.uri_of(run)

    def _save_model(self, model: Any) -> str:
        """Upload the current run's model and mark it; returns its URI."""
        run = self._runs.require()
        self.flush_metrics()
        return self.models.write_and_mark(
            run, model, self.model_format, self.requirements, before_mark=self._runs.require
        )

    def save_model(self, model: Any, best_only: bool = True) -> bool:
        """Save the current run's model; True if it was written. With ``best_only``, only
        if fewer than ``keep`` models of FINISHED runs of the iteration are better, and the
        models that will never be served are pruned after (see :mod:`tracker_core.models`).
        The model is served once the run ends FINISHED; if it ends FAILED, the model is
        deleted. If the save fails, the run cannot end FINISHED until a save succeeds
        (:class:`~tracker_core.errors.ModelNotSavedError`). Raises
        :class:`~tracker_core.errors.LeaseLostError` if another worker took the run over."""
        with self._lock:
            experiment = self._require_iteration()
            run = self._runs.require()
            try:
                if best_only:
                    self.flush_metrics()
                    fresh = self._get_run(run.run_id)
                    self._runs.check_lease(fresh)
                    if not self.models.among_best(fresh, self.keep):
                        return False
                self._save_model(model)
            except LeaseLostError:
                raise
            except Exception as exc:
                self._runs.model_not_saved(exc)
                raise
            self._runs.model_saved(ranked=best_only)
            if best_only:
                try:
                    self.models.prune(experiment.experiment_id, self.keep)
                except TrackerError as exc:  # the model is saved; the run's end prunes again
                    log.warning("could not prune iteration %s: %s", experiment.name, exc)
            return True

    def _set_model_as_deleted(self, run_id: str, experiment_id: str | None = None) -> None:
        """Unmark the run's model (tags) and log the seed's marker metrics."""
        self.models.unmark(run_id)

    def _delete_model(self, run_id: str, experiment_id: str) -> bool:
        """Delete the files of the run's model; True when none are left (the seed's name)."""
        return self.models.delete_files(self._get_run(run_id))

    def delete_model(self, run_id: str, experiment_id: str | None = None) -> bool:
        """Delete the model of a run (of the current iteration unless ``experiment_id``);
        never the initial model. False, with a warning, when the run holds no model."""
        with self._lock:
            experiment_id = experiment_id or self._require_iteration().experiment_id
            if self._iterations.is_initial(experiment_id):
                raise ConfigurationError("deleting the initial model is not allowed")
            run = self.get_run_by_id(run_id)
            if run is None or run.experiment_id != experiment_id or not is_marked(run):
                log.warning("run %s of experiment %s holds no model", run_id, experiment_id)
                return False
            return self.models.delete(run)

    def model_is_uploaded(self) -> bool:
        """Whether the current run holds a marked model."""
        return is_marked(self._get_run(self._runs.require().run_id))

    # ------------------------------------------------------------------ best runs and URLs
    def _get_best_previous_run_id(self) -> tuple[str | None, bool]:
        """The run holding the model the next iteration starts from (see
        :meth:`get_last_model_run`); ``(None, True)`` when no earlier iteration holds one."""
        run = self.get_last_model_run()
        return (run.run_id, False) if run else (None, True)

    def get_best_current_run_id(self) -> tuple[str | None, bool]:
        """Best model run of the current iteration; ``(None, True)`` without a current iteration."""
        if self._experiment is None:
            return None, True
        best = self.models.best_run(self._experiment.experiment_id)
        return (best.run_id if best else None), False

    def get_last_model_url(self) -> str | None:
        """Storage URL of the model the next iteration starts from (see
        :meth:`get_last_model_run`); None if there is none."""
        run = self.get_last_model_run()
        return self.models.uri_of(run) if run else None

    def get_current_model_url(self) -> str | None:
        """Storage URL of the current iteration's best model; None if there is none."""
        run = self.models.best_run(self._experiment.experiment_id) if self._experiment else None
        if run is None:
            log.info("no model in the current iteration")
        return self.models.uri_of(run) if run else None

    # ------------------------------------------------------------------ downloads
    def _marked_run(self, run_id: str) -> RunRecord:
        run = self.get_run_by_id(run_id, models_only=True)
        if run is None:
            raise ModelNotFoundError(f"run {run_id} holds no model")
        return run

    def _load(self, run: RunRecord) -> Any:
        return self.models.load(run, self.model_format, self.model_factory)

    def download_model_files(
        self, run_id: str, destination: Path, progress: bool | None = None
    ) -> Path:
        """Copy the run's marked model files into ``destination``; returns the model folder."""
        return self.models.download_files(self._marked_run(run_id), Path(destination), progress)

    def download_model_by_run_id(self, run_id: str) -> Any | None:
        """The run's model; None if the run holds none (logged at INFO; its files missing
        raise :class:`ModelFilesMissingError`). Store failures raise."""
        try:
            return self._load(self._marked_run(run_id))
        except ModelFilesMissingError:
            raise
        except ModelNotFoundError as exc:
            log.info("no model to download: %s", exc)
            return None

    def download_initial_model(self) -> Any:
        """The initial model. Raises :class:`ModelNotFoundError` if it was never uploaded."""
        return self._load(self._initial.require())

    def download_model(self, experiment_name: str, run_name: str) -> Any | None:
        """The model of the run named ``run_name`` in the experiment ``experiment_name``."""
        experiment = self._iterations.by_name(experiment_name)
        if experiment is None:
            log.warning("no experiment named %r", experiment_name)
            return None
        run = self._runs.first(experiment.experiment_id, run_name=run_name)
        if run is None:
            log.warning("no run named %r in %r", run_name, experiment_name)
            return None
        return self.download_model_by_run_id(run.run_id)

    def _download_best(self, pick: Callable[[], RunRecord | None]) -> Any:
        """The model of the run ``pick()`` returns, else the initial model; picked again if
        it is deleted while read (see :meth:`ModelKeeper.load_best`)."""
        return self.models.load_best(
            pick, self._initial.require, self.model_format, self.model_factory
        )

    def download_best_model(self, experiment_id: str) -> Any:
        """The best model of an experiment; the initial model if it holds none."""

        def pick() -> RunRecord | None:
            best = self.models.best_run(experiment_id)
            if best is None:
                log.info("experiment %s holds no model; using the initial model", experiment_id)
            return best

        return self._download_best(pick)

    def download_last_model(self) -> Any:
        """The model the next iteration starts from: the best model of a FINISHED run in the
        newest iteration (before the current one) that holds one (see
        :meth:`get_last_model_run`); else the initial model."""
        return self._download_best(self.get_last_model_run)

    # ------------------------------------------------------------------ top params
    def get_top_params_by_experiment_id(
        self, experiment_id: str, params_type: type[P] | None = None
    ) -> list[P] | None:
        """The params of the best ``n_top_runs`` FINISHED runs of an experiment that logged
        the main metric, best first, typed (see :class:`~tracker_core.ranking.TopRuns`);
        None if there are none or for the initial experiment."""
        if self._iterations.is_initial(experiment_id):
            return None
        current = type(self._runs.params) if self._runs.params is not None else None
        preferred = (params_type, self.params_type, current)
        return self._top.params(experiment_id, self.n_top_runs, *preferred)  # type: ignore[return-value]

    def get_top_params(self, params_type: type[P] | None = None) -> list[P] | None:
        """Top params of the iteration the next one starts from (the newest, before the
        current one, that holds a model of a FINISHED run: see :meth:`get_last_model_run`);
        None if there is none."""
        run = self.get_last_model_run()
        if run is None:
            return None
        return self.get_top_params_by_experiment_id(run.experiment_id, params_type)
