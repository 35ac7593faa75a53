"""The model side of the manager: write first, mark second; rank, prune and serve.

A model is *written* once its run carries the mark (tag ``tracker.model_uploaded``) that is
set after every file was written. Deleting goes the other way round: unmark first, then
delete the files. A crash between two steps therefore leaves at worst an unmarked folder (an
orphan that :meth:`tracker_core.reconcile.Reconciler.find_orphans` reports), never a marked
model without files.

A marked model is *served* (the best model of an iteration, what the next iteration starts
from, what cleanup keeps) only once its run ended FINISHED: a run still training can fail.
While its run trains, a model is provisional: it does not count among the ``keep`` best when
another run decides whether to save or what to prune. When its run ends FAILED (or KILLED)
the model is deleted; when it ends FINISHED the iteration is pruned again
(:meth:`ModelKeeper.prune`). Serving reads the run record once: the record that picked a
model is the one its files are read with, and a model deleted while read is picked again
(:meth:`ModelKeeper.load_best`).

A model that a registered-model alias points at (the champion, the rollback model; tag
``tracker.protected``, see :mod:`tracker_core.promotion`) is never pruned and never deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tracker_core import tags as T
from tracker_core.codecs import ModelFactory, get_codec
from tracker_core.errors import (
    ConfigurationError,
    InvalidMetricError,
    ModelFilesMissingError,
    ModelLoadError,
    ModelNotFoundError,
    ModelProtectedError,
)
from tracker_core.progress import transfer_progress
from tracker_core.ranking import Ranking
from tracker_core.retrying import Stores
from tracker_core.stores import RunQuery
from tracker_core.values import MetricValue, RunRecord, RunStatus

__all__ = ["ModelKeeper", "is_marked", "is_protected", "manifest_of", "model_run_id", "sha256_of"]

log = logging.getLogger(__name__)

#: MLflow keeps 8,000 characters of a tag value; a manifest longer than this is left out
_MAX_MANIFEST = 6000

#: how often a download picks the best model again when it was deleted while read
PICK_ATTEMPTS = 3


#: ended runs whose models are never served (deleted when the run ends, or by any prune)
_NEVER_SERVED = (RunStatus.FAILED, RunStatus.KILLED)


def is_marked(run: RunRecord) -> bool:
    """Whether the run holds a completely written (servable) model."""
    return run.tags.get(T.TAG_MODEL_UPLOADED) == T.TRUE


def is_protected(run: RunRecord) -> bool:
    """Whether a registered-model alias points at the run's model (never deleted then)."""
    return run.tags.get(T.TAG_PROTECTED) == T.TRUE


def _manifest_tag(key: str, files: dict[str, Any]) -> dict[str, str]:
    """The model's files (sizes, or hashes) as a tag, so a download needs no listing; left out
    when it would not fit a tag (a model of hundreds of files is listed instead)."""
    text = json.dumps(files, separators=(",", ":"))
    return {key: text} if len(text) <= _MAX_MANIFEST else {}


def sha256_of(run: RunRecord) -> dict[str, str] | None:
    """The SHA-256 of each file of a marked model as written, if recorded."""
    text = run.tags.get(T.TAG_MODEL_SHA256)
    try:
        hashes = json.loads(text) if text else None
    except ValueError:
        return None
    return hashes if isinstance(hashes, dict) else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


