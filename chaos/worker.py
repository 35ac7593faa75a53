"""One soak worker: a real process that trains its runs through tracker-core's public API.

Started by the soak runner (``chaos.soak``) with a JSON config; it writes an fsync'd journal
(:mod:`chaos.journal`) of what it logs and saves, and may be armed with one **kill point**: a
named moment at which it kills itself with ``SIGKILL`` (exactly ``kill -9``), after journaling
where. Kill points are armed by wrapping the manager's two stores and its public methods in
this process (the library has no test hooks):

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

Two shapes of work:

- ``one``: the README quick start. Every worker uploads the initial model (once between
  them), joins one iteration, downloads the last best model, trains its own runs with
  ``with manager.run(params)``, then calls ``delete_previous_iteration()``.
- ``sequence``: :func:`tracker_core.finetune.run_iteration` with a fine-tuning method (with a
  holdout: each completion promotes or rejects, the next iteration starts from the champion);
  all workers run the same batch, sharing its runs through their leases.

After the ``one`` shape's load, the *promotion step* (config ``step`` = ``promote``): a process
concludes the iteration as a hand-written loop does (``mgr.promote`` with the soak's holdout,
:func:`chaos.workload.holdout`), killed at a ``promote.*`` point and restarted; then two more
conclude it again at once (repeated completions).

Exit status: 0 done, 3 an operation failed (journaled as ``error``), -9 killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# heavy imports at module level: the runner's forkserver preloads this module once
import gcsfs.core  # noqa: F401
import mlflow  # noqa: F401
import s3fs  # noqa: F401
import torch  # noqa: F401

import tracker_core
from chaos import workload as W
from chaos.journal import Journal
from tracker_core import FineTuningIteration, MetricValue, RetryConfig, RetryParams
from tracker_core import tags as T
from tracker_core.errors import CleanupRefusedError
from tracker_core.finetune import run_iteration
from tracker_core.methods import FineTuningMethod, connect_kwargs
from tracker_core.values import RunStatus

__all__ = ["KILL_POINTS", "main"]

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
EXIT_ERROR = 3
#: the soak's S3 multipart part size (the S3 store's default is 8 MiB)
S3_PART_SIZE = 5 * 2**20


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


# ---------------------------------------------------------------------- connecting
def storage_options(config: dict[str, Any]) -> dict[str, Any]:
    """Storage options pointing at the fault proxy, with short client timeouts."""
    endpoint = config["storage_endpoint"]
    timeout = config["storage_timeout"]
    if config["storage"] == "s3":
        return {
            "endpoint_url": endpoint,
            "key": "testing",
            "secret": "testing",
            # S3's smallest part: the large model (~11 MiB) goes up in three multipart parts
            "default_block_size": S3_PART_SIZE,
            "config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout},
        }
    import aiohttp

    return {
        "endpoint_url": endpoint,
        "token": "anon",
        "project": "test",
        "requests_timeout": aiohttp.ClientTimeout(
            total=None, sock_connect=timeout, sock_read=timeout
        ),
    }


def retry_config(config: dict[str, Any]) -> RetryConfig:
    """More attempts for whole-folder operations: each attempt is several requests (a GCS
    delete_tree is ~7), and any failed one fails the attempt."""
    folders = RetryParams(*config["retry_transfers"])
    return RetryConfig(
        RetryParams(*config["retry"]),
        {"upload_model": folders, "download_model": folders, "delete_model": folders},
    )


def connect(config: dict[str, Any], **kwargs: Any) -> tracker_core.ExperimentsManager:
    return tracker_core.connect(
        config["artifact_uri"],
        tracking_uri=config["tracking_uri"],
        storage_options=storage_options(config),
        retry=retry_config(config),
        keep=config["keep"],
        lease_seconds=config["lease_seconds"],
        **kwargs,
    )


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


def params_of(config: dict[str, Any]) -> list[W.SoakParams]:
    return [W.SoakParams(worker=w, index=i, lr=lr) for w, i, lr in config["params"]]


# ---------------------------------------------------------------------- the runs
class Trainer:
    """Logs a run's loss curve and returns its model, journaling first."""

    def __init__(self, config: dict[str, Any], journal: Journal) -> None:
        self.config, self.journal = config, journal
        self.seed, self.batch = config["seed"], config["batch"]

    def score(self, params: W.SoakParams) -> float:
        return W.score(
            self.seed, self.batch, params, self.config["runs_per_worker"], self.config["trend"]
        )

    def train(self, manager: Any, params: W.SoakParams) -> Any:
        points = W.loss_points(
            self.seed, self.batch, params, self.config["base_ts"], self.config["loss_points"]
        )
        self.journal.write("metrics", run=params.id, run_id=manager.current_run_id, points=points)
        for name, step, ts, value in points:
            manager.save_metric(MetricValue(name, value, step=step, timestamp_ms=ts))
        large = W.is_large(self.seed, self.batch, params, self.config["large_fraction"])
        return W.make_model(self.seed, self.batch, params, large)


def connect_one(config: dict[str, Any], journal: Journal, killer: Killer) -> Any:
    """The manager of the quick start's shape (``state_dict`` models), kill points armed."""
    manager = connect(
        config,
        main_metric=W.MAIN_METRIC,
        plugin_name=config["plugin"],
        params_type=W.SoakParams,
        model_format="state_dict",
        model_factory=W.any_linear,
    )
    arm(manager, killer, journal, "delete_previous_iteration")
    return manager


