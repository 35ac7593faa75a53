"""The model side of the manager: write first, mark second; rank, serve, and find orphans.

A model is *servable* only once its run carries the mark (tag ``tracker.model_uploaded``)
that is set after every file was written. Deleting goes the other way round: unmark first,
then delete the files. A crash between two steps therefore leaves at worst an unmarked folder
(an orphan that :meth:`ModelKeeper.find_orphans` reports), never a marked model without files.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from tracker_core import tags as T
from tracker_core.codecs import ModelFactory, get_codec
from tracker_core.errors import ConfigurationError, ModelLoadError, ModelNotFoundError
from tracker_core.progress import transfer_progress
from tracker_core.ranking import Ranking
from tracker_core.stores import ArtifactStore, ExperimentQuery, RunQuery, TrackingStore
from tracker_core.values import ExperimentRecord, MetricValue, RunRecord, RunStatus

__all__ = ["ModelKeeper", "OrphanScan", "OrphanedModel", "is_marked"]

log = logging.getLogger(__name__)

#: ``call(operation, fn, *args)``: a store call under the manager's retry policy
Call = Callable[..., Any]


def is_marked(run: RunRecord) -> bool:
    """Whether the run holds a completely written (servable) model."""
    return run.tags.get(T.TAG_MODEL_UPLOADED) == T.TRUE


def model_run_id(uri: str) -> str | None:
    """``.../<run_id>/artifacts/model`` -> ``<run_id>``."""
    parts = uri.rstrip("/").split("/")
    if len(parts) >= 3 and parts[-1] == T.MODEL_DIR and parts[-2] == "artifacts":
        return parts[-3]
    return None


@attrs.frozen
class OrphanedModel:
    """A model folder no run marks: ``uri``, the run it belongs to (if it exists), why."""

    uri: str
    run_id: str | None
    reason: str


@attrs.frozen
class OrphanScan:
    """What :meth:`ModelKeeper.find_orphans` found."""

    orphans: tuple[OrphanedModel, ...]
    skipped: tuple[OrphanedModel, ...]
    marked_models: int


class ModelKeeper:
    """Writes, marks, ranks, serves and deletes models of runs.

    ``track`` and ``art`` run a call on the tracking / artifact store under the manager's
    retry policy. Holds no mutable state.
    """

    def __init__(
        self,
        tracking: TrackingStore,
        artifacts: ArtifactStore,
        ranking: Ranking,
        *,
        track: Call,
        art: Call,
    ) -> None:
        self.tracking = tracking
        self.artifacts = artifacts
        self.ranking = ranking
        self._track = track
        self._art = art

    # -- where and which -------------------------------------------------------------
    @staticmethod
    def uri_of(run: RunRecord) -> str:
        """Where the run's model lives: ``<run artifact URI>/model``, as ``runs:/<id>/model``."""
        return run.tags.get(T.TAG_MODEL_URI) or f"{run.artifact_uri.rstrip('/')}/{T.MODEL_DIR}"

    def marked_runs(self, experiment_id: str) -> list[RunRecord]:
        """Runs of the experiment holding a servable model, best first (one query)."""
        query = RunQuery((experiment_id,), tags={T.TAG_MODEL_UPLOADED: T.TRUE})
        runs: list[RunRecord] = self._track("search", self.tracking.search_runs, query)
        return self.ranking.best_first(runs)

    def best_run(self, experiment_id: str) -> RunRecord | None:
        """The run holding the best servable model; never a FAILED run."""
        ranked = [r for r in self.marked_runs(experiment_id) if r.status != RunStatus.FAILED]
        return ranked[0] if ranked else None

    def better_marked(self, run: RunRecord) -> list[RunRecord]:
        """Marked models of the run's experiment that rank above ``run``."""
        mine = self.ranking.key(run)
        return [
            r
            for r in self.marked_runs(run.experiment_id)
            if r.run_id != run.run_id and self.ranking.key(r) < mine
        ]

    # -- write, mark, unmark, delete ----------------------------------------------------
    def write_and_mark(
        self, run: RunRecord, model: Any, model_format: str, requirements: Sequence[str] | None
    ) -> str:
        """Write the model files, then mark them; returns the model's URI."""
        codec = get_codec(model_format)
        uri = self.uri_of(run)
        if not self.artifacts.owns(uri):
            raise ConfigurationError(
                f"run {run.run_id} stores artifacts at {uri}, outside this manager's "
                f"artifact store {self.artifacts.root}"
            )
        staging = Path(tempfile.mkdtemp(prefix="tracker-core-model-"))
        try:
            codec.save(model, staging, requirements)
            with transfer_progress(f"upload {run.run_id}") as progress:
                self._art("upload_model", self.artifacts.upload_dir, staging, uri, progress)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        marks = {
            T.TAG_MODEL_URI: uri,
            T.TAG_MODEL_FORMAT: model_format,
            T.TAG_MODEL_DELETED: T.FALSE,
            T.TAG_MODEL_UPLOADED: T.TRUE,
        }
        marker = [MetricValue(T.METRIC_MODEL_UPLOADED, 1.0, step=1)]
        self._track("log_metric", self.tracking.log_batch, run.run_id, marker, None, marks)
        log.info("model of run %s written to %s (%s)", run.run_id, uri, model_format)
        return uri

    def unmark(self, run_id: str) -> None:
        """Make the run's model unservable (tags), with the seed's marker metrics."""
        markers = [
            MetricValue(T.METRIC_MODEL_UPLOADED, 0.0, step=2),
            MetricValue(T.METRIC_MODEL_DELETED, 1.0, step=2),
        ]
        tags = {T.TAG_MODEL_UPLOADED: T.FALSE, T.TAG_MODEL_DELETED: T.TRUE}
        self._track("log_metric", self.tracking.log_batch, run_id, markers, None, tags)

    def delete_files(self, run: RunRecord) -> bool:
        """Delete the files of the run's model; True when none are left."""
        uri = self.uri_of(run)
        if not self.artifacts.owns(uri):
            log.error("model of run %s at %s lies outside this store; not deleted", run.run_id, uri)
            return False
        deleted: bool = self._art("delete_model", self.artifacts.delete_tree, uri)
        return deleted

    # -- serve --------------------------------------------------------------------------
    def download_files(self, run: RunRecord, destination: Path, progress: bool | None) -> Path:
        """Copy a marked model's files into ``destination``."""
        if not is_marked(run):
            raise ModelNotFoundError(f"run {run.run_id} holds no model")
        destination.mkdir(parents=True, exist_ok=True)
        with transfer_progress(f"download {run.run_id}", enabled=progress) as callback:
            self._art(
                "download_model",
                self.artifacts.download_dir,
                self.uri_of(run),
                destination,
                callback,
            )
        return destination

    def load(self, run: RunRecord, default_format: str, model_factory: ModelFactory | None) -> Any:
        """Read a marked model with the codec recorded on its run."""
        codec = get_codec(run.tags.get(T.TAG_MODEL_FORMAT, default_format))
        staging = Path(tempfile.mkdtemp(prefix="tracker-core-download-"))
        try:
            self.download_files(run, staging, progress=None)
            return codec.load(staging, model_factory)
        except ModelLoadError as exc:
            raise ModelLoadError(f"model of run {run.run_id}: {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # -- reconcile ----------------------------------------------------------------------
    def find_orphans(self, *, include_running: bool = False, max_depth: int = 4) -> OrphanScan:
        """Model folders under the artifact root that no run marks (see the module doc).

        Marks are read from every active experiment of the tracking store, whatever its
        plugin. Folders of runs still RUNNING are skipped (their upload may be under way)
        unless ``include_running``.
        """
        experiments: list[ExperimentRecord] = self._track(
            "search", lambda: list(self.tracking.iter_experiments(ExperimentQuery()))
        )
        marked: set[str] = set()
        ids = [e.experiment_id for e in experiments]
        for start in range(0, len(ids), 50):
            query = RunQuery(tuple(ids[start : start + 50]), tags={T.TAG_MODEL_UPLOADED: T.TRUE})
            for run in self._track("search", self.tracking.search_runs, query):
                marked.add(self.uri_of(run).rstrip("/"))
        found: list[str] = self._art(
            "find_models", self.artifacts.find_dirs, self.artifacts.root, T.MODEL_DIR, max_depth
        )
        candidates = sorted({u.rstrip("/") for u in found} - marked)
        # a folder inside another candidate is part of it (a model may hold a "model" folder)
        candidates = [u for u in candidates if not any(u.startswith(c + "/") for c in candidates)]
        orphans: list[OrphanedModel] = []
        skipped: list[OrphanedModel] = []
        for uri in candidates:
            if any(uri.startswith(m + "/") for m in marked):
                continue
            run_id = model_run_id(uri)
            owner = self._track("search", self.tracking.get_run, run_id) if run_id else None
            if owner is not None and not owner.status.is_terminal and not include_running:
                skipped.append(OrphanedModel(uri, run_id, "its run is still RUNNING"))
                continue
            reason = "no run" if owner is None else f"run {owner.status.value}, model not marked"
            orphans.append(OrphanedModel(uri, run_id if owner is not None else None, reason))
        return OrphanScan(tuple(orphans), tuple(skipped), len(marked))

    def delete_orphan(self, orphan: OrphanedModel) -> bool:
        """Delete one folder found by :meth:`find_orphans`; True when it is gone."""
        if not self.artifacts.owns(orphan.uri):
            raise ConfigurationError(f"{orphan.uri} lies outside {self.artifacts.root}")
        deleted: bool = self._art("gc_delete", self.artifacts.delete_tree, orphan.uri)
        return deleted