class ModelKeeper:
    """Writes, marks, ranks, serves and deletes models of runs, through ``stores`` (each call
    under the retry policy). Holds no mutable state."""

    def __init__(self, stores: Stores, ranking: Ranking) -> None:
        self.tracking = stores.tracking
        self.artifacts = stores.artifacts
        self.ranking = ranking

    # -- where and which -------------------------------------------------------------
    @staticmethod
    def uri_of(run: RunRecord) -> str:
        """Where the run's model lives: ``<run artifact URI>/model``, as ``runs:/<id>/model``."""
        return run.tags.get(T.TAG_MODEL_URI) or f"{run.artifact_uri.rstrip('/')}/{T.MODEL_DIR}"

    def files_exist(self, run: RunRecord) -> bool:
        """Whether the run's model folder holds any file (one request)."""
        return self.artifacts.exists(self.uri_of(run))

    def marked_runs(self, experiment_id: str) -> list[RunRecord]:
        """Runs of the experiment holding a written model, best first (one query)."""
        query = RunQuery((experiment_id,), tags={T.TAG_MODEL_UPLOADED: T.TRUE})
        return self.ranking.best_first(self.tracking.search_runs(query))

    def best_run(self, experiment_id: str) -> RunRecord | None:
        """The run holding the best servable model: a marked model of a FINISHED run (one
        query). A model of a run still training is not served: the run can still fail."""
        query = RunQuery(
            (experiment_id,), statuses=(RunStatus.FINISHED,), tags={T.TAG_MODEL_UPLOADED: T.TRUE}
        )
        ranked = self.ranking.best_first(self.tracking.search_runs(query))
        return ranked[0] if ranked else None

    def better_kept(self, run: RunRecord) -> list[RunRecord]:
        """Models of FINISHED runs of the run's experiment that rank above ``run``."""
        mine = self.ranking.key(run)
        return [
            r
            for r in self.marked_runs(run.experiment_id)
            if r.run_id != run.run_id
            and r.status == RunStatus.FINISHED
            and self.ranking.key(r) < mine
        ]

    def among_best(self, fresh: RunRecord, keep: int) -> bool:
        """Whether ``fresh`` (just read) ranks among the ``keep`` best models of FINISHED runs
        of its iteration, so its model is worth writing. Raises :class:`InvalidMetricError`
        if it logged no value of the main metric."""
        metric = self.ranking.metric
        if metric not in fresh.metrics:
            raise InvalidMetricError(
                f"cannot rank run {fresh.run_id}: it has no value of {metric!r}"
            )
        if len(self.better_kept(fresh)) < keep:
            return True
        value = fresh.metrics[metric]
        log.info(
            "run %s (%s=%s) is not among the best %d; model not saved",
            *(fresh.run_id, metric, value, keep),
        )
        return False

    def prune(self, experiment_id: str, keep: int) -> None:
        """Delete the models that will never be served: those of FAILED or KILLED runs, and
        those ranked below ``keep`` models of FINISHED runs. Concurrent workers cannot prune
        a top model: a model is written first and marked second, only FINISHED runs count
        as the ``keep`` above, and a FINISHED run's rank never changes."""
        finished_above = 0
        for run in self.marked_runs(experiment_id):
            if is_protected(run):
                finished_above += run.status == RunStatus.FINISHED
            elif run.status in _NEVER_SERVED or finished_above >= keep:
                self.delete(run)
            elif run.status == RunStatus.FINISHED:
                finished_above += 1

    # -- write, mark, unmark, delete ----------------------------------------------------
    def write_and_mark(
        self,
        run: RunRecord,
        model: Any,
        model_format: str,
        requirements: Sequence[str] | None,
        *,
        before_mark: Callable[[], object] | None = None,
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
            paths = {p.relative_to(staging).as_posix(): p for p in sorted(staging.rglob("*"))}
            files = {name: p.stat().st_size for name, p in paths.items() if p.is_file()}
            hashes = {name: _sha256(paths[name]) for name in files}
            with transfer_progress(f"upload {run.run_id}") as progress:
                self.artifacts.upload_dir(staging, uri, progress)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if before_mark is not None:
            before_mark()
        marks = {
            T.TAG_MODEL_URI: uri,
            T.TAG_MODEL_FORMAT: model_format,
            T.TAG_MODEL_DELETED: T.FALSE,
            T.TAG_MODEL_UPLOADED: T.TRUE,
            **_manifest_tag(T.TAG_MODEL_FILES, files),
            **_manifest_tag(T.TAG_MODEL_SHA256, hashes),
        }
        marker = [MetricValue(T.METRIC_MODEL_UPLOADED, 1.0, step=1)]
        self.tracking.log_batch(run.run_id, marker, None, marks)
        log.info("model of run %s written to %s (%s)", run.run_id, uri, model_format)
        return uri

    def unmark(self, run_id: str) -> None:
        """Make the run's model unservable (tags), with the seed's marker metrics."""
        markers = [
            MetricValue(T.METRIC_MODEL_UPLOADED, 0.0, step=2),
            MetricValue(T.METRIC_MODEL_DELETED, 1.0, step=2),
        ]
        tags = {T.TAG_MODEL_UPLOADED: T.FALSE, T.TAG_MODEL_DELETED: T.TRUE}
        self.tracking.log_batch(run_id, markers, None, tags)

    def delete(self, run: RunRecord) -> bool:
        """Delete the run's model: unmark it first (a crash between the two steps leaves an
        orphan for gc, never a marked model without files), then its files; True when no
        file is left. Refused (:class:`ModelProtectedError`) while an alias points at it."""
        if is_protected(run):
            raise ModelProtectedError(
                f"the model of run {run.run_id} is a registered champion or rollback model "
                "(tag tracker.protected): it is not deleted while an alias points at it"
            )
        self.unmark(run.run_id)
        ok = self.delete_files(run)
        log.info("deleted model of run %s (%s)", run.run_id, "done" if ok else "files remain")
        return ok

    def delete_files(self, run: RunRecord) -> bool:
        """Delete the files of the run's model; True when none are left."""
        uri = self.uri_of(run)
        if not self.artifacts.owns(uri):
            log.error("model of run %s at %s lies outside this store; not deleted", run.run_id, uri)
            return False
        deleted = self.artifacts.delete_tree(uri)
        self.remove_empty_folders(uri)
        return deleted

    def remove_empty_folders(self, uri: str) -> None:
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
                self.artifacts.download_dir(uri, destination, callback, files=manifest_of(run))
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

    def load_best(
        self,
        pick: Callable[[], RunRecord | None],
        otherwise: Callable[[], RunRecord],
        default_format: str,
        model_factory: ModelFactory | None,
    ) -> Any:
        """The model of the run ``pick()`` returns (of ``otherwise()`` when it returns None),
        read with the record that picked it. If another worker deletes that model while it
        is read (pruned by a better one, or its iteration cleaned up), pick again."""
        for attempt in range(1, PICK_ATTEMPTS + 1):
            run = pick()
            if run is None:
                return self.load(otherwise(), default_format, model_factory)
            try:
                return self.load(run, default_format, model_factory)
            except ModelNotFoundError:
                if attempt == PICK_ATTEMPTS:
                    raise
                log.info("the model of run %s was deleted while read; picking again", run.run_id)
        raise AssertionError("unreachable")  # pragma: no cover
