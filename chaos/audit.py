"""The audit after a trial: the servers' state against the workers' journals and the workload.

Reads the tracking server and the bucket *directly* (not through the fault proxies). Each check
returns whether it held and, if not, what was wrong; :data:`INVARIANTS` names them in the order
of the soak's table.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from chaos import workload as W

__all__ = ["INVARIANTS", "Check", "TrialFacts", "audit", "storage_fs"]

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


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def storage_fs(storage: str, endpoint: str) -> Any:
    """The filesystem of a bucket on moto or the emulator, reached directly."""
    if storage == "s3":
        from tracker_core_s3 import s3_filesystem

        return s3_filesystem({"endpoint_url": endpoint, "key": "testing", "secret": "testing"})
    from tracker_core_gcs import gcs_filesystem

    return gcs_filesystem({"endpoint_url": endpoint, "token": "anon", "project": "test"})


def _strip(uri: str) -> str:
    return uri.split("://", 1)[-1].rstrip("/")


def _same_state(got: Any, expected: dict[str, Any]) -> bool:
    import torch

    state = got.state_dict() if hasattr(got, "state_dict") else got
    return set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in state)


class _Auditor:
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
                self.uploads[_strip(record["uri"])].append(record["files"])

    # -- helpers ---------------------------------------------------------------------------
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
        base = _strip(uri)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return {}
        return {p[len(base) :].lstrip("/"): _sha(self.fs.cat_file(p)) for p in found}

    # -- the checks --------------------------------------------------------------------------
    def run(self) -> dict[str, Check]:
        f = self.facts
        c = self.checks
        if not f.workers_done:
            for problem in f.worker_problems:
                c["workers_done"].fail(problem)
        errors = [r for r in f.journals if r["ev"] == "error"]
        for record in errors:
            c["ops_completed"].fail(f"w{record['w']}.{record['inc']}: {record['error'][:300]}")
        if not f.gc_ok:
            c["gc_completed"].fail(f.gc_problem)
        if f.shape != "sequence":
            c["started_from_best"].held = None
        if f.storage != "s3":
            c["no_open_uploads"].held = None

        experiments = self.experiments()
        by_batch: dict[str, Any] = {}
        initial = None
        for exp in experiments:
            kind = exp.tags.get("tracker.kind")
            if kind == "initial":
                initial = exp
            elif kind == "iteration":
                batch = exp.tags.get("tracker.batch_id", "")
                if batch in by_batch and exp.lifecycle_stage == "active":
                    c["runs_finished"].fail(f"two iterations of batch {batch}")
                if batch not in by_batch or exp.lifecycle_stage == "active":
                    by_batch[batch] = exp
        final_batch = f.batches[-1]
        kept_uris: set[str] = set()
        aliased = self.aliased_runs()
        for batch in f.batches:
            exp = by_batch.get(batch)
            if exp is None:
                c["runs_finished"].fail(f"no iteration for batch {batch}")
                continue
            # an iteration holding the champion's or the rollback model is kept, and one
            # whose model lost its alias in the last completion waits for the next cleanup;
            # the pending tag stays on an iteration once deleted (a deletion is marked
            # pending before it starts, so that one cut short is finished by the next)
            holds = aliased & {r.info.run_id for r in self.runs(exp.experiment_id)}
            waiting = exp.tags.get("tracker.delete_pending") == "true" and (
                exp.lifecycle_stage == "active"
            )
            final = batch == final_batch or bool(holds) or waiting
            if final != (exp.lifecycle_stage == "active"):
                c["top_keep"].fail(
                    f"iteration {batch} is {exp.lifecycle_stage}, expected "
                    f"{'active' if final else 'deleted'}"
                )
            kept_uris |= self.audit_iteration(batch, exp, final)
        if f.shape == "one" and "b0" in by_batch:
            b0 = by_batch["b0"]
            if b0.lifecycle_stage == "active":
                c["top_keep"].fail("the previous iteration (b0) was not deleted")
            for run in self.runs(b0.experiment_id):
                if run.data.tags.get("tracker.model_uploaded") == "true" and (
                    b0.lifecycle_stage == "active"
                ):
                    kept_uris.add(_strip(run.data.tags.get("tracker.model_uri", "")))
        if f.shape == "sequence":
            self.audit_starts(by_batch)
        kept_uris |= self.audit_initial(initial)
        self.audit_champion(by_batch)
        self.audit_bucket(kept_uris)
        return c

    def audit_iteration(self, batch: str, exp: Any, final: bool) -> set[str]:
        """Runs, models and metrics of one iteration; the URIs of its kept models."""
        c = self.checks
        runs = [r for r in self.runs(exp.experiment_id) if r.info.lifecycle_stage == "active"]
        if exp.lifecycle_stage != "active":
            runs = list(self.runs(exp.experiment_id))  # soft-deleted with their experiment
        by_name: dict[str, list[Any]] = defaultdict(list)
        for run in runs:
            by_name[run.info.run_name].append(run)
        expected = {p.id: p for p in self.params}
        finished: dict[str, Any] = {}
        for pid, params in expected.items():
            found = by_name.get(pid, [])
            if exp.lifecycle_stage == "active":
                live = [r for r in found if r.info.lifecycle_stage == "active"]
            else:
                # every run of a deleted iteration is deleted with it, the twins deleted at
                # creation (two workers creating the same run) included: those never ran
                live = [r for r in found if r.info.status == "FINISHED"] or found
            if len(live) != 1:
                c["runs_finished"].fail(f"{batch}: params {pid} has {len(live)} runs")
                if not live:
                    continue
            run = live[0]
            if run.info.status != "FINISHED":
                c["runs_finished"].fail(f"{batch}: run {run.info.run_id} is {run.info.status}")
            try:
                if W.SoakParams.from_mlflow(run.data.params) != params:
                    c["runs_finished"].fail(f"{batch}: run {run.info.run_id} has other params")
            except Exception as exc:
                c["runs_finished"].fail(
                    f"{batch}: run {run.info.run_id} params unreadable: {type(exc).__name__}: "
                    f"{str(exc)[:120]}"
                )
            if run.info.status == "FINISHED":
                finished[pid] = run
                if W.MAIN_METRIC not in run.data.metrics:
                    c["finished_has_main"].fail(f"{batch}: run {run.info.run_id} has no score")
        extra = set(by_name) - set(expected)
        for name in sorted(extra):
            c["runs_finished"].fail(f"{batch}: unexpected run named {name!r}")
        for pid, run in finished.items():
            self.audit_metrics(batch, expected[pid], run)

        marked = [
            r
            for r in runs
            if r.info.lifecycle_stage == "active"
            and r.data.tags.get("tracker.model_uploaded") == "true"
        ]
        if not final or exp.lifecycle_stage != "active":
            for run in marked:
                c["top_keep"].fail(f"{batch} (deleted): run {run.info.run_id} still marked")
            return set()
        ranked = sorted(finished, key=lambda pid: -self.score(batch, expected[pid]))
        want = {finished[pid].info.run_id for pid in ranked[: self.facts.keep]}
        have = {r.info.run_id for r in marked}
        if want != have:
            c["top_keep"].fail(
                f"{batch}: kept {sorted(have)}, expected the top {self.facts.keep} "
                f"{sorted(want)} (missing {sorted(want - have)}, extra {sorted(have - want)})"
            )
        kept: set[str] = set()
        for run in marked:
            saved = expected.get(run.info.run_name)
            if saved is None:
                continue  # reported above as an unexpected run
            large = W.is_large(self.facts.seed, batch, saved, self.facts.large_fraction)
            state = W.expected_state(self.facts.seed, batch, saved, large)
            kept.add(self.audit_model(run, state, f"{batch}: run {run.info.run_id}"))
        return kept

    def audit_model(self, run: Any, state: dict[str, Any], what: str) -> str:
        c = self.checks
        uri = _strip(run.data.tags.get("tracker.model_uri", ""))
        files = self.remote_files(uri)
        if not files:
            c["byte_identical"].fail(f"{what}: marked, no files at {uri}")
        elif files not in self.uploads.get(uri, []):
            c["byte_identical"].fail(
                f"{what}: files at {uri} match none of its {len(self.uploads.get(uri, []))} "
                f"journaled uploads ({sorted(files)})"
            )
        try:
            model = self.manager.download_model_by_run_id(run.info.run_id)
            if model is None:
                c["downloads"].fail(f"{what}: download gave nothing")
            elif not _same_state(model, state):
                c["downloads"].fail(f"{what}: downloaded weights differ from the run's")
        except Exception as exc:
            c["downloads"].fail(f"{what}: download failed: {type(exc).__name__}: {exc}"[:300])
        return uri

    def audit_metrics(self, batch: str, params: W.SoakParams, run: Any) -> None:
        c = self.checks
        run_id = run.info.run_id
        journaled: set[tuple[int, int, float]] = set()
        mains: list[float] = []
        for record in self.facts.journals:
            if record.get("run_id") != run_id:
                continue
            if record["ev"] == "metrics":
                journaled |= {(s, ts, v) for _, s, ts, v in record["points"]}
            elif record["ev"] == "main":
                mains.append(record["value"])
        if not journaled:
            c["metrics_exact"].fail(f"{batch}: FINISHED run {run_id} was never trained")
            return
        history = Counter(
            (m.step, m.timestamp, m.value) for m in self.client.get_metric_history(run_id, W.LOSS)
        )
        twice = [k for k, n in history.items() if n > 1]
        lost = journaled - set(history)
        unknown = set(history) - journaled
        if twice or lost or unknown:
            c["metrics_exact"].fail(
                f"{batch}: run {run_id} loss: {len(lost)} lost, {len(twice)} logged twice, "
                f"{len(unknown)} never journaled (of {len(journaled)})"
            )
        scores = self.client.get_metric_history(run_id, W.MAIN_METRIC)
        want = self.score(batch, params)
        if any(m.value != want for m in scores):
            c["metrics_exact"].fail(f"{batch}: run {run_id} score {[m.value for m in scores]}")
        if self.facts.shape == "one":
            if len(scores) != 1:
                c["metrics_exact"].fail(f"{batch}: run {run_id} has {len(scores)} score points")
        elif not 1 <= len(scores) <= max(len(mains), 1):
            c["metrics_exact"].fail(
                f"{batch}: run {run_id} has {len(scores)} score points for {len(mains)} evaluations"
            )

    def audit_starts(self, by_batch: dict[str, Any]) -> None:
        """Sequence shape: iteration k started from the champion after iteration k-1 (the
        driver's default with a holdout): the best of k-1 if it was promoted."""
        from tracker_core.finetune import parse_iteration_name

        c = self.checks
        replayed = self.replay(by_batch) or []
        champion: str | None = None
        for batch, (best, _, _, chosen) in zip(self.facts.batches, replayed, strict=False):
            exp = by_batch[batch]
            parsed = parse_iteration_name(exp.name.split(" (deleted ")[0])
            start = parsed.run_id if parsed else None
            if champion is not None and start != champion:
                c["started_from_best"].fail(
                    f"{batch} started from {start}, the champion then was {champion}"
                )
            champion = best.info.run_id if chosen else champion

    def replay(
        self, by_batch: dict[str, Any]
    ) -> list[tuple[Any, float, dict[str, Any], bool]] | None:
        """The holdout gate replayed on the workload's own numbers: per batch in order, its
        best run by score, that model's holdout (from the weights it saved), and whether it
        beat the champion of the time. None if an iteration or its runs are missing."""
        by_id = {p.id: p for p in self.params}
        out: list[tuple[Any, float, dict[str, Any], bool]] = []
        champion: float | None = None
        for batch in self.facts.batches:
            exp = by_batch.get(batch)
            if exp is None:
                return None
            finished = [
                r
                for r in self.runs(exp.experiment_id)
                if r.info.status == "FINISHED" and r.info.run_name in by_id
            ]
            if not finished:
                return None
            best = max(finished, key=lambda r: self.score(batch, by_id[r.info.run_name]))
            params = by_id[best.info.run_name]
            large = W.is_large(self.facts.seed, batch, params, self.facts.large_fraction)
            state = W.expected_state(self.facts.seed, batch, params, large)
            score = W.holdout(state)
            chosen = champion is None or score > champion
            champion = score if chosen else champion
            out.append((best, score, state, chosen))
        return out

    def aliased_runs(self) -> set[str]:
        """The runs the champion and previous-champion aliases point at."""
        out = set()
        for alias in ("champion", "previous-champion"):
            try:
                out.add(
                    str(self.client.get_model_version_by_alias(self.facts.plugin, alias).run_id)
                )
            except Exception:
                continue
        return out

    def audit_champion(self, by_batch: dict[str, Any]) -> None:
        """The promotion step: replay the holdout gate on the workload's own numbers (each
        iteration's best run by score, its holdout from the weights it saved) and compare with
        the registry: the versions are the promoted runs, one each; ``champion`` points at
        the last (the holdout-best of them), ``previous-champion`` at the one before; the
        champion's files are what its run saved and download as its weights."""
        c = self.checks["champion"]
        replayed = self.replay(by_batch)
        if replayed is None:
            return  # an iteration is missing: reported by runs_finished
        promoted = [(run, score, state) for run, score, state, chosen in replayed if chosen]
        name = self.facts.plugin
        versions = list(self.client.search_model_versions(f"name = '{name}'"))
        runs = Counter(str(v.run_id) for v in versions)
        for run_id, n in runs.items():
            if n > 1:
                c.fail(f"run {run_id} has {n} versions")
        want = {run.info.run_id for run, _, _ in promoted}
        if set(runs) != want:
            c.fail(f"versions of runs {sorted(runs)}, expected the promoted {sorted(want)}")
        aliases = {"champion": promoted[-1:], "previous-champion": promoted[-2:-1]}
        for alias, expected in aliases.items():
            try:
                found = self.client.get_model_version_by_alias(name, alias).run_id
            except Exception:
                found = None
            wanted = expected[0][0].info.run_id if expected else None
            if found != wanted:
                c.fail(f"@{alias} is run {found}, expected {wanted}")
        if not promoted:
            return
        run, score, state = promoted[-1]
        recorded = self.client.get_run(run.info.run_id).data.tags.get("tracker.holdout")
        if recorded is None or float(recorded) != score:
            c.fail(f"champion run {run.info.run_id} has holdout {recorded}, expected {score!r}")
        version = next((v for v in versions if v.run_id == run.info.run_id), None)
        model_uri = _strip(run.data.tags.get("tracker.model_uri", ""))
        if version is not None and _strip(version.source or "") != model_uri:
            c.fail(f"the champion's version points at {version.source}, its model is {model_uri}")
        before = (
            len(self.checks["byte_identical"].problems),
            len(self.checks["downloads"].problems),
        )
        self.audit_model(run, state, "the champion")
        after = (
            len(self.checks["byte_identical"].problems),
            len(self.checks["downloads"].problems),
        )
        if after != before:
            c.fail("the champion's files or weights differ (see byte_identical / downloads)")

    def audit_initial(self, initial: Any) -> set[str]:
        c = self.checks
        if initial is None or initial.lifecycle_stage != "active":
            c["initial_intact"].fail("no active initial experiment")
            return set()
        runs = [r for r in self.runs(initial.experiment_id) if r.info.lifecycle_stage == "active"]
        if len(runs) != 1:
            c["initial_intact"].fail(f"{len(runs)} initial runs")
        marked = [r for r in runs if r.data.tags.get("tracker.model_uploaded") == "true"]
        if not marked:
            c["initial_intact"].fail("the initial model is not marked")
            return set()
        state = W.initial_state(self.facts.seed)
        before = (len(self.checks["byte_identical"].problems), self.checks["downloads"].held)
        uri = self.audit_model(marked[0], state, "initial model")
        if (len(self.checks["byte_identical"].problems), self.checks["downloads"].held) != before:
            c["initial_intact"].fail("initial model files or weights differ (see above)")
        return {uri}

    def audit_bucket(self, kept_uris: Iterable[str]) -> None:
        c = self.checks
        kept = tuple(u + "/" for u in kept_uris)
        try:
            objects = self.fs.find(self.facts.bucket)
        except FileNotFoundError:
            objects = []
        orphans = [o for o in objects if not o.startswith(kept)]
        for orphan in orphans:
            c["no_orphans"].fail(orphan)
        if orphans:
            c["no_orphans"].problems.insert(0, f"{len(orphans)} orphaned object(s)")
        if self.facts.storage == "s3":
            import boto3

            s3 = boto3.client(
                "s3",
                endpoint_url=self.facts.storage_endpoint,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
                region_name="us-east-1",
            )
            uploads = s3.list_multipart_uploads(Bucket=self.facts.bucket).get("Uploads", [])
            if uploads:
                c["no_open_uploads"].fail(
                    f"{len(uploads)} incomplete multipart upload(s): "
                    + ", ".join(u["Key"] for u in uploads[:3])
                )

    def close(self) -> None:
        self.manager.close()


def audit(facts: TrialFacts) -> dict[str, Check]:
    """Run every check of :data:`INVARIANTS` on a finished trial."""
    auditor = _Auditor(facts)
    try:
        return auditor.run()
    finally:
        auditor.close()


def journals_in(folder: Path) -> tuple[dict[str, Any], ...]:
    from chaos.journal import read_journals

    return tuple(read_journals(folder))
