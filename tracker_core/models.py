"""The model side of the manager: write first, mark second; rank, serve, and reconcile.

A model is *servable* only once its run carries the mark (tag ``tracker.model_uploaded``)
that is set after every file was written. Deleting goes the other way round: unmark first,
then delete the files. A crash between two steps therefore leaves at worst an unmarked folder
(an orphan that :meth:`ModelKeeper.find_orphans` reports), never a marked model without files.

Reconcile (``tracker-core gc`` and ``verify``) repairs what crashes and outside hands leave:

- **orphaned folders**: model folders no run marks (a crash between writing and marking);
- **incomplete uploads**: uploads a killed writer left open (S3 multipart uploads), whose
  parts cost storage and show in no listing;
- **missing files**: runs still marked as holding a model whose files are gone (a bucket
  emptied or a folder deleted by hand); :meth:`ModelKeeper.find_missing_files` lists them and
  :meth:`ModelKeeper.unmark_missing` unmarks them as a deletion would.

Nothing that belongs to a run held by a live worker (:func:`tracker_core.leases.run_is_live`)
is touched: its upload may be under way. A run whose worker died is collectable once its lease
has expired.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from tracker_core import tags as T
from tracker_core.codecs import ModelFactory, get_codec
from tracker_core.errors import (
    ConfigurationError,
    ModelFilesMissingError,
    ModelLoadError,
    ModelNotFoundError,
)
from tracker_core.leases import DEFAULT_LEASE_SECONDS, now_ms, run_is_live
from tracker_core.progress import transfer_progress
from tracker_core.ranking import Ranking
from tracker_core.stores import (
    ArtifactStore,
    ExperimentQuery,
    IncompleteUpload,
    RunQuery,
    TrackingStore,
)
from tracker_core.values import ExperimentRecord, MetricValue, RunRecord, RunStatus

__all__ = [
    "MissingModel",
    "MissingScan",
    "ModelKeeper",
    "OrphanScan",
    "OrphanedModel",
    "OrphanedUpload",
    "is_marked",
]

log = logging.getLogger(__name__)

#: MLflow keeps 8,000 characters of a tag value; a manifest longer than this is left out
_MAX_MANIFEST = 6000

#: ``call(operation, fn, *args)``: a store call under the manager's retry policy
Call = Callable[..., Any]


def is_marked(run: RunRecord) -> bool:
    """Whether the run holds a completely written (servable) model."""
    return run.tags.get(T.TAG_MODEL_UPLOADED) == T.TRUE


def _manifest_tag(files: dict[str, int]) -> dict[str, str]:
    """The model's file list as a tag, so a download needs no listing; left out when it would
    not fit a tag (a model of hundreds of files is listed instead)."""
    text = json.dumps(files, separators=(",", ":"))
    return {T.TAG_MODEL_FILES: text} if len(text) <= _MAX_MANIFEST else {}


def manifest_of(run: RunRecord) -> dict[str, int] | None:
    """The files (relative path -> size) a marked model was written with, if recorded."""
    text = run.tags.get(T.TAG_MODEL_FILES)
    if not text:
        return None
    try:
        files = json.loads(text)
    except ValueError:
        return None
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in files.items()
    ):
        return None
    return files


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


def _artifact_path(root: str, uri: str) -> tuple[str | None, bool]:
    """``(run id, in its model folder)`` of a URI under ``root`` laid out as
    ``<experiment>/<run id>/artifacts/...``; ``(None, False)`` for anything else."""
    parts = uri[len(root.rstrip("/")) :].strip("/").split("/")
    for i in range(1, len(parts) - 1):
        if parts[i] == "artifacts":
            return parts[i - 1], parts[i + 1] == T.MODEL_DIR and i + 2 < len(parts)
    return None, False


@attrs.frozen
class OrphanedUpload:
    """An incomplete upload (see :meth:`~tracker_core.stores.ArtifactStore.list_incomplete_uploads`)
    in a model folder: ``uri`` of the object it would have made, the run it belongs to, why it
    is collectable (or, in :attr:`OrphanScan.skipped_uploads`, why not)."""

    uri: str
    upload_id: str
    run_id: str | None
    reason: str
    initiated_ms: int | None = None

    def upload(self) -> IncompleteUpload:
        return IncompleteUpload(self.uri, self.upload_id, self.initiated_ms)


@attrs.frozen
class MissingModel:
    """A run marked as holding a model whose files are gone from the store.

    ``live``: a live worker holds the run (it may be rewriting the model right now), so it is
    reported but never unmarked.
    """

    run_id: str
    experiment_id: str
    uri: str
    live: bool = False


@attrs.frozen
class OrphanScan:
    """What :meth:`ModelKeeper.find_orphans` found.

    ``orphans``: unmarked model folders to delete; ``skipped``: those left alone (their run
    is held by a live worker); ``uploads`` / ``skipped_uploads``: the same for incomplete
    uploads; ``missing``: marked models whose folder the listing did not find (check them
    with :meth:`ModelKeeper.find_missing_files`); ``experiments``: how many experiments of
    the tracking store keep their artifacts under the store's root.
    """

    orphans: tuple[OrphanedModel, ...]
    skipped: tuple[OrphanedModel, ...]
    marked_models: int
    uploads: tuple[OrphanedUpload, ...] = ()
    skipped_uploads: tuple[OrphanedUpload, ...] = ()
    missing: tuple[MissingModel, ...] = ()
    experiments: int = 0


@attrs.frozen
class MissingScan:
    """What :meth:`ModelKeeper.find_missing_files` found: the marked models whose files are
    gone, how many marked models were checked, and the runs whose marked model lies outside
    this store (not checked: another store holds them)."""

    missing: tuple[MissingModel, ...]
    checked: int
    outside: tuple[str, ...] = ()


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

    def files_exist(self, run: RunRecord) -> bool:
        """Whether the run's model folder holds any file (one request)."""
        exists: bool = self._art("exists", self.artifacts.exists, self.uri_of(run))
        return exists

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
        self,
        run: RunRecord,
        model: Any,
        model_format: str,
        requirements: Sequence[str] | None,
        *,
        before_mark: Callable[[], None] | None = None,
    ) -> str:
        """Write the model files, then mark them; returns the model's URI. ``before_mark``
        runs between the two (the manager checks there that it still holds the run)."""
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
            files = {
                p.relative_to(staging).as_posix(): p.stat().st_size
                for p in sorted(staging.rglob("*"))
                if p.is_file()
            }
            with transfer_progress(f"upload {run.run_id}") as progress:
                self._art("upload_model", self.artifacts.upload_dir, staging, uri, progress)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if before_mark is not None:
            before_mark()
        marks = {
            T.TAG_MODEL_URI: uri,
            T.TAG_MODEL_FORMAT: model_format,
            T.TAG_MODEL_DELETED: T.FALSE,
            T.TAG_MODEL_UPLOADED: T.TRUE,
            **_manifest_tag(files),
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
        self._remove_empty_folders(uri)
        return deleted

    def _remove_empty_folders(self, uri: str) -> None:
        """After deleting the folder at ``uri``: remove the folders it leaves empty (the run's
        ``artifacts`` and the run's own), up to the experiment's folder. Only on stores with
        real folders; a failure here never fails the deletion."""
        if not self.artifacts.has_directories:
            return
        run_id = model_run_id(uri)
        stop = uri.rstrip("/").rsplit("/", 3)[0] if run_id else self.artifacts.root
        try:
            self.artifacts.remove_empty_folders(uri, stop)
        except Exception as exc:
            log.warning("could not remove empty folders above %s: %s", uri, exc)

    # -- serve --------------------------------------------------------------------------
    def download_files(self, run: RunRecord, destination: Path, progress: bool | None) -> Path:
        """Copy a marked model's files into ``destination``."""
        if not is_marked(run):
            raise ModelNotFoundError(f"run {run.run_id} holds no model")
        destination.mkdir(parents=True, exist_ok=True)
        uri = self.uri_of(run)
        try:
            with transfer_progress(f"download {run.run_id}", enabled=progress) as callback:
                self._art(
                    "download_model",
                    self.artifacts.download_dir,
                    uri,
                    destination,
                    callback,
                    files=manifest_of(run),
                )
        except ModelFilesMissingError:
            raise
        except ModelNotFoundError as exc:
            raise ModelFilesMissingError(
                f"run {run.run_id} is marked as holding a model, but its files at {uri} are "
                "gone (deleted outside tracker-core?); `tracker-core verify --unmark` lists and "
                "unmarks such runs"
            ) from exc
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
    def _marked_everywhere(self) -> tuple[list[ExperimentRecord], list[RunRecord]]:
        """Every active experiment of the tracking store (whatever its plugin), and every run
        of them holding a marked model (one query per 50 experiments)."""
        experiments: list[ExperimentRecord] = self._track(
            "search", lambda: list(self.tracking.iter_experiments(ExperimentQuery()))
        )
        ids = [e.experiment_id for e in experiments]
        runs: list[RunRecord] = []
        for start in range(0, len(ids), 50):
            query = RunQuery(tuple(ids[start : start + 50]), tags={T.TAG_MODEL_UPLOADED: T.TRUE})
            runs.extend(self._track("search", self.tracking.search_runs, query))
        return experiments, runs

    def _get_run(self, run_id: str, cache: dict[str, RunRecord | None]) -> RunRecord | None:
        if run_id not in cache:
            cache[run_id] = self._track("search", self.tracking.get_run, run_id)
        return cache[run_id]

    @staticmethod
    def _why_collectable(owner: RunRecord | None, what: str) -> str:
        if owner is None:
            return "no run"
        if owner.status.is_terminal:
            return f"run {owner.status.value}, {what}"
        return f"run {owner.status.value} but its worker is gone (lease expired), {what}"

    def find_orphans(
        self,
        *,
        include_running: bool = False,
        max_depth: int = 4,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> OrphanScan:
        """Model folders and incomplete uploads under the artifact root that no run needs.

        Marks are read from every active experiment of the tracking store, whatever its
        plugin. A folder or upload whose run is held by a live worker (its lease has not
        expired; see :func:`~tracker_core.leases.run_is_live`, ``lease_seconds`` for runs
        never claimed) is skipped, unless ``include_running``: its upload may be under way.
        An incomplete upload that belongs to no run is collected only once it is older than
        ``lease_seconds``. Raises :class:`~tracker_core.errors.ArtifactStoreError` if the
        root's bucket does not exist.
        """
        self._art("check_root", self.artifacts.check_root)
        ttl_ms = int(lease_seconds * 1000)
        experiments, marked_runs = self._marked_everywhere()
        marked = {self.uri_of(r).rstrip("/"): r for r in marked_runs}
        root = self.artifacts.root
        found: list[str] = self._art(
            "find_models", self.artifacts.find_dirs, root, T.MODEL_DIR, max_depth
        )
        present = {u.rstrip("/") for u in found}
        candidates = sorted(present - set(marked))
        # a folder inside another candidate is part of it (a model may hold a "model" folder)
        candidates = [u for u in candidates if not any(u.startswith(c + "/") for c in candidates)]
        runs: dict[str, RunRecord | None] = {}
        orphans: list[OrphanedModel] = []
        skipped: list[OrphanedModel] = []
        for uri in candidates:
            if any(uri.startswith(m + "/") for m in marked):
                continue
            run_id = model_run_id(uri)
            owner = self._get_run(run_id, runs) if run_id else None
            if owner is not None and not include_running and run_is_live(owner, ttl_ms):
                skipped.append(OrphanedModel(uri, run_id, "its run is held by a live worker"))
                continue
            reason = self._why_collectable(owner, "model not marked")
            orphans.append(OrphanedModel(uri, run_id if owner is not None else None, reason))
        uploads, skipped_uploads = self._orphaned_uploads(runs, include_running, ttl_ms)
        return OrphanScan(
            tuple(orphans),
            tuple(skipped),
            len(marked),
            uploads=tuple(uploads),
            skipped_uploads=tuple(skipped_uploads),
            missing=tuple(self._missing_from_listing(marked, present, max_depth, ttl_ms)),
            experiments=sum(1 for e in experiments if self.artifacts.owns(e.artifact_location)),
        )

    def _orphaned_uploads(
        self, runs: dict[str, RunRecord | None], include_running: bool, ttl_ms: int
    ) -> tuple[list[OrphanedUpload], list[OrphanedUpload]]:
        """Incomplete uploads in model folders: to abort, and left alone (with why)."""
        root = self.artifacts.root
        pending: list[IncompleteUpload] = self._art(
            "list_uploads", self.artifacts.list_incomplete_uploads, root
        )
        collect: list[OrphanedUpload] = []
        keep: list[OrphanedUpload] = []
        for upload in sorted(pending, key=lambda u: (u.uri, u.upload_id)):
            run_id, in_model = _artifact_path(root, upload.uri)
            if run_id is None or not in_model:
                reason = "not in a model folder: not tracker-core's to abort"
                keep.append(OrphanedUpload(upload.uri, upload.upload_id, run_id, reason))
                continue
            owner = self._get_run(run_id, runs)
            base = OrphanedUpload(upload.uri, upload.upload_id, None, "", upload.initiated_ms)
            if owner is None:
                age = now_ms() - (upload.initiated_ms or 0)
                if age < ttl_ms and not include_running:
                    keep.append(attrs.evolve(base, reason="no run, and started recently"))
                else:
                    collect.append(attrs.evolve(base, reason="no run"))
            elif not include_running and run_is_live(owner, ttl_ms):
                keep.append(
                    attrs.evolve(base, run_id=run_id, reason="its run is held by a live worker")
                )
            else:
                why = self._why_collectable(owner, "upload never completed")
                collect.append(attrs.evolve(base, run_id=run_id, reason=why))
        return collect, keep

    def _missing_from_listing(
        self, marked: dict[str, RunRecord], present: set[str], max_depth: int, ttl_ms: int
    ) -> list[MissingModel]:
        """Marked models of this store that the listing did not find, re-read to drop those
        unmarked meanwhile (pruned between our two reads)."""
        root = self.artifacts.root.rstrip("/")
        out: list[MissingModel] = []
        for uri, run in sorted(marked.items()):
            depth = len(uri[len(root) :].strip("/").split("/"))
            if uri in present or not self.artifacts.owns(uri) or depth > max_depth:
                continue
            fresh = self._track("search", self.tracking.get_run, run.run_id)
            if fresh is not None and is_marked(fresh) and self.uri_of(fresh).rstrip("/") == uri:
                live = run_is_live(fresh, ttl_ms)
                out.append(MissingModel(run.run_id, run.experiment_id, uri, live))
        return out

    def delete_orphan(self, orphan: OrphanedModel) -> bool:
        """Delete one folder found by :meth:`find_orphans`; True when it is gone."""
        if not self.artifacts.owns(orphan.uri):
            raise ConfigurationError(f"{orphan.uri} lies outside {self.artifacts.root}")
        deleted: bool = self._art("gc_delete", self.artifacts.delete_tree, orphan.uri)
        self._remove_empty_folders(orphan.uri)
        return deleted

    def abort_upload(self, upload: OrphanedUpload) -> None:
        """Abort one upload found by :meth:`find_orphans`, freeing its parts."""
        if not self.artifacts.owns(upload.uri):
            raise ConfigurationError(f"{upload.uri} lies outside {self.artifacts.root}")
        self._art("gc_delete", self.artifacts.abort_upload, upload.upload())

    def find_missing_files(self, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> MissingScan:
        """Runs marked as holding a model whose files are gone (one existence check per
        marked model of this store; marked models in other stores are not checked).

        Raises :class:`~tracker_core.errors.ArtifactStoreError` if the root's bucket does not
        exist: a wrong bucket name must not make every model look lost.
        """
        self._art("check_root", self.artifacts.check_root)
        ttl_ms = int(lease_seconds * 1000)
        _, marked_runs = self._marked_everywhere()
        missing: list[MissingModel] = []
        outside: list[str] = []
        checked = 0
        for run in marked_runs:
            uri = self.uri_of(run).rstrip("/")
            if not self.artifacts.owns(uri):
                outside.append(run.run_id)
                continue
            checked += 1
            if self._art("exists", self.artifacts.exists, uri):
                continue
            fresh = self._track("search", self.tracking.get_run, run.run_id)
            if fresh is None or not is_marked(fresh):
                continue  # unmarked since we listed (pruned): nothing wrong
            live = run_is_live(fresh, ttl_ms)
            missing.append(MissingModel(run.run_id, run.experiment_id, uri, live))
        missing.sort(key=lambda m: (m.experiment_id, m.run_id))
        return MissingScan(tuple(missing), checked, tuple(sorted(outside)))

    def unmark_missing(
        self, model: MissingModel, *, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> bool:
        """Unmark a run found by :meth:`find_missing_files`, with the tags and marker metrics
        of a deletion, so it is no longer served. Only if it is still marked, its files are
        still gone, and no live worker holds it (which may be rewriting them); True if
        unmarked."""
        run = self._track("search", self.tracking.get_run, model.run_id)
        if run is None or not is_marked(run) or run_is_live(run, int(lease_seconds * 1000)):
            return False
        if self._art("exists", self.artifacts.exists, self.uri_of(run)):
            return False
        self.unmark(run.run_id)
        log.info("unmarked run %s: its model files at %s are gone", run.run_id, model.uri)
        return True
