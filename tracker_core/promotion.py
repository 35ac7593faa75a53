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
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from tracker_core import tags as T
from tracker_core.clock import Clock
from tracker_core.decisions import Champion, Decision, Outcome, PromotionConfig, reason_of
from tracker_core.errors import PromotionError
from tracker_core.iterations import Iterations
from tracker_core.lease import Leases
from tracker_core.lineage import Lineage
from tracker_core.models import ModelKeeper, is_marked
from tracker_core.ranking import Ranking
from tracker_core.registry_store import ModelVersion, RegistryStore
from tracker_core.retry import Retrier, RetryConfig
from tracker_core.runs import RunTracker, looked_up_again
from tracker_core.stores import RunQuery, TrackingStore
from tracker_core.values import MetricValue, RunRecord, RunStatus
from tracker_core.webhook import WebhookError

__all__ = ["Champion", "Decision", "Outcome", "Promoter", "PromotionConfig", "reason_of"]

log = logging.getLogger(__name__)

TAG_HOLDOUT = "tracker.holdout"
TAG_DECISION = "tracker.promotion"
TAG_NOTIFIED = "tracker.notified"
METRIC_HOLDOUT = "holdout"
METRIC_CHAMPION_HOLDOUT = "champion_holdout"

HoldoutScore = Callable[[RunRecord], float]


def _cached(tags: Mapping[str, str]) -> float | None:
    text = tags.get(TAG_HOLDOUT)
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _recorded(run: RunRecord) -> Decision | None:
    text = run.tags.get(TAG_DECISION)
    return Decision.from_json(json.loads(text)) if text else None


