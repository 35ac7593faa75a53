"""The two abstractions the manager is written against.

:class:`TrackingStore` is where iterations (experiments) and runs live, with their params,
metrics and tags: MLflow in every shipped backend. :class:`ArtifactStore` is where model files
live: a local folder, S3 or GCS. The abstract surfaces are small; everything else is derived
here or in the manager, written once.

Contract shared by every implementation (the behaviour suite in :mod:`tracker_core.testing`
checks it on every backend):

- Methods are thread-safe; one store may serve many managers.
- Remote failures that are worth retrying are reported by :meth:`classify_error`; the caller
  (the manager) wraps each call in the one retry policy. A store never retries by itself.
- Errors are :class:`~tracker_core.errors.TrackingStoreError` /
  :class:`~tracker_core.errors.ArtifactStoreError` (or transient ones the retrier knows) and
  never contain credentials.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs

from tracker_core.errors import ArtifactStoreError
from tracker_core.registry_store import RegistryStore
from tracker_core.values import ExperimentRecord, MetricValue, RunRecord, RunStatus

__all__ = [
    "ArtifactStore",
    "ExperimentQuery",
    "IncompleteUpload",
    "ProgressCallback",
    "RunQuery",
    "TrackingStore",
    "slugify",
]


def _tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value)


def _dict(value: Mapping[str, str] | None) -> dict[str, str]:
    return dict(value or {})


@attrs.frozen
class ExperimentQuery:
    """Which experiments to list: all active ones whose tags equal ``tags``, newest first.

    ``exclude_names`` drops experiments by name; ``created_before_ms`` keeps only those created
    strictly before that time (milliseconds since the epoch); ``include_deleted`` lists
    deleted ones too (MLflow keeps a deleted experiment, renamed, until ``mlflow gc``).
    """

    tags: Mapping[str, str] = attrs.field(factory=dict, converter=_dict)
    exclude_names: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    created_before_ms: int | None = None
    include_deleted: bool = False


@attrs.frozen
class RunQuery:
    """Which runs to list, filtered on the server.

    - ``statuses``: any of these (empty: any status);
    - ``tags`` / ``params``: equality on each key;
    - ``has_metric``: only runs that logged this metric;
    - ``order_by_metric``: newest value of that metric, descending unless ``ascending``;
      runs without it come last. Ties keep the store's order (callers that need a
      deterministic order break ties themselves);
    - ``max_results``: at most this many (None: all, paged by the store);
    - ``include_deleted``: deleted runs too (those of a deleted experiment, until ``mlflow gc``).
    """

    experiment_ids: tuple[str, ...] = attrs.field(converter=_tuple)
    statuses: tuple[RunStatus, ...] = attrs.field(default=(), converter=_tuple)
    tags: Mapping[str, str] = attrs.field(factory=dict, converter=_dict)
    params: Mapping[str, str] = attrs.field(factory=dict, converter=_dict)
    run_name: str | None = None
    has_metric: str | None = None
    order_by_metric: str | None = None
    ascending: bool = False
    max_results: int | None = None
    include_deleted: bool = False


@attrs.frozen
class IncompleteUpload:
    """An upload that was started and neither completed nor aborted (an S3 multipart upload
    whose writer was killed). Its parts cost storage but no object listing shows them.

    ``uri`` is the object it would have created; ``initiated_ms`` when it was started
    (milliseconds since the epoch), if the store says.
    """

    uri: str
    upload_id: str
    initiated_ms: int | None = None


class ProgressCallback(Protocol):
    """Called with ``(bytes_done, bytes_total)`` during a transfer."""

    def __call__(self, done: int, total: int) -> None: ...


class TrackingStore(abc.ABC):
    """Experiments and runs, with params, metrics and tags (MLflow in the shipped backends)."""

    uri: str

    # -- experiments ------------------------------------------------------------------
    @abc.abstractmethod
    def get_experiment(self, experiment_id: str) -> ExperimentRecord | None:
        """The experiment with that id, active or deleted; None if there is none."""

    @abc.abstractmethod
    def get_experiment_by_name(self, name: str) -> ExperimentRecord | None:
        """The *active* experiment with that name; None if there is none."""

    @abc.abstractmethod
    def create_experiment(
        self, name: str, artifact_location: str, tags: Mapping[str, str]
    ) -> ExperimentRecord:
        """Create an active experiment named ``name``.

        A deleted experiment holding the name is renamed out of the way first, so a name
        that was cleaned up never blocks creating it again. If an *active* experiment with
        that name already exists (another worker won the race), it is returned unchanged.
        """

    @abc.abstractmethod
    def search_experiments(
        self, query: ExperimentQuery, max_results: int, page_token: str | None = None
    ) -> tuple[list[ExperimentRecord], str | None]:
        """A page of active experiments matching ``query``, newest first, and the next token."""

    @abc.abstractmethod
    def delete_experiment(self, experiment_id: str) -> None:
        """Delete (MLflow: move to the deleted stage) and free its name for reuse."""

    @abc.abstractmethod
    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        """Set (or overwrite) one tag of an active experiment."""

    # -- runs ---------------------------------------------------------------------------
    @abc.abstractmethod
    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> RunRecord:
        """Create a RUNNING run."""

    @abc.abstractmethod
    def get_run(self, run_id: str) -> RunRecord | None:
        """The run (latest metric values included); None if it does not exist or is deleted."""

    @abc.abstractmethod
    def search_runs(self, query: RunQuery) -> list[RunRecord]:
        """Active (not deleted) runs matching ``query``, filtered and ordered by the server."""

    @abc.abstractmethod
    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[MetricValue] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Log metrics, params and tags in as few requests as the store allows.

        Idempotent for metrics: logging the same (name, value, step, timestamp) twice
        records it once, so a retried batch never double-counts.

        Params are write-once: logging an existing key again with the same value is accepted,
        with a different value it raises :class:`~tracker_core.errors.TrackingStoreError` (and
        of two workers writing one new key at once, exactly one succeeds). Run leases
        (:mod:`tracker_core.leases`) rely on it.
        """

    @abc.abstractmethod
    def get_metric_history(self, run_id: str, key: str) -> list[MetricValue]:
        """Every logged value of one metric of a run, in step then timestamp order."""

    @abc.abstractmethod
    def set_terminated(self, run_id: str, status: RunStatus) -> None:
        """Set a run's final status (FINISHED, FAILED or KILLED) and end time."""

    @abc.abstractmethod
    def delete_run(self, run_id: str) -> None:
        """Delete a run (used to drop the loser of a duplicate-creation race)."""

    @abc.abstractmethod
    def delete_tag(self, run_id: str, key: str) -> None:
        """Remove a tag from a run; no error if it is absent."""

    # -- derived ------------------------------------------------------------------------
    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.log_batch(run_id, (), None, tags)

    def iter_experiments(
        self, query: ExperimentQuery, page_size: int = 25
    ) -> Iterator[ExperimentRecord]:
        """Every experiment matching ``query``, newest first, fetched a page at a time."""
        token: str | None = None
        while True:
            page, token = self.search_experiments(query, page_size, token)
            yield from page
            if not token:
                return

    def has_runs(self, experiment_id: str, statuses: Sequence[RunStatus]) -> bool:
        """Whether any run of the experiment has one of ``statuses`` (one cheap query)."""
        return bool(
            self.search_runs(RunQuery((experiment_id,), statuses=tuple(statuses), max_results=1))
        )

    def classify_error(self, exc: BaseException) -> bool | None:
        """True if ``exc`` is transient (worth a retry), False if permanent, None if unknown."""
        return None

    def open_registry(self) -> RegistryStore | None:
        """The model registry beside this store (:mod:`tracker_core.registry_store`), or None
        if it has none (the default); promotion needs one."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default has nothing to release."""


