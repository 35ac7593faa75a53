"""Kill points: named moments at which a soak worker kills itself with ``SIGKILL`` (exactly
``kill -9``), after journaling where. :func:`arm` arms them by wrapping the manager's stores
and its public methods in the worker's process (the library has no test hooks):

==========================================  ==============================================
``upload_initial_model.upload``             initial model upload in flight (a file stored)
``upload_initial_model.before_mark``        initial model written, not marked
``upload_initial_model.before_finish``      initial model marked, its run not ended
``set_run.after_create``                    a run created, its params not logged yet
``save_model.upload``                       upload in flight: a file stored, others not yet,
                                            or the first S3 multipart part of a large model
``save_model.before_mark``                  model written, not marked
``save_model.after_mark``                   model marked, before pruning
``save_model.prune_after_unmark``           a worse model unmarked, its files not deleted
``save_model.prune_after_delete``           a worse model's files deleted (more may follow)
``finish_run.prune_after_unmark``           a run ended FINISHED, a worse model unmarked
``finish_run.prune_after_delete``           a run ended, a worse (or its own FAILED) model's
                                            files deleted
``<cleanup>.after_unmark``                  iteration cleanup: a model unmarked
``<cleanup>.after_delete_files``            iteration cleanup: a model's files deleted
``<cleanup>.before_delete_experiment``      iteration cleanup: models gone, experiment not
``driver.between_runs``                     a run ended FINISHED, the next not started
``promote.after_register``                  promotion: the challenger's version created,
                                            no alias moved
``promote.after_alias``                     promotion: the champion alias moved, the
                                            version's tags and the decision not written
``promote.before_decision``                 promotion: all done but the decision on the run
==========================================  ==============================================

``<cleanup>`` is ``delete_previous_iteration`` (the "one iteration" shape, where every worker
ends like the README's quick start) or ``delete_iteration`` (the driver's step 7, in the
"sequence" shape). The runner also kills workers from outside at random moments.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chaos.journal import Journal
from tracker_core import MetricValue
from tracker_core import tags as T
from tracker_core.values import RunStatus

__all__ = ["KILL_POINTS", "Killer", "arm"]

log = logging.getLogger("chaos.worker")

_COMMON_POINTS = (
    "upload_initial_model.upload",
    "upload_initial_model.before_mark",
    "upload_initial_model.before_finish",
    "set_run.after_create",
    "save_model.upload",
    "save_model.before_mark",
    "save_model.after_mark",
    "save_model.prune_after_unmark",
    "save_model.prune_after_delete",
    "finish_run.prune_after_unmark",
    "finish_run.prune_after_delete",
    "driver.between_runs",
)
_CLEANUP_POINTS = ("after_unmark", "after_delete_files", "before_delete_experiment")
#: the public methods that prune an iteration's models (their deletions are prune steps)
_PRUNING_PHASES = ("save_model", "finish_run")
_PROMOTE_POINTS = ("after_register", "after_alias", "before_decision")
#: the kill points of each shape, and of the promotion step
KILL_POINTS = {
    "one": (*_COMMON_POINTS, *(f"delete_previous_iteration.{p}" for p in _CLEANUP_POINTS)),
    "sequence": (
        *_COMMON_POINTS,
        *(f"delete_iteration.{p}" for p in _CLEANUP_POINTS),
        *(f"promote.{p}" for p in _PROMOTE_POINTS),
    ),
    "promote": tuple(f"promote.{p}" for p in _PROMOTE_POINTS),
}


class Killer:
    """Where this process is (the public method it is inside) and its armed kill point."""

    def __init__(self, journal: Journal, armed: str | None) -> None:
        self.journal = journal
        self.armed = armed
        self.phase: str | None = None
        self.mid_upload: str | None = None  # kill once an upload is partly sent
        self._files_left = 0

    def hit(self, point: str) -> None:
        if point == self.armed:
            self.die(point)

    def die(self, point: str) -> None:
        self.journal.write("kill", point=point)
        os.kill(os.getpid(), signal.SIGKILL)

    def at(self, step: str) -> None:
        """A step of the current public method (``<phase>.<step>``)."""
        if self.phase is not None:
            self.hit(f"{self.phase}.{step}")

    # -- uploads in flight ----------------------------------------------------------------
    def upload_starts(self, files: int) -> None:
        point = f"{self.phase}.upload"
        self.mid_upload = point if point == self.armed else None
        self._files_left = files

    def upload_ends(self) -> None:
        self.mid_upload = None

    def after_file(self) -> None:
        """A file of the upload is stored: die if others are still to come (or in flight)."""
        self._files_left -= 1
        if self.mid_upload is not None and self._files_left > 0:
            self.die(self.mid_upload)

    def after_part(self) -> None:
        if self.mid_upload is not None:
            self.die(self.mid_upload)


class KillingTracking:
    """The manager's tracking store, with the kill points of the tracking side."""

    def __init__(self, store: Any, killer: Killer) -> None:
        self._store, self._killer = store, killer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[MetricValue] = (),
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        tags = tags or {}
        if "tracker.promotion" in tags:
            self._killer.hit("promote.before_decision")
        marking = tags.get(T.TAG_MODEL_UPLOADED) == T.TRUE
        unmarking = tags.get(T.TAG_MODEL_DELETED) == T.TRUE
        if marking:
            self._killer.at("before_mark")
        self._store.log_batch(run_id, metrics, params, tags)
        if marking:
            self._killer.at("after_mark")
        if unmarking:
            pruning = self._killer.phase in _PRUNING_PHASES
            self._killer.at("prune_after_unmark" if pruning else "after_unmark")

    def create_run(self, *args: Any, **kwargs: Any) -> Any:
        run = self._store.create_run(*args, **kwargs)
        self._killer.hit("set_run.after_create")
        return run

    def set_terminated(self, run_id: str, status: RunStatus) -> None:
        self._killer.at("before_finish")
        self._store.set_terminated(run_id, status)
        if self._killer.phase is None and status == RunStatus.FINISHED:
            self._killer.hit("driver.between_runs")

    def delete_experiment(self, experiment_id: str) -> None:
        self._killer.at("before_delete_experiment")
        self._store.delete_experiment(experiment_id)


