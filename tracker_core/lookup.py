"""Finding a model to serve: by run id, by experiment and run names, the best of an
iteration, the one the next iteration starts from, the champion's.

:class:`ModelLookup` answers the seed's lookup questions over a
:class:`~tracker_core.tracker.Tracker`: which run holds the model asked for (a run holds one
while it is *marked*, see :mod:`tracker_core.models`), and its model loaded, its files copied
or its URL. What is missing is None with a log line, as the seed's API has it; a store that
fails raises. The manager's methods of the same names delegate here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tracker_core.errors import ConfigurationError, ModelFilesMissingError, ModelNotFoundError
from tracker_core.models import is_marked
from tracker_core.tracker import Tracker
from tracker_core.values import RunRecord

__all__ = ["ModelLookup"]

log = logging.getLogger(__name__)


class ModelLookup:
    """The seed's model lookups over one tracker (see the module docstring)."""

    def __init__(self, tracker: Tracker) -> None:
        self._tracker = tracker

    def run(self, run_id: str, *, marked_only: bool = False) -> RunRecord | None:
        """The run with that id; with ``marked_only``, None unless it holds a model."""
        run = self._tracker.runs.get(run_id)
        if run is None or (marked_only and not is_marked(run)):
            return None
        return run

    def last_run(self) -> RunRecord | None:
        """The run holding the model the next iteration starts from (see
        :meth:`~tracker_core.tracker.Tracker.last_model`)."""
        found = self._tracker.last_model()
        return found[1] if found else None

    def current_best(self) -> RunRecord | None:
        """The run holding the current iteration's best model; None without one."""
        experiment = self._tracker.experiment
        return self._tracker.models.best_run(experiment.experiment_id) if experiment else None

    def url(self, run: RunRecord | None) -> str | None:
        return self._tracker.models.uri_of(run) if run else None

    def files(self, run_id: str, destination: Path, progress: bool | None) -> Path:
        """Copy the run's model files into ``destination``; returns the model folder."""
        run = self.run(run_id, marked_only=True)
        if run is None:
            raise ModelNotFoundError(f"run {run_id} holds no model")
        return self._tracker.models.download_files(run, Path(destination), progress)

    def load(self, run_id: str) -> Any | None:
        """The run's model; None if the run holds none. Its files missing raise
        :class:`ModelFilesMissingError`, as do store failures."""
        run = self.run(run_id, marked_only=True)
        try:
            if run is None:
                raise ModelNotFoundError(f"run {run_id} holds no model")
            return self._tracker.load(run)
        except ModelFilesMissingError:
            raise
        except ModelNotFoundError as exc:
            log.info("no model to download: %s", exc)
            return None

    def load_named(self, experiment_name: str, run_name: str) -> Any | None:
        """The model of the run ``run_name`` in the experiment ``experiment_name``."""
        experiment = self._tracker.iterations.by_name(experiment_name)
        if experiment is None:
            log.warning("no experiment named %r", experiment_name)
            return None
        run = self._tracker.runs.first(experiment.experiment_id, run_name=run_name)
        if run is None:
            log.warning("no run named %r in %r", run_name, experiment_name)
            return None
        return self.load(run.run_id)

    def load_best(self, experiment_id: str) -> Any:
        """The best model of an experiment; the initial model if it holds none."""

        def pick() -> RunRecord | None:
            best = self._tracker.models.best_run(experiment_id)
            if best is None:
                log.info("experiment %s holds no model; using the initial model", experiment_id)
            return best

        return self._tracker.load_best(pick)

    def load_champion(self) -> Any:
        """The champion's model; before the first promotion, the last iteration's best (else
        the initial model)."""
        champion = self._tracker.promoter.serving()
        run = champion.run if champion is not None else None
        return self._tracker.load_best(lambda: run if run is not None else self.last_run())

    def delete(self, run_id: str, experiment_id: str) -> bool:
        """Delete the model of a run of that experiment, never the initial model's
        (:class:`ConfigurationError`); False, with a warning, when the run holds none there."""
        if self._tracker.iterations.is_initial(experiment_id):
            raise ConfigurationError("deleting the initial model is not allowed")
        run = self.run(run_id, marked_only=True)
        if run is None or run.experiment_id != experiment_id:
            log.warning("run %s of experiment %s holds no model", run_id, experiment_id)
            return False
        return self._tracker.delete_model(run)
