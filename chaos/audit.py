"""The audit after a trial: the servers' state against the workers' journals and the workload.

Reads the tracking server and the bucket *directly* (not through the fault proxies,
:class:`~chaos.facts.TrialView`). Each check returns whether it held and, if not, what was
wrong; :data:`~chaos.facts.INVARIANTS` names them in the order of the soak's table. The
champion's checks are :mod:`chaos.audit_champion`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from chaos import workload as W
from chaos.audit_champion import ChampionAudit
from chaos.facts import (
    Check,
    TrialFacts,
    TrialView,
    same_state,
    strip,
)

__all__ = ["audit", "journals_in"]


class _Auditor:
    """The invariants of the iterations, their models, metrics and the bucket; the champion's
    are :class:`~chaos.audit_champion.ChampionAudit`'s."""

    def __init__(self, facts: TrialFacts) -> None:
        self.v = TrialView(facts)
        self.facts, self.checks = facts, self.v.checks
        self.champion = ChampionAudit(self.v)

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

        experiments = self.v.experiments()
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
        aliased = self.champion.aliased_runs()
        for batch in f.batches:
            exp = by_batch.get(batch)
            if exp is None:
                c["runs_finished"].fail(f"no iteration for batch {batch}")
                continue
            # an iteration holding the champion's or the rollback model is kept, and one
            # whose model lost its alias in the last completion waits for the next cleanup;
            # the pending tag stays on an iteration once deleted (a deletion is marked
            # pending before it starts, so that one cut short is finished by the next)
            holds = aliased & {r.info.run_id for r in self.v.runs(exp.experiment_id)}
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
            for run in self.v.runs(b0.experiment_id):
                if run.data.tags.get("tracker.model_uploaded") == "true" and (
                    b0.lifecycle_stage == "active"
                ):
                    kept_uris.add(strip(run.data.tags.get("tracker.model_uri", "")))
        if f.shape == "sequence":
            self.champion.audit_starts(by_batch)
        kept_uris |= self.audit_initial(initial)
        champion = self.champion.audit_champion(by_batch)
        if champion is not None:
            self.audit_champion_files(*champion)
        self.audit_bucket(kept_uris)
        return c

    def audit_iteration(self, batch: str, exp: Any, final: bool) -> set[str]:
        """Runs, models and metrics of one iteration; the URIs of its kept models."""
        c = self.checks
        runs = [r for r in self.v.runs(exp.experiment_id) if r.info.lifecycle_stage == "active"]
        if exp.lifecycle_stage != "active":
            runs = list(self.v.runs(exp.experiment_id))  # soft-deleted with their experiment
        by_name: dict[str, list[Any]] = defaultdict(list)
        for run in runs:
            by_name[run.info.run_name].append(run)
        expected = {p.id: p for p in self.v.params}
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
        ranked = sorted(finished, key=lambda pid: -self.v.score(batch, expected[pid]))
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
        uri = strip(run.data.tags.get("tracker.model_uri", ""))
        files = self.v.remote_files(uri)
        if not files:
            c["byte_identical"].fail(f"{what}: marked, no files at {uri}")
        elif files not in self.v.uploads.get(uri, []):
            c["byte_identical"].fail(
                f"{what}: files at {uri} match none of its {len(self.v.uploads.get(uri, []))} "
                f"journaled uploads ({sorted(files)})"
            )
        try:
            model = self.v.manager.download_model_by_run_id(run.info.run_id)
            if model is None:
                c["downloads"].fail(f"{what}: download gave nothing")
            elif not same_state(model, state):
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
            (m.step, m.timestamp, m.value) for m in self.v.client.get_metric_history(run_id, W.LOSS)
        )
        twice = [k for k, n in history.items() if n > 1]
        lost = journaled - set(history)
        unknown = set(history) - journaled
        if twice or lost or unknown:
            c["metrics_exact"].fail(
                f"{batch}: run {run_id} loss: {len(lost)} lost, {len(twice)} logged twice, "
                f"{len(unknown)} never journaled (of {len(journaled)})"
            )
        scores = self.v.client.get_metric_history(run_id, W.MAIN_METRIC)
        want = self.v.score(batch, params)
        if any(m.value != want for m in scores):
            c["metrics_exact"].fail(f"{batch}: run {run_id} score {[m.value for m in scores]}")
        if self.facts.shape == "one":
            if len(scores) != 1:
                c["metrics_exact"].fail(f"{batch}: run {run_id} has {len(scores)} score points")
        elif not 1 <= len(scores) <= max(len(mains), 1):
            c["metrics_exact"].fail(
                f"{batch}: run {run_id} has {len(scores)} score points for {len(mains)} evaluations"
            )

    def audit_initial(self, initial: Any) -> set[str]:
        c = self.checks
        if initial is None or initial.lifecycle_stage != "active":
            c["initial_intact"].fail("no active initial experiment")
            return set()
        runs = [r for r in self.v.runs(initial.experiment_id) if r.info.lifecycle_stage == "active"]
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
            objects = self.v.fs.find(self.facts.bucket)
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

    def audit_champion_files(self, run: Any, state: dict[str, Any]) -> None:
        """The champion's files are what its run saved and download as its weights."""
        problems = ("byte_identical", "downloads")
        before = [len(self.checks[key].problems) for key in problems]
        self.audit_model(run, state, "the champion")
        if [len(self.checks[key].problems) for key in problems] != before:
            self.checks["champion"].fail(
                "the champion's files or weights differ (see byte_identical / downloads)"
            )

    def close(self) -> None:
        self.v.close()


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
