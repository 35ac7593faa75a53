"""Reconcile (``tracker-core gc`` and ``verify``): repair what crashes and outside hands leave.

- **orphaned folders**: model folders no run marks (a crash between writing and marking);
- **incomplete uploads**: uploads a killed writer left open (S3 multipart uploads), whose
  parts cost storage and show in no listing;
- **abandoned twins**: runs a creator left (never claimed, not ended, past their creation's
  grace) whose name another run of the experiment carries: a creator killed between
  ``create_run`` and deleting the twin that a lost ``create_run`` answer made it create;
- **missing files**: runs still marked as holding a model whose files are gone (a bucket
  emptied or a folder deleted by hand); :meth:`Reconciler.find_missing_files` lists them and
  :meth:`Reconciler.unmark_missing` unmarks them as a deletion would.

Nothing that belongs to a run held by a live worker (:func:`tracker_core.leases.run_is_live`)
is touched: its upload may be under way. A run whose worker died is collectable once its lease
has expired. How models are written, marked and deleted is :mod:`tracker_core.models`.
"""

from __future__ import annotations

import logging

import attrs

from tracker_core import tags as T
from tracker_core.clock import SYSTEM_CLOCK, Clock
from tracker_core.errors import ConfigurationError
from tracker_core.leases import DEFAULT_LEASE_SECONDS, is_abandoned, run_is_live
from tracker_core.models import ModelKeeper, is_marked, model_run_id
from tracker_core.retrying import Stores
from tracker_core.stores import (
    ArtifactStore,
    ExperimentQuery,
    IncompleteUpload,
    RunQuery,
    TrackingStore,
)
from tracker_core.values import ExperimentRecord, RunRecord, RunStatus

__all__ = [
    "AbandonedTwin",
    "MissingModel",
    "MissingScan",
    "OrphanScan",
    "OrphanedModel",
    "OrphanedUpload",
    "Reconciler",
]

log = logging.getLogger(__name__)


def _artifact_path(root: str, uri: str) -> tuple[str | None, bool]:
    """``(run id, in its model folder)`` of a URI under ``root`` laid out as
    ``<experiment>/<run id>/artifacts/...``; ``(None, False)`` for anything else."""
    parts = uri[len(root.rstrip("/")) :].strip("/").split("/")
    for i in range(1, len(parts) - 1):
        if parts[i] == "artifacts":
            return parts[i - 1], parts[i + 1] == T.MODEL_DIR and i + 2 < len(parts)
    return None, False


@attrs.frozen
class OrphanedModel:
    """A model folder no run marks: ``uri``, the run it belongs to (if it exists), why."""

    uri: str
    run_id: str | None
    reason: str


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
class AbandonedTwin:
    """A run its creator left (:func:`~tracker_core.leases.is_abandoned`) while another run
    of its experiment, ``kept_run_id``, carries its name: the one that ``set_run`` and the
    driver find and train (a claimed or ended run first, else the oldest)."""

    run_id: str
    experiment_id: str
    run_name: str
    kept_run_id: str


@attrs.frozen
class OrphanScan:
    """What :meth:`Reconciler.find_orphans` found.

    ``orphans``: unmarked model folders to delete; ``skipped``: those left alone (their run
    is held by a live worker); ``uploads`` / ``skipped_uploads``: the same for incomplete
    uploads; ``missing``: marked models whose folder the listing did not find (check them
    with :meth:`Reconciler.find_missing_files`); ``experiments``: how many experiments of
    the tracking store keep their artifacts under the store's root; ``twins``: runs their
    creators left beside another run of the same name, to delete.
    """

    orphans: tuple[OrphanedModel, ...]
    skipped: tuple[OrphanedModel, ...]
    marked_models: int
    uploads: tuple[OrphanedUpload, ...] = ()
    skipped_uploads: tuple[OrphanedUpload, ...] = ()
    missing: tuple[MissingModel, ...] = ()
    experiments: int = 0
    twins: tuple[AbandonedTwin, ...] = ()


@attrs.frozen
class MissingScan:
    """What :meth:`Reconciler.find_missing_files` found: the marked models whose files are
    gone, how many marked models were checked, and the runs whose marked model lies outside
    this store (not checked: another store holds them)."""

    missing: tuple[MissingModel, ...]
    checked: int
    outside: tuple[str, ...] = ()