def run_one(config: dict[str, Any], journal: Journal, killer: Killer) -> None:
    """The README quick start, for this worker's own params."""
    trainer = Trainer(config, journal)
    manager = connect_one(config, journal, killer)
    uploaded = manager.upload_initial_model(W.initial_model(config["seed"]))
    journal.write("initial", uploaded=uploaded)
    manager.set_iteration(
        FineTuningIteration(plugin_name=config["plugin"], batch_id=config["batch"])
    )
    start = manager.download_last_model()
    journal.write("start_model", tensors=sorted(start.state_dict()))
    wait = config["lease_seconds"] * 3
    for params in params_of(config):
        with manager.run(params, wait=wait) as run:
            if run.finished:
                journal.write("skipped", run=params.id, run_id=run.run_id)
                continue
            journal.write("resumed_or_new", run=params.id, run_id=run.run_id)
            model = trainer.train(manager, params)
            value = trainer.score(params)
            journal.write("main", run=params.id, run_id=run.run_id, value=value)
            manager.save_metric(
                MetricValue(W.MAIN_METRIC, value, step=0, timestamp_ms=config["base_ts"])
            )
            saved = manager.save_model(model)
            journal.write("saved", run=params.id, run_id=run.run_id, saved=saved)
        journal.write("finished", run=params.id, run_id=run.run_id)
    try:
        manager.delete_previous_iteration()
        journal.write("cleanup", result="deleted")
    except CleanupRefusedError as exc:
        journal.write("cleanup", result=f"refused: {type(exc).__name__}: {exc}")
    manager.finish_iteration()
    manager.close()


def run_promote(config: dict[str, Any], journal: Journal, killer: Killer) -> None:
    """The promotion step: conclude the iteration as a hand-written loop does."""
    manager = connect_one(config, journal, killer)
    manager.set_iteration(
        FineTuningIteration(plugin_name=config["plugin"], batch_id=config["batch"])
    )
    conclusion = manager.promote(W.holdout)
    decision = conclusion.decision
    journal.write("promotion", decision=decision.to_json() if decision else None)
    manager.finish_iteration()
    manager.close()


class SoakMethod(FineTuningMethod[W.SoakParams]):
    """The soak's fine-tuning method for the driver: trains nothing, logs the run's curve."""

    params_type = W.SoakParams
    main_metric = W.MAIN_METRIC  # the backend's default format (mlflow.pytorch)

    def __init__(self, config: dict[str, Any], journal: Journal) -> None:
        self.name = config["plugin"]
        self.config, self.journal = config, journal
        self.trainer = Trainer(config, journal)

    def initial_model(self) -> Any:
        return W.initial_model(self.config["seed"])

    def initial_params(self, seed: int | None = None) -> list[W.SoakParams]:
        return params_of(self.config)

    def train(self, model: Any, params: W.SoakParams, manager: Any) -> Any:
        self.journal.write("train", run=params.id, start_tensors=sorted(model.state_dict()))
        return self.trainer.train(manager, params)

    def evaluate_holdout(self, model: Any) -> float:
        """The fixed holdout: the driver promotes at completion, and starts from the champion."""
        return W.holdout(model)

    def evaluate(self, model: Any, params: W.SoakParams, manager: Any) -> float:
        value = self.trainer.score(params)
        self.journal.write("main", run=params.id, run_id=manager.current_run_id, value=value)
        return value


def run_sequence(config: dict[str, Any], journal: Journal, killer: Killer) -> None:
    """One iteration of the driver (every worker of the trial runs the same batch)."""
    method = SoakMethod(config, journal)
    manager = connect(config, n_top_runs=len(config["params"]), **connect_kwargs(method))
    arm(manager, killer, journal, "delete_iteration")
    result = run_iteration(method, manager, config["batch"], seed=config["seed"])
    journal.write(
        "iteration",
        experiment_id=result.experiment_id,
        start_run_id=result.start_run_id,
        best_run_id=result.best_run_id,
        deleted=result.deleted_iteration_id,
        trained=[r.params.id for r in result.trained_runs],
        failed=[r.params.id for r in result.failed_runs],
    )
    manager.close()


def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    # MLflow prints run links on stdout: everything this process says goes to the trial's log
    out = os.open(config["log_path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    logging.basicConfig(
        filename=config["log_path"],
        level=logging.WARNING,
        format=f"%(asctime)s w{config['worker']}.{config['incarnation']} %(levelname)s "
        "%(name)s: %(message)s",
    )
    logging.getLogger("tracker_core").setLevel(logging.INFO)
    journal = Journal(
        Path(config["journal_path"]),
        w=config["worker"],
        inc=config["incarnation"],
        batch=config["batch"],
    )
    journal.write("start", pid=os.getpid(), armed=config["arm"], batch=config["batch"])
    killer = Killer(journal, config["arm"])
    try:
        if config.get("step") == "promote":
            run_promote(config, journal, killer)
        elif config["shape"] == "one":
            run_one(config, journal, killer)
        else:
            run_sequence(config, journal, killer)
    except BaseException as exc:
        log.error("worker failed:\n%s", traceback.format_exc())
        journal.write("error", error=f"{type(exc).__name__}: {exc}"[:2000])
        logging.shutdown()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(EXIT_ERROR)
    journal.write("done")
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