def slugify(name: str) -> str:
    """A path-safe experiment name: ``"p / iteration / a / b"`` -> ``"p--iteration--a--b"``."""
    slug = re.sub(r"\s*/\s*", "--", name.strip())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", slug)
    return slug.strip("-_.") or "experiment"


class ArtifactStore(abc.ABC):
    """Where model files live. URIs are absolute (``file:///...``, ``s3://...``, ``gs://...``).

    Writes of one model directory are not atomic; the manager makes them safe by marking a
    model on the tracking side only after :meth:`upload_dir` returned, and by never serving an
    unmarked model.
    """

    #: root URI of this store; experiments get their artifact location below it
    root: str

    @abc.abstractmethod
    def upload_dir(
        self, local_dir: Path, uri: str, progress: ProgressCallback | None = None
    ) -> None:
        """Copy a local directory tree to ``uri``, replacing whatever was there."""

    @abc.abstractmethod
    def download_dir(
        self,
        uri: str,
        local_dir: Path,
        progress: ProgressCallback | None = None,
        *,
        files: Mapping[str, int] | None = None,
    ) -> None:
        """Copy the tree at ``uri`` into ``local_dir``; ModelNotFoundError if there is none.

        ``files`` (relative path -> size), when the caller knows them (a model's manifest),
        spares the listing: exactly those files are copied.
        """

    @abc.abstractmethod
    def delete_tree(self, uri: str) -> bool:
        """Delete every object under ``uri``; True when nothing is left (or nothing was there)."""

    @abc.abstractmethod
    def exists(self, uri: str) -> bool:
        """Whether any object exists under ``uri``."""

    @abc.abstractmethod
    def find_dirs(self, uri: str, name: str, max_depth: int) -> list[str]:
        """URIs of directories called ``name`` at most ``max_depth`` levels below ``uri``."""

    # -- optional, with defaults for stores that have nothing to report ----------------------
    #: whether folders are real (a local disk): they exist on their own, empty or not, and
    #: are removed explicitly. Object stores (S3, GCS) have none: a "folder" is a key prefix.
    has_directories: bool = False

    def check_root(self) -> None:  # noqa: B027 - optional hook
        """Raise :class:`~tracker_core.errors.ArtifactStoreError` if :attr:`root` cannot hold
        models because what must exist before the first write is missing (a bucket). A
        missing prefix or folder is not an error: the first write creates it. The default
        cannot tell and checks nothing."""

    def list_incomplete_uploads(self, uri: str) -> list[IncompleteUpload]:
        """Uploads under ``uri`` that were started and never completed or aborted.

        Only stores whose interrupted writes leave hidden parts behind have any (S3 multipart
        uploads); the default finds none (a local file, a GCS resumable upload)."""
        return []

    def abort_upload(self, upload: IncompleteUpload) -> None:
        """Abort one upload found by :meth:`list_incomplete_uploads`, freeing its parts; no
        error if it is already gone. The default, for stores that list none, refuses."""
        raise ArtifactStoreError(f"{type(self).__name__} cannot abort uploads ({upload.uri})")

    def remove_empty_folders(self, uri: str, stop: str) -> None:  # noqa: B027 - optional hook
        """Remove the folder at ``uri`` and its parents while they are empty, up to ``stop``
        (exclusive; never above :attr:`root`). Only stores with real folders
        (:attr:`has_directories`) have any; the default does nothing."""

    # -- derived ------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        out = self.root.rstrip("/")
        for part in parts:
            out = f"{out}/{part.strip('/')}"
        return out

    def experiment_location(self, experiment_name: str, unique: str) -> str:
        """Artifact location of a new experiment: a readable, unique folder under :attr:`root`
        (the readable part is cut to 150 characters: ``unique`` keeps it unique, and folder
        names stay well within the filesystems' 255-byte limit)."""
        return self.join(f"{slugify(experiment_name)[:150]}-{unique}")

    def owns(self, uri: str) -> bool:
        """Whether ``uri`` lies under this store's root."""
        return uri.rstrip("/") == self.root.rstrip("/") or uri.startswith(
            self.root.rstrip("/") + "/"
        )

    def classify_error(self, exc: BaseException) -> bool | None:
        """True if ``exc`` is transient (worth a retry), False if permanent, None if unknown."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default has nothing to release."""