class Reconciler:
    """Finds and repairs orphaned folders, incomplete uploads and marked models whose files
    are gone, across every experiment of the tracking store. Holds no mutable state."""

    def __init__(self, stores: Stores, models: ModelKeeper, clock: Clock = SYSTEM_CLOCK) -> None:
        self.tracking: TrackingStore = stores.tracking
        self.artifacts: ArtifactStore = stores.artifacts
        self._models = models
        self._clock = clock

    def _marked_everywhere(self) -> tuple[list[ExperimentRecord], list[RunRecord]]:
        """Every active experiment of the tracking store (whatever its plugin), and every run
        of them holding a marked model (one query per 50 experiments)."""
        experiments = list(self.tracking.iter_experiments(ExperimentQuery()))
        ids = [e.experiment_id for e in experiments]
        runs: list[RunRecord] = []
        for start in range(0, len(ids), 50):
            query = RunQuery(tuple(ids[start : start + 50]), tags={T.TAG_MODEL_UPLOADED: T.TRUE})
            runs.extend(self.tracking.search_runs(query))
        return experiments, runs

    def _live(self, run: RunRecord, ttl_ms: int) -> bool:
        return run_is_live(run, ttl_ms, self._clock.now_ms())

    def _get_run(self, run_id: str, cache: dict[str, RunRecord | None]) -> RunRecord | None:
        if run_id not in cache:
            cache[run_id] = self.tracking.get_run(run_id)
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
        self.artifacts.check_root()
        ttl_ms = int(lease_seconds * 1000)
        experiments, marked_runs = self._marked_everywhere()
        marked = {self._models.uri_of(r).rstrip("/"): r for r in marked_runs}
        root = self.artifacts.root
        found = self.artifacts.find_dirs(root, T.MODEL_DIR, max_depth)
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
            if owner is not None and not include_running and self._live(owner, ttl_ms):
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
            twins=tuple(self._abandoned_twins(experiments, ttl_ms)),
        )

    def _abandoned_twins(
        self, experiments: list[ExperimentRecord], ttl_ms: int
    ) -> list[AbandonedTwin]:
        """tracker-core's runs (tagged with their plugin) left by their creators while another
        run carries their name; of twins all left, the oldest is kept (the one ``set_run``
        resumes). One query per 50 experiments, one per name found."""
        ids = [e.experiment_id for e in experiments]
        now = self._clock.now_ms()
        left: set[tuple[str, str]] = set()
        for start in range(0, len(ids), 50):
            query = RunQuery(
                tuple(ids[start : start + 50]), statuses=(RunStatus.RUNNING, RunStatus.SCHEDULED)
            )
            for run in self.tracking.search_runs(query):
                if T.TAG_PLUGIN in run.tags and is_abandoned(run, ttl_ms, now):
                    left.add((run.experiment_id, run.run_name))
        twins: list[AbandonedTwin] = []
        for experiment_id, name in sorted(left):
            query = RunQuery((experiment_id,), run_name=name)
            same_name = self.tracking.search_runs(query)
            kept, *others = sorted(
                same_name, key=lambda r: (is_abandoned(r, ttl_ms, now), r.start_time_ms, r.run_id)
            )
            twins.extend(
                AbandonedTwin(r.run_id, experiment_id, name, kept.run_id)
                for r in others
                if is_abandoned(r, ttl_ms, now)
            )
        return twins

    def delete_twin(
        self, twin: AbandonedTwin, *, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> bool:
        """Delete a run found in :attr:`OrphanScan.twins` if it is still abandoned (read
        again: a worker may have claimed it since the scan); True if deleted."""
        run = self.tracking.get_run(twin.run_id)
        if run is None or not is_abandoned(run, int(lease_seconds * 1000), self._clock.now_ms()):
            return False
        self.tracking.delete_run(run.run_id)
        log.info("deleted run %s, a twin of %s its creator left", run.run_id, twin.kept_run_id)
        return True

    def _orphaned_uploads(
        self, runs: dict[str, RunRecord | None], include_running: bool, ttl_ms: int
    ) -> tuple[list[OrphanedUpload], list[OrphanedUpload]]:
        """Incomplete uploads in model folders: to abort, and left alone (with why)."""
        root = self.artifacts.root
        pending = self.artifacts.list_incomplete_uploads(root)
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
                age = self._clock.now_ms() - (upload.initiated_ms or 0)
                if age < ttl_ms and not include_running:
                    keep.append(attrs.evolve(base, reason="no run, and started recently"))
                else:
                    collect.append(attrs.evolve(base, reason="no run"))
            elif not include_running and self._live(owner, ttl_ms):
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
            fresh = self.tracking.get_run(run.run_id)
            if (
                fresh is not None
                and is_marked(fresh)
                and self._models.uri_of(fresh).rstrip("/") == uri
            ):
                live = self._live(fresh, ttl_ms)
                out.append(MissingModel(run.run_id, run.experiment_id, uri, live))
        return out

    def delete_orphan(self, orphan: OrphanedModel) -> bool:
        """Delete one folder found by :meth:`find_orphans`; True when it is gone."""
        if not self.artifacts.owns(orphan.uri):
            raise ConfigurationError(f"{orphan.uri} lies outside {self.artifacts.root}")
        deleted: bool = self.artifacts.delete_tree(orphan.uri)
        self._models.remove_empty_folders(orphan.uri)
        return deleted

    def abort_upload(self, upload: OrphanedUpload) -> None:
        """Abort one upload found by :meth:`find_orphans`, freeing its parts."""
        if not self.artifacts.owns(upload.uri):
            raise ConfigurationError(f"{upload.uri} lies outside {self.artifacts.root}")
        self.artifacts.abort_upload(upload.upload())

    def find_missing_files(self, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> MissingScan:
        """Runs marked as holding a model whose files are gone (one existence check per
        marked model of this store; marked models in other stores are not checked).

        Raises :class:`~tracker_core.errors.ArtifactStoreError` if the root's bucket does not
        exist: a wrong bucket name must not make every model look lost.
        """
        self.artifacts.check_root()
        ttl_ms = int(lease_seconds * 1000)
        _, marked_runs = self._marked_everywhere()
        missing: list[MissingModel] = []
        outside: list[str] = []
        checked = 0
        for run in marked_runs:
            uri = self._models.uri_of(run).rstrip("/")
            if not self.artifacts.owns(uri):
                outside.append(run.run_id)
                continue
            checked += 1
            if self.artifacts.exists(uri):
                continue
            fresh = self.tracking.get_run(run.run_id)
            if fresh is None or not is_marked(fresh):
                continue  # unmarked since we listed (pruned): nothing wrong
            live = self._live(fresh, ttl_ms)
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
        run = self.tracking.get_run(model.run_id)
        if run is None or not is_marked(run) or self._live(run, int(lease_seconds * 1000)):
            return False
        if self.artifacts.exists(self._models.uri_of(run)):
            return False
        self._models.unmark(run.run_id)
        log.info("unmarked run %s: its model files at %s are gone", run.run_id, model.uri)
        return True
