"""Frozen value types shared by the manager and every store.

Records returned by a store are frozen: nobody mutates shared state by accident.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Mapping
from typing import Any

import attrs

from tracker_core.errors import InvalidMetricError, InvalidNameError

__all__ = [
    "EXPERIMENT_PREFIX",
    "INITIAL_EXPERIMENT_NAME",
    "INITIAL_RUN_NAME",
    "ExperimentRecord",
    "FineTuningIteration",
    "MetricValue",
    "RunRecord",
    "RunStatus",
    "validate_name",
]

EXPERIMENT_PREFIX = "iteration"
INITIAL_EXPERIMENT_NAME = f"{EXPERIMENT_PREFIX} / initial"
INITIAL_RUN_NAME = "initial_model"


def validate_name(value: str, what: str) -> str:
    """Check that ``value`` is a usable name component: non-empty, no path separator, no ``..``."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidNameError(f"{what} must be a non-empty string, got {value!r}")
    if "/" in value or "\\" in value or ".." in value or "\x00" in value:
        raise InvalidNameError(f"{what} must not contain a path separator or '..', got {value!r}")
    return value


def _name_validator(what: str) -> Any:
    def check(_inst: object, _attr: attrs.Attribute[Any], value: str) -> None:
        validate_name(value, what)

    return check


def _optional_name_validator(what: str) -> Any:
    def check(_inst: object, _attr: attrs.Attribute[Any], value: str | None) -> None:
        if value is not None:
            validate_name(value, what)

    return check


@attrs.frozen
class FineTuningIteration:
    """A fine-tuning iteration: the experiment ``<plugin> / iteration / <run> / <batch>``.

    ``run_id`` is the run the iteration started from (optional); ``batch_id`` the data batch
    it trains on.
    """

    plugin_name: str = attrs.field(validator=_name_validator("plugin_name"))
    batch_id: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    run_id: str | None = attrs.field(default=None, validator=_optional_name_validator("run_id"))

    @batch_id.validator
    def _check_batch(self, _attr: attrs.Attribute[Any], value: str) -> None:
        if value:
            validate_name(value, "batch_id")

    def __str__(self) -> str:
        return f"{self.plugin_name} / {EXPERIMENT_PREFIX} / {self.run_id or ''} / {self.batch_id}"

    @property
    def experiment_name(self) -> str:
        return str(self)

    def to_params(self) -> dict[str, str]:
        """The iteration fields logged as params of each of its runs."""
        return {
            "iteration.plugin_name": self.plugin_name,
            "iteration.batch_id": self.batch_id,
            "iteration.run_id": self.run_id or "",
        }


def _to_float(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value  # left for the validator to reject with a clear message


def _finite(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidMetricError(f"{attr.name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidMetricError(f"metric value must be finite, got {value!r}")


@attrs.frozen
class MetricValue:
    """One value of a named metric. ``timestamp_ms`` is fixed at creation so a retried
    upload of the same value is recognised as the same point, never counted twice."""

    name: str = attrs.field(validator=_name_validator("metric name"))
    value: float = attrs.field(converter=_to_float, validator=_finite)
    step: int | None = attrs.field(default=None, kw_only=True)
    timestamp_ms: int = attrs.field(factory=lambda: int(time.time() * 1000), kw_only=True)

    def add_prefix(self, prefix: str) -> MetricValue:
        """A copy named ``<prefix>_<name>``."""
        return attrs.evolve(self, name=f"{prefix}_{self.name}")


class RunStatus(enum.StrEnum):
    RUNNING = "RUNNING"
    SCHEDULED = "SCHEDULED"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"

    @property
    def is_terminal(self) -> bool:
        return self in (RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED)


def _frozen_map(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    from types import MappingProxyType

    return MappingProxyType(dict(value or {}))


@attrs.frozen
class ExperimentRecord:
    """An MLflow experiment as the manager sees it."""

    experiment_id: str
    name: str
    artifact_location: str
    creation_time_ms: int = 0
    tags: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    lifecycle_stage: str = "active"


@attrs.frozen
class RunRecord:
    """A run as the manager sees it: identity, status, latest metric values, params, tags."""

    run_id: str
    experiment_id: str
    run_name: str
    status: RunStatus = attrs.field(converter=RunStatus)
    artifact_uri: str
    start_time_ms: int = 0
    end_time_ms: int | None = None
    metrics: Mapping[str, float] = attrs.field(factory=dict, converter=_frozen_map)
    params: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    tags: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