class KillingRegistry:
    """The manager's model registry, with the kill points of a promotion."""

    def __init__(self, store: Any, killer: Killer) -> None:
        self._store, self._killer = store, killer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._killer.hit("promote.after_register")
        self._store.set_alias(name, alias, version)

    def set_version_tags(self, name: str, version: str, tags: Any) -> None:
        self._killer.hit("promote.after_alias")
        self._store.set_version_tags(name, version, tags)


class KillingArtifacts:
    """The manager's artifact store, with the kill points of the storage side; journals the
    SHA-256 of every file of every model it uploads."""

    def __init__(self, store: Any, killer: Killer, journal: Journal) -> None:
        self._store, self._killer, self._journal = store, killer, journal
        fs = store.fs
        if getattr(fs, "async_impl", False):  # S3, GCS: the store awaits ``_put_file``
            put_file_async = fs._put_file

            async def put_file_async_killing(*args: Any, **kwargs: Any) -> Any:
                out = await put_file_async(*args, **kwargs)
                killer.after_file()
                return out

            fs._put_file = put_file_async_killing
        else:
            put_file = fs.put_file

            def put_file_killing(*args: Any, **kwargs: Any) -> Any:
                out = put_file(*args, **kwargs)
                killer.after_file()
                return out

            fs.put_file = put_file_killing
        call_s3 = getattr(fs, "_call_s3", None)
        if call_s3 is not None:

            async def call_s3_killing(method: Any, *args: Any, **kwargs: Any) -> Any:
                out = await call_s3(method, *args, **kwargs)
                if method == "upload_part":
                    killer.after_part()
                return out

            fs._call_s3 = call_s3_killing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def upload_dir(self, local_dir: Path, uri: str, progress: Any = None) -> None:
        files = {
            p.relative_to(local_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(local_dir).rglob("*"))
            if p.is_file()
        }
        self._journal.write("upload", uri=uri, files=files, phase=self._killer.phase)
        self._killer.upload_starts(len(files))
        try:
            self._store.upload_dir(local_dir, uri, progress)
        finally:
            self._killer.upload_ends()

    def delete_tree(self, uri: str) -> bool:
        deleted: bool = self._store.delete_tree(uri)
        pruning = self._killer.phase in _PRUNING_PHASES
        self._killer.at("prune_after_delete" if pruning else "after_delete_files")
        return deleted


def _phased(manager: Any, killer: Killer, method: str, phase: str) -> None:
    """Make ``manager.<method>`` set the killer's phase while it runs."""
    original: Callable[..., Any] = getattr(manager, method)

    def call(*args: Any, **kwargs: Any) -> Any:
        outer, killer.phase = killer.phase, phase
        try:
            return original(*args, **kwargs)
        finally:
            killer.phase = outer

    setattr(manager, method, call)


def arm(manager: Any, killer: Killer, journal: Journal, cleanup: str) -> None:
    manager.tracking.wrap(lambda store: KillingTracking(store, killer))
    manager.artifacts.wrap(lambda store: KillingArtifacts(store, killer, journal))
    if manager.registry is not None:
        manager.registry.wrap(lambda store: KillingRegistry(store, killer))
    _phased(manager, killer, "upload_initial_model", "upload_initial_model")
    _phased(manager, killer, "save_model", "save_model")
    _phased(manager, killer, "finish_run", "finish_run")
    _phased(manager, killer, "delete_previous_iteration", cleanup)
    _phased(manager, killer, "delete_iteration", cleanup)
    _phased(manager, killer, "delete_pending_iterations", cleanup)
