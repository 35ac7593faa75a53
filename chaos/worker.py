"""One soak worker: a real process that trains its runs through tracker-core's public API.

Started by the soak runner (``chaos.soak``) with a JSON config; it writes an fsync'd journal
(:mod:`chaos.journal`) of what it logs and saves, and may be armed with one **kill point**: a
named moment at which it kills itself with ``SIGKILL`` (exactly ``kill -9``), after journaling
where (:mod:`chaos.kills`: the kill points and how they are armed). The runner also kills
workers from outside at random moments.

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
import json
import logging
import os
import sys
import traceback
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
from chaos.kills import KILL_POINTS, Killer, arm
from tracker_core import FineTuningIteration, MetricValue, RetryConfig, RetryParams
from tracker_core.errors import CleanupRefusedError
from tracker_core.finetune import run_iteration
from tracker_core.methods import FineTuningMethod, connect_kwargs

__all__ = ["KILL_POINTS", "S3_PART_SIZE", "main"]

log = logging.getLogger("chaos.worker")

EXIT_ERROR = 3
#: the soak's S3 multipart part size (the S3 store's default is 8 MiB)
S3_PART_SIZE = 5 * 2**20


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