class Promoter:
    """Gates, promotes and rolls back the champion of one registered model (see the module
    docstring). Receives its stores and services; holds no mutable state."""

    def __init__(
        self,
        tracking: TrackingStore,
        registry: RegistryStore | None,
        models: ModelKeeper,
        iterations: Iterations,
        runs: RunTracker,
        leases: Leases,
        lineage: Lineage,
        ranking: Ranking,
        config: PromotionConfig,
        retry: RetryConfig,
    ) -> None:
        self._tracking, self._registry = tracking, registry
        self._models, self._iterations, self._runs = models, iterations, runs
        self._leases, self._lineage, self._ranking = leases, lineage, ranking
        self.config = config
        self._retrier = Retrier(retry)

    @property
    def name(self) -> str:
        """The registered model's name."""
        return self.config.registered_model or self._iterations.plugin_name

    @property
    def clock(self) -> Clock:
        return self._leases.clock

    @property
    def available(self) -> bool:
        """Whether there is a model registry to promote in."""
        return self._registry is not None

    @property
    def registry(self) -> RegistryStore:
        if self._registry is None:
            raise PromotionError(
                f"the tracking store {self._tracking.uri} has no model registry: promotion "
                "needs one (an MLflow tracking URI: a database or an MLflow server)"
            )
        return self._registry

    # ------------------------------------------------------------------ reading
    def champion(self, alias: str | None = None) -> Champion | None:
        """The version ``alias`` (default: the champion's) points at; None if none does."""
        version = self.registry.get_version_by_alias(self.name, alias or self.config.champion_alias)
        if version is None:
            return None
        run = self._tracking.get_run(version.run_id) if version.run_id else None
        score = _cached(version.tags)
        if score is None and run is not None:
            score = _cached(run.tags)
        return Champion(version, run, score)

    def score(self, run: RunRecord, holdout: HoldoutScore) -> float:
        """The run's holdout score: cached on the run, else computed and cached (tag and
        metric), before anything depends on it."""
        cached = _cached(run.tags)
        if cached is not None:
            return cached
        value = float(holdout(run))
        if not math.isfinite(value):
            raise PromotionError(f"the holdout score of run {run.run_id} is {value}")
        metric = MetricValue(METRIC_HOLDOUT, value, step=0, timestamp_ms=self.clock.now_ms())
        self._tracking.log_batch(run.run_id, [metric], None, {TAG_HOLDOUT: repr(value)})
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
            self._notify(decision)
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
                    tags = {TAG_HOLDOUT: repr(against)}
                    self.registry.set_version_tags(self.name, champion.version.version, tags)
            promote, why = self._beats(score, against, champion is not None)
            version = self._install(challenger, by, why, score).version if promote else None
            outcome = Outcome.PROMOTED if promote else Outcome.REJECTED
            decision = self._decision(
                outcome, challenger.run_id, score, champion, against, version, by, why
            )
        metrics = []
        if decision.champion_holdout is not None:
            value = decision.champion_holdout
            metrics.append(MetricValue(METRIC_CHAMPION_HOLDOUT, value, step=0))
        text = json.dumps(decision.to_json(), sort_keys=True)
        self._tracking.log_batch(challenger.run_id, metrics, None, {TAG_DECISION: text})
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
            version = self._install(run, by, why, _cached(run.tags))
            decision = self._decision(
                Outcome.PROMOTED,
                run_id,
                _cached(run.tags),
                before,
                before.holdout if before else None,
                version.version,
                by,
                why,
            )
            self._notify(decision)
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
            self._stamp(previous.version, decision)
            self._notify(decision)
        return decision

    # ------------------------------------------------------------------ installing
    def _install(self, run: RunRecord, by: str, reason: str, holdout: float | None) -> ModelVersion:
        """Protect the run's model, register it (one version per run), move the aliases,
        release the protection of what lost its last alias."""
        self._tracking.set_tags(run.run_id, {T.TAG_PROTECTED: T.TRUE})
        fresh = self._existing(run.run_id)
        if not is_marked(fresh) or fresh.status != RunStatus.FINISHED:
            self._tracking.set_tags(run.run_id, {T.TAG_PROTECTED: T.FALSE})
            raise PromotionError(f"run {run.run_id} holds no model of a FINISHED run")
        version = self._register(fresh, holdout)
        current = self.registry.get_version_by_alias(self.name, self.config.champion_alias)
        if current is not None and current.version != version.version:
            self.registry.set_alias(self.name, self.config.rollback_alias, current.version)
        self.registry.set_alias(self.name, self.config.champion_alias, version.version)
        self._stamp(version, None, by=by, reason=reason)
        self._release_unaliased()
        log.info("%s is now models:/%s@%s", version.uri, self.name, self.config.champion_alias)
        return version

    def _register(self, run: RunRecord, holdout: float | None) -> ModelVersion:
        """The run's version: found, else created; duplicates (a retried create) deleted."""
        versions = self.registry.search_versions(self.name, run.run_id)
        if not versions:
            self.registry.ensure_registered_model(self.name, {T.TAG_PLUGIN: self._plugin})
            experiment = self._iterations.get(run.experiment_id)
            tags = {
                T.TAG_PLUGIN: self._plugin,
                "tracker.run_id": run.run_id,
                "tracker.experiment_id": run.experiment_id,
                "tracker.batch_id": (experiment.tags.get(T.TAG_BATCH, "") if experiment else ""),
                "tracker.model_format": run.tags.get(T.TAG_MODEL_FORMAT, ""),
            }
            if holdout is not None:
                tags[TAG_HOLDOUT] = repr(holdout)
            self.registry.create_version(self.name, self._models.uri_of(run), run.run_id, tags)
            versions = self.registry.search_versions(self.name, run.run_id)
        if not versions:
            raise PromotionError(f"the version of run {run.run_id} vanished after its creation")
        keep, *extra = versions
        for duplicate in extra:
            if not duplicate.aliases:
                log.info("deleting %s, a duplicate of %s", duplicate.uri, keep.uri)
                self.registry.delete_version(self.name, duplicate.version)
        return keep

    @property
    def _plugin(self) -> str:
        return self._iterations.plugin_name

    def _stamp(
        self, version: ModelVersion, decision: Decision | None, *, by: str = "", reason: str = ""
    ) -> None:
        tags = {
            "tracker.promoted_by": decision.decided_by if decision else by,
            "tracker.promoted_ms": str(decision.decided_ms if decision else self.clock.now_ms()),
            "tracker.reason": (decision.reason if decision else reason)[:4000],
        }
        self.registry.set_version_tags(self.name, version.version, tags)

    def _release_unaliased(self) -> None:
        """Untag the protected runs no alias points at any more (one query per 50 of the
        plugin's experiments)."""
        aliased = {
            v.run_id
            for alias in (self.config.champion_alias, self.config.rollback_alias)
            if (v := self.registry.get_version_by_alias(self.name, alias)) is not None
        }
        ids = [e.experiment_id for e in self._iterations.all()]
        initial = self._iterations.initial()
        ids += [initial.experiment_id] if initial is not None else []
        for start in range(0, len(ids), 50):
            query = RunQuery(tuple(ids[start : start + 50]), tags={T.TAG_PROTECTED: T.TRUE})
            for run in self._tracking.search_runs(query):
                if run.run_id not in aliased:
                    self._tracking.set_tags(run.run_id, {T.TAG_PROTECTED: T.FALSE})
                    log.info("run %s is no longer aliased: its model may be cleaned up", run.run_id)

    # ------------------------------------------------------------------ notification
    def _notify(self, decision: Decision) -> None:
        """Send the webhook for a decision that changed the champion, unless its delivery was
        recorded (on the version)."""
        webhook = self.config.webhook
        if webhook is None or not decision.promoted or decision.version is None:
            return
        key = decision.idempotency_key
        version = self.registry.get_version(self.name, decision.version)
        if version is None or version.tags.get(TAG_NOTIFIED) == key:
            return
        payload = {
            "event": decision.outcome.value,
            "idempotency_key": key,
            "model_uri": f"models:/{self.name}@{self.config.champion_alias}",
            "version_uri": version.uri,
            **decision.to_json(),
        }
        try:
            webhook.send(payload, self._retrier)
        except WebhookError as exc:
            log.error("the champion changed, but %s; a repeated completion retries it", exc)
            return
        self.registry.set_version_tags(self.name, decision.version, {TAG_NOTIFIED: key})

    # ------------------------------------------------------------------ the lock
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Hold the lease of the registered model's lock run (in the lineage experiment)."""
        experiment = self._lineage.experiment(create=True)
        assert experiment is not None
        tags = {T.TAG_PLUGIN: self._plugin, T.TAG_KIND: "lock"}

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
        run = self._tracking.get_run(run_id)
        if run is None:
            raise PromotionError(f"run {run_id} does not exist")
        return run
