"""The champion's invariants after a trial: the holdout gate replayed on the workload's own
numbers against the model registry (one version per promoted run, the aliases, the champion's
recorded holdout), and, in the sequence shape, that each iteration started from the champion.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from chaos import workload as W
from chaos.facts import TrialView, strip

__all__ = ["ChampionAudit"]


class ChampionAudit:
    """The champion's checks on one trial (see the module docstring)."""

    def __init__(self, view: TrialView) -> None:
        self.v = view

    def audit_starts(self, by_batch: dict[str, Any]) -> None:
        """Sequence shape: iteration k started from the champion after iteration k-1 (the
        driver's default with a holdout): the best of k-1 if it was promoted."""
        from tracker_core.finetune import parse_iteration_name

        c = self.v.checks
        replayed = self.replay(by_batch) or []
        champion: str | None = None
        for batch, (best, _, _, chosen) in zip(self.v.facts.batches, replayed, strict=False):
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
        by_id = {p.id: p for p in self.v.params}
        out: list[tuple[Any, float, dict[str, Any], bool]] = []
        champion: float | None = None
        for batch in self.v.facts.batches:
            exp = by_batch.get(batch)
            if exp is None:
                return None
            finished = [
                r
                for r in self.v.runs(exp.experiment_id)
                if r.info.status == "FINISHED" and r.info.run_name in by_id
            ]
            if not finished:
                return None
            best = max(finished, key=lambda r: self.v.score(batch, by_id[r.info.run_name]))
            params = by_id[best.info.run_name]
            large = W.is_large(self.v.facts.seed, batch, params, self.v.facts.large_fraction)
            state = W.expected_state(self.v.facts.seed, batch, params, large)
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
                    str(self.v.client.get_model_version_by_alias(self.v.facts.plugin, alias).run_id)
                )
            except Exception:
                continue
        return out

    def audit_champion(self, by_batch: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
        """The promotion step: replay the holdout gate on the workload's own numbers (each
        iteration's best run by score, its holdout from the weights it saved) and compare with
        the registry: the versions are the promoted runs, one each; ``champion`` points at
        the last (the holdout-best of them), ``previous-champion`` at the one before; the
        champion's files are what its run saved and download as its weights."""
        c = self.v.checks["champion"]
        replayed = self.replay(by_batch)
        if replayed is None:
            return None  # an iteration is missing: reported by runs_finished
        promoted = [(run, score, state) for run, score, state, chosen in replayed if chosen]
        name = self.v.facts.plugin
        versions = list(self.v.client.search_model_versions(f"name = '{name}'"))
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
                found = self.v.client.get_model_version_by_alias(name, alias).run_id
            except Exception:
                found = None
            wanted = expected[0][0].info.run_id if expected else None
            if found != wanted:
                c.fail(f"@{alias} is run {found}, expected {wanted}")
        if not promoted:
            return None
        run, score, state = promoted[-1]
        recorded = self.v.client.get_run(run.info.run_id).data.tags.get("tracker.holdout")
        if recorded is None or float(recorded) != score:
            c.fail(f"champion run {run.info.run_id} has holdout {recorded}, expected {score!r}")
        version = next((v for v in versions if v.run_id == run.info.run_id), None)
        model_uri = strip(run.data.tags.get("tracker.model_uri", ""))
        if version is not None and strip(version.source or "") != model_uri:
            c.fail(f"the champion's version points at {version.source}, its model is {model_uri}")
        return run, state
