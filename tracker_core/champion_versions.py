"""A champion's versions in the model registry: registering a run's model (one version per
run), moving the aliases, protecting the runs they point at, telling the webhook.

:class:`ChampionVersions` is what :class:`~tracker_core.promotion.Promoter` installs a
decision with; the decision itself (the gate, a person's promotion, a rollback) and the
lock it is taken under are the promoter's. Each step can be repeated (see the promotion
module's "Crash safety").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from tracker_core import tags as T
from tracker_core.clock import Clock
from tracker_core.decisions import Decision, PromotionConfig
from tracker_core.errors import PromotionError
from tracker_core.iterations import Iterations
from tracker_core.models import ModelKeeper, is_marked
from tracker_core.registry_store import ModelVersion, RegistryStore
from tracker_core.retry import Retrier
from tracker_core.stores import RunQuery, TrackingStore
from tracker_core.values import RunRecord, RunStatus
from tracker_core.webhook import WebhookError

__all__ = ["ChampionVersions", "cached_holdout", "existing_run"]

log = logging.getLogger(__name__)


def cached_holdout(tags: Mapping[str, str]) -> float | None:
    """The holdout score cached in a run's or a version's tags; None if there is none."""
    text = tags.get(T.TAG_HOLDOUT)
    try:
        return float(text) if text else None
    except ValueError:
        return None


def existing_run(tracking: TrackingStore, run_id: str) -> RunRecord:
    run = tracking.get_run(run_id)
    if run is None:
        raise PromotionError(f"run {run_id} does not exist")
    return run


class ChampionVersions:
    """The registered model's versions and aliases (see the module docstring)."""

    def __init__(
        self,
        tracking: TrackingStore,
        registry: RegistryStore | None,
        models: ModelKeeper,
        iterations: Iterations,
        config: PromotionConfig,
        clock: Clock,
        retrier: Retrier,
    ) -> None:
        self._tracking, self._registry = tracking, registry
        self._models, self._iterations = models, iterations
        self.config, self._clock, self._retrier = config, clock, retrier

    @property
    def name(self) -> str:
        """The registered model's name."""
        return self.config.registered_model or self._iterations.plugin_name

    @property
    def available(self) -> bool:
        return self._registry is not None

    @property
    def registry(self) -> RegistryStore:
        if self._registry is None:
            raise PromotionError(
                f"the tracking store {self._tracking.uri} has no model registry: promotion "
                "needs one (an MLflow tracking URI: a database or an MLflow server)"
            )
        return self._registry

    def install(self, run: RunRecord, by: str, reason: str, holdout: float | None) -> ModelVersion:
        """Protect the run's model, register it (one version per run), move the aliases,
        release the protection of what lost its last alias."""
        self._tracking.set_tags(run.run_id, {T.TAG_PROTECTED: T.TRUE})
        fresh = existing_run(self._tracking, run.run_id)
        if not is_marked(fresh) or fresh.status != RunStatus.FINISHED:
            self._tracking.set_tags(run.run_id, {T.TAG_PROTECTED: T.FALSE})
            raise PromotionError(f"run {run.run_id} holds no model of a FINISHED run")
        version = self._register(fresh, holdout)
        current = self.registry.get_version_by_alias(self.name, self.config.champion_alias)
        if current is not None and current.version != version.version:
            self.registry.set_alias(self.name, self.config.rollback_alias, current.version)
        self.registry.set_alias(self.name, self.config.champion_alias, version.version)
        self.stamp(version, None, by=by, reason=reason)
        self._release_unaliased()
        log.info("%s is now models:/%s@%s", version.uri, self.name, self.config.champion_alias)
        return version

    def _register(self, run: RunRecord, holdout: float | None) -> ModelVersion:
        """The run's version: found, else created; duplicates (a retried create) deleted."""
        versions = self.registry.search_versions(self.name, run.run_id)
        if not versions:
            self.registry.ensure_registered_model(
                self.name, {T.TAG_PLUGIN: self._iterations.plugin_name}
            )
            experiment = self._iterations.get(run.experiment_id)
            tags = {
                T.TAG_PLUGIN: self._iterations.plugin_name,
                "tracker.run_id": run.run_id,
                "tracker.experiment_id": run.experiment_id,
                "tracker.batch_id": (experiment.tags.get(T.TAG_BATCH, "") if experiment else ""),
                "tracker.model_format": run.tags.get(T.TAG_MODEL_FORMAT, ""),
            }
            if holdout is not None:
                tags[T.TAG_HOLDOUT] = repr(holdout)
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

    def stamp(
        self, version: ModelVersion, decision: Decision | None, *, by: str = "", reason: str = ""
    ) -> None:
        tags = {
            "tracker.promoted_by": decision.decided_by if decision else by,
            "tracker.promoted_ms": str(decision.decided_ms if decision else self._clock.now_ms()),
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

    def notify(self, decision: Decision) -> None:
        """Send the webhook for a decision that changed the champion, unless its delivery was
        recorded (on the version)."""
        webhook = self.config.webhook
        if webhook is None or not decision.promoted or decision.version is None:
            return
        key = decision.idempotency_key
        version = self.registry.get_version(self.name, decision.version)
        if version is None or version.tags.get(T.TAG_NOTIFIED) == key:
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
        self.registry.set_version_tags(self.name, decision.version, {T.TAG_NOTIFIED: key})
