"""What promotion decides, as values: the :class:`Decision` on a challenger (or a person's
promotion, or a rollback), the :class:`Champion` an alias points at, and
:class:`PromotionConfig` (the registered model, the margin, the aliases, the webhook). The
decisions themselves are :class:`~tracker_core.promotion.Promoter`'s."""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Mapping
from typing import Any

import attrs

from tracker_core.errors import ConfigurationError
from tracker_core.registry_store import ModelVersion
from tracker_core.values import RunRecord
from tracker_core.webhook import Webhook

__all__ = ["Champion", "Decision", "Outcome", "PromotionConfig", "reason_of"]


class Outcome(enum.StrEnum):
    PROMOTED = "promoted"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"


def _min_delta(_inst: object, _attr: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"min_delta must be a number >= 0, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ConfigurationError(f"min_delta must be a finite number >= 0, got {value!r}")


@attrs.frozen
class PromotionConfig:
    """How challengers are promoted: the registered model (default: the plugin name), the
    margin a challenger must beat the champion by on the holdout, the two aliases, and an
    optional webhook."""

    registered_model: str | None = None
    min_delta: float = attrs.field(default=0.0, validator=_min_delta)
    champion_alias: str = "champion"
    rollback_alias: str = "previous-champion"
    webhook: Webhook | None = None

    @classmethod
    def from_env(cls) -> PromotionConfig:
        """``$TRACKER_CORE_REGISTERED_MODEL``, ``$TRACKER_CORE_MIN_DELTA`` and the webhook's
        variables (:meth:`Webhook.from_env`): what a task service worker is given."""
        delta = os.environ.get("TRACKER_CORE_MIN_DELTA")
        return cls(
            registered_model=os.environ.get("TRACKER_CORE_REGISTERED_MODEL") or None,
            min_delta=float(delta) if delta else 0.0,
            webhook=Webhook.from_env(),
        )


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


@attrs.frozen
class Decision:
    """What happened to the champion: the challenger (or the run a person chose), both holdout
    scores, the version it is (when it serves), who decided, when, and why."""

    outcome: Outcome = attrs.field(converter=Outcome)
    registered_model: str
    run_id: str
    holdout: float | None = attrs.field(converter=_opt_float)
    champion_run_id: str | None
    champion_version: str | None
    champion_holdout: float | None = attrs.field(converter=_opt_float)
    version: str | None
    min_delta: float
    decided_by: str
    decided_ms: int
    reason: str

    @property
    def promoted(self) -> bool:
        return self.outcome != Outcome.REJECTED

    @property
    def idempotency_key(self) -> str:
        return f"{self.registered_model}/{self.version}/{self.outcome.value}/{self.decided_ms}"

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self) | {"outcome": self.outcome.value}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Decision:
        fields: dict[str, Any] = {f.name: data.get(f.name) for f in attrs.fields(cls)}
        return cls(**fields)


@attrs.frozen
class Champion:
    """The version an alias points at, its run (None if the run is gone) and holdout score."""

    version: ModelVersion
    run: RunRecord | None
    holdout: float | None

    @property
    def run_id(self) -> str | None:
        return self.version.run_id


def reason_of(decision: Decision) -> str:
    """One line: the decision and its scores."""
    scores = f"holdout {decision.holdout!r}"
    if decision.champion_holdout is not None:
        scores += f" vs champion {decision.champion_holdout!r}"
    return f"{decision.reason} ({scores})"
