"""Champion and challenger: a new model serves only if it beats the one serving.

Serving loads ``models:/<name>@champion`` from the model registry
(:mod:`tracker_core.registry_store`; MLflow's in the shipped backends). After an iteration, its
best model is the **challenger**; :meth:`Promoter.gate` scores it on the method's fixed
**holdout** evaluation and compares it with the champion's holdout score (scored the same
way, cached on the champion's run and version). It is promoted when there is no champion,
or when it beats the champion by at least ``min_delta`` (and by more than nothing). Promoting
registers the challenger's model as a version (its run's model folder is the source: the
registry copies nothing) and moves the alias ``champion`` to it; the champion it replaces
keeps the alias ``previous-champion``, for :meth:`Promoter.rollback`. A person can promote
any run's model (:meth:`Promoter.promote_run`) or roll back; who did is recorded.

**Cleanup keeps the champion's files** by keeping its iteration: before an alias points at a
run's model the run is tagged ``tracker.protected``, and the tag goes only once no alias
points at it. A protected model is never pruned or deleted, and an iteration holding one is
never deleted: its deletion is deferred (:mod:`tracker_core.iterations`) and done by the first
cleanup after its model lost its last alias. ``tracker-core gc`` deletes unmarked folders only
and MLflow's ``gc`` purges deleted experiments only, so neither reaches it. (Copying the files
under the version instead would double the storage of every champion, need a copy operation
of every artifact store, and leave gc to tell registry copies from orphans.)

**Crash safety.** Every step can be repeated: the challenger's holdout score is cached on its
run (tag ``tracker.holdout``) before anything is decided; a version is found by its run
before one is created, and of versions of one run (a create retried after a lost answer)
the oldest is kept and the others deleted, so a run has one version; aliases are set, not
added. The decision is written on the challenger's run last (tag ``tracker.promotion``),
and a run whose decision is written is never decided again, so a repeated completion (a
redelivered job, a killed worker's successor) finds it and only finishes what may be left:
the notification. A champion alias already on the challenger (killed before the decision was
written) counts as its promotion. Promotions of one registered model hold a lock (a lease on
a run of the lineage experiment, :mod:`tracker_core.lease`): concurrent completions of one
iteration decide once, and a dead holder's lock expires with its lease.

The optional :class:`~tracker_core.webhook.Webhook` is called from inside the lock, after
the decision is written, once per promotion (or rollback), with an idempotency key; its
delivery is recorded on the version, so a repeat sends it again only if it was not recorded
(then with the same key, for the receiver to drop).

This module decides (the gate, a person's promotion, a rollback) under the lock;
:mod:`tracker_core.champion_versions` installs what was decided (versions, aliases,
protection, webhook).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

from tracker_core import tags as T
from tracker_core.champion_versions import ChampionVersions, cached_holdout, existing_run
from tracker_core.clock import Clock
from tracker_core.decisions import Champion, Decision, Outcome, PromotionConfig, reason_of
from tracker_core.errors import PromotionError
from tracker_core.iterations import Iterations
from tracker_core.lease import Leases
from tracker_core.lineage import Lineage
from tracker_core.ranking import Ranking
from tracker_core.registry_store import RegistryStore
from tracker_core.runs import RunTracker, looked_up_again
from tracker_core.stores import TrackingStore
from tracker_core.values import MetricValue, RunRecord

__all__ = ["Champion", "Decision", "Outcome", "Promoter", "PromotionConfig", "reason_of"]

log = logging.getLogger(__name__)

METRIC_HOLDOUT = "holdout"
METRIC_CHAMPION_HOLDOUT = "champion_holdout"

HoldoutScore = Callable[[RunRecord], float]


def _recorded(run: RunRecord) -> Decision | None:
    text = run.tags.get(T.TAG_DECISION)
    return Decision.from_json(json.loads(text)) if text else None


class Promoter:
    """Gates, promotes and rolls back the champion of one registered model (see the module
    docstring). Receives its stores and services; holds no mutable state."""

    def __init__(
        self,
        tracking: TrackingStore,
        versions: ChampionVersions,
        iterations: Iterations,
        runs: RunTracker,
        leases: Leases,
        lineage: Lineage,
        ranking: Ranking,
    ) -> None:
        self._tracking, self.versions = tracking, versions
        self._iterations, self._runs = iterations, runs
        self._leases, self._lineage, self._ranking = leases, lineage, ranking
        self.config = versions.config

    @property
    def name(self) -> str:
        """The registered model's name."""
        return self.versions.name

    @property
    def clock(self) -> Clock:
        return self._leases.clock

    @property
    def available(self) -> bool:
        """Whether there is a model registry to promote in."""
        return self.versions.available

    @property
    def registry(self) -> RegistryStore:
        return self.versions.registry

    # ------------------------------------------------------------------ reading
    def champion(self, alias: str | None = None) -> Champion | None:
        """The version ``alias`` (default: the champion's) points at; None if none does."""
        version = self.registry.get_version_by_alias(self.name, alias or self.config.champion_alias)
        if version is None:
            return None
        run = self._tracking.get_run(version.run_id) if version.run_id else None
        score = cached_holdout(version.tags)
        if score is None and run is not None:
            score = cached_holdout(run.tags)
        return Champion(version, run, score)

    def serving(self) -> Champion | None:
        """The champion, or None before the first promotion or without a model registry."""
        return self.champion() if self.available else None

    def score(self, run: RunRecord, holdout: HoldoutScore) -> float:
        """The run's holdout score: cached on the run, else computed and cached (tag and
        metric), before anything depends on it."""
        cached = cached_holdout(run.tags)
        if cached is not None:
            return cached
        value = float(holdout(run))
        if not math.isfinite(value):
            raise PromotionError(f"the holdout score of run {run.run_id} is {value}")
        metric = MetricValue(METRIC_HOLDOUT, value, step=0, timestamp_ms=self.clock.now_ms())
        self._tracking.log_batch(run.run_id, [metric], None, {T.TAG_HOLDOUT: repr(value)})
        return value

    # ------------------------------------------------------------------ the gate
    def gate(self, challenger: RunRecord, holdout: HoldoutScore, *, by: str) -> Decision:
        """Promote ``challenger`` (an iteration's best run) if it beats the champion on the
        holdout (see the module docstring); the decision, written on its run. Repeatable."""
        decision = _recorded(challenger)
        if decision is None:
            self.score(challenger, holdout)  # outside the lock: the slow part
        with self._lock():
            fresh = self._existing(challenger.run_id)
            decision = _recorded(fresh)
            if decision is None:
                decision = self._decide(fresh, holdout, by)
            self.versions.notify(decision)
        return decision

    def _decide(self, challenger: RunRecord, holdout: HoldoutScore, by: str) -> Decision:
        score = self.score(challenger, holdout)
        champion = self.champion()
        if champion is not None and champion.run_id == challenger.run_id:
            # promoted by an attempt that was killed before it wrote the decision
            before = self.champion(self.config.rollback_alias)
            why = "promoted (the decision was written after an interruption)"
            decision = self._decision(
                Outcome.PROMOTED,
                challenger.run_id,
                score,
                before,
                before.holdout if before else None,
                champion.version.version,
                by,
                why,
            )
        else:
            against = None
            if champion is not None:
                against = champion.holdout
                if against is None and champion.run is not None:
                    against = self.score(champion.run, holdout)
                    tags = {T.TAG_HOLDOUT: repr(against)}
                    self.registry.set_version_tags(self.name, champion.version.version, tags)
            promote, why = self._beats(score, against, champion is not None)
            version = self.versions.install(challenger, by, why, score).version if promote else None
            outcome = Outcome.PROMOTED if promote else Outcome.REJECTED
            decision = self._decision(
                outcome, challenger.run_id, score, champion, against, version, by, why
            )
        metrics = []
        if decision.champion_holdout is not None:
            value = decision.champion_holdout
            metrics.append(MetricValue(METRIC_CHAMPION_HOLDOUT, value, step=0))
        text = json.dumps(decision.to_json(), sort_keys=True)
        self._tracking.log_batch(challenger.run_id, metrics, None, {T.TAG_DECISION: text})
        log.info("challenger %s %s: %s", challenger.run_id, decision.outcome, reason_of(decision))
        return decision

    def _decision(
        self,
        outcome: Outcome,
        run_id: str,
        holdout: float | None,
        against: Champion | None,
        against_holdout: float | None,
        version: str | None,
        by: str,
        reason: str,
    ) -> Decision:
        return Decision(
            outcome=outcome,
            registered_model=self.name,
            run_id=run_id,
            holdout=holdout,
            champion_run_id=against.run_id if against else None,
            champion_version=against.version.version if against else None,
            champion_holdout=against_holdout,
            version=version,
            min_delta=self.config.min_delta,
            decided_by=by,
            decided_ms=self.clock.now_ms(),
            reason=reason,
        )

    def _beats(self, score: float, champion: float | None, has_champion: bool) -> tuple[bool, str]:
        """Whether a challenger scoring ``score`` replaces a champion scoring ``champion``."""
        if not has_champion:
            return True, "first champion"
        if champion is None:
            return True, "the champion has no holdout score (its run is gone)"
        gain = champion - score if self._ranking.is_loss else score - champion
        if gain > 0 and gain >= self.config.min_delta:
            return True, f"beats the champion by {gain:.6g} (min_delta {self.config.min_delta:g})"
        return False, (
            f"does not beat the champion by min_delta {self.config.min_delta:g} "
            f"(difference {gain:.6g})"
        )

    # ------------------------------------------------------------------ a person's decisions
    def promote_run(self, run_id: str, *, by: str, reason: str = "") -> Decision:
        """Make ``run_id``'s model the champion, whatever its holdout score (a person's
        decision, recorded on the version with ``by``)."""
        with self._lock():
            run = self._existing(run_id)
            before = self.champion()
            why = reason or f"promoted by {by}"
            version = self.versions.install(run, by, why, cached_holdout(run.tags))
            decision = self._decision(
                Outcome.PROMOTED,
                run_id,
                cached_holdout(run.tags),
                before,
                before.holdout if before else None,
                version.version,
                by,
                why,
            )
            self.versions.notify(decision)
        return decision

    def rollback(self, *, by: str, reason: str = "") -> Decision:
        """Swap the champion and the rollback model (a second rollback undoes the first)."""
        with self._lock():
            current = self.champion()
            previous = self.champion(self.config.rollback_alias)
            if current is None or previous is None:
                raise PromotionError(
                    f"registered model {self.name!r} has no {self.config.rollback_alias!r} "
                    "version to roll back to"
                )
            why = reason or f"rollback by {by}"
            self.registry.set_alias(self.name, self.config.champion_alias, previous.version.version)
            self.registry.set_alias(self.name, self.config.rollback_alias, current.version.version)
            decision = self._decision(
                Outcome.ROLLED_BACK,
                previous.run_id or "",
                previous.holdout,
                current,
                current.holdout,
                previous.version.version,
                by,
                why,
            )
            self.versions.stamp(previous.version, decision)
            self.versions.notify(decision)
        return decision

    # ------------------------------------------------------------------ the lock
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Hold the lease of the registered model's lock run (in the lineage experiment)."""
        experiment = self._lineage.experiment(create=True)
        assert experiment is not None
        tags = {T.TAG_PLUGIN: self._iterations.plugin_name, T.TAG_KIND: "lock"}

        def take() -> Any:
            run, created = self._runs.get_or_create(
                experiment.experiment_id, f"promotion lock {self.name}", tags
            )
            return self._leases.claim(run, created=created, wait=math.inf, hold=True)[1]

        lease = looked_up_again(take, "the promotion lock", self.clock)
        try:
            yield
        finally:
            if lease is not None:
                lease.release()

    def _existing(self, run_id: str) -> RunRecord:
        return existing_run(self._tracking, run_id)
