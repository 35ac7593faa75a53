"""What the chaos audit knows and reads: the invariants it checks (:data:`INVARIANTS`, in the
order of the soak's table), what the runner knows about a trial (:class:`TrialFacts`), and
the trial's servers and bucket read directly (:class:`TrialView`).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any

import attrs

from chaos import workload as W

__all__ = ["INVARIANTS", "Check", "TrialFacts", "TrialView", "same_state", "storage_fs", "strip"]

#: (key, what the table says)
INVARIANTS = (
    ("workers_done", "every worker finished (restarts included)"),
    ("ops_completed", "every operation completed despite faults"),
    ("runs_finished", "one FINISHED run per params set, params intact"),
    (
        "started_from_best",
        "each iteration started from the champion (the previous best if promoted)",
    ),
    ("top_keep", "exactly the true top-keep models remain"),
    ("byte_identical", "kept models byte-identical to what their runs saved"),
    ("downloads", "every marked model downloads, right weights"),
    ("metrics_exact", "no metric point lost or logged twice"),
    ("finished_has_main", "no run FINISHED without its main metric"),
    ("initial_intact", "initial model intact"),
    (
        "champion",
        "the champion is the holdout-best of the promoted models, one version per run, "
        "downloads byte-identical",
    ),
    ("gc_completed", "gc --delete completed under faults"),
    ("no_orphans", "zero orphaned objects after gc --delete"),
    ("no_open_uploads", "zero incomplete multipart uploads after gc --delete"),
)


@attrs.define
class Check:
    held: bool | None = True  # None: does not apply to this trial
    problems: list[str] = attrs.field(factory=list)

    def fail(self, problem: str) -> None:
        self.held = False
        if len(self.problems) < 20:
            self.problems.append(problem)


@attrs.frozen
class TrialFacts:
    """What the runner knows about a trial."""

    seed: int
    shape: str
    storage: str
    keep: int
    plugin: str
    bucket: str
    artifact_uri: str
    tracking_uri: str  # direct, not the proxy
    storage_endpoint: str  # direct
    batches: tuple[str, ...]
    params: tuple[tuple[int, int, float], ...]  # per batch: the same params sets
    runs_per_worker: int
    trend: bool
    large_fraction: float
    base_ts: int
    journals: tuple[dict[str, Any], ...]
    workers_done: bool
    worker_problems: tuple[str, ...]
    gc_ok: bool
    gc_problem: str


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def storage_fs(storage: str, endpoint: str) -> Any:
    """The filesystem of a bucket on moto or the emulator, reached directly."""
    if storage == "s3":
        from tracker_core_s3 import s3_filesystem

        return s3_filesystem({"endpoint_url": endpoint, "key": "testing", "secret": "testing"})
    from tracker_core_gcs import gcs_filesystem

    return gcs_filesystem({"endpoint_url": endpoint, "token": "anon", "project": "test"})


def strip(uri: str) -> str:
    return uri.split("://", 1)[-1].rstrip("/")


def same_state(got: Any, expected: dict[str, Any]) -> bool:
    import torch

    state = got.state_dict() if hasattr(got, "state_dict") else got
    return set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in state)


class TrialView:
    """What the audit reads a trial through, directly (not through the fault proxies): the
    tracking server (MLflow's client and a manager), the bucket, and the workload's params,
    scores and journaled uploads; and the checks it fills."""

    def __init__(self, facts: TrialFacts) -> None:
        from mlflow import MlflowClient

        import tracker_core

        self.facts = facts
        self.client = MlflowClient(facts.tracking_uri)
        self.fs = storage_fs(facts.storage, facts.storage_endpoint)
        options: dict[str, Any] = {"endpoint_url": facts.storage_endpoint}
        if facts.storage == "s3":
            options |= {"key": "testing", "secret": "testing"}
        else:
            options |= {"token": "anon", "project": "test"}
        self.manager = tracker_core.connect(
            facts.artifact_uri,
            tracking_uri=facts.tracking_uri,
            storage_options=options,
            plugin_name=facts.plugin,
            main_metric=W.MAIN_METRIC,
            params_type=W.SoakParams,
            model_factory=W.any_linear,  # for the state_dict models of shape "one"
        )
        self.checks = {key: Check() for key, _ in INVARIANTS}
        self.params = [W.SoakParams(worker=w, index=i, lr=lr) for w, i, lr in facts.params]
        self.uploads: dict[str, list[dict[str, str]]] = defaultdict(list)
        for record in facts.journals:
            if record["ev"] == "upload":
                self.uploads[strip(record["uri"])].append(record["files"])

    def experiments(self) -> list[Any]:
        """Every iteration experiment of the plugin, active or deleted, oldest first."""
        from mlflow.entities import ViewType

        found = self.client.search_experiments(
            view_type=ViewType.ALL,
            filter_string=f"tags.`tracker.plugin` = '{self.facts.plugin}'",
            max_results=1000,
        )
        return sorted(found, key=lambda e: (e.creation_time, int(e.experiment_id)))

    def runs(self, experiment_id: str) -> list[Any]:
        from mlflow.entities import ViewType

        return list(
            self.client.search_runs([experiment_id], run_view_type=ViewType.ALL, max_results=5000)
        )

    def score(self, batch: str, params: W.SoakParams) -> float:
        f = self.facts
        return W.score(f.seed, batch, params, f.runs_per_worker, f.trend)

    def remote_files(self, uri: str) -> dict[str, str]:
        """``{relative path: sha256}`` of the files under ``uri``."""
        base = strip(uri)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return {}
        return {p[len(base) :].lstrip("/"): sha(self.fs.cat_file(p)) for p in found}

    def close(self) -> None:
        self.manager.close()
