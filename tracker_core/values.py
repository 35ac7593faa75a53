"""Frozen value types shared by the manager and every store.

Records returned by a store are frozen: nobody mutates shared state by accident.
"""

from __future__ import annotations

import enum
import math
import numbers
import posixpath
import re
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
    "validate_metric_name",
    "validate_name",
]

EXPERIMENT_PREFIX = "iteration"
INITIAL_EXPERIMENT_NAME = f"{EXPERIMENT_PREFIX} / initial"
INITIAL_RUN_NAME = "initial_model"


#: longest plugin name or batch id: an experiment name must stay within MLflow's 500 characters
MAX_NAME_LENGTH = 200
#: MLflow's limit on metric, param and tag keys
MAX_KEY_LENGTH = 250
_INT64 = (-(2**63), 2**63 - 1)
# MLflow's rule for metric and param names (mlflow.utils.validation): alphanumerics,
# underscores, dashes, periods, spaces, colons and slashes
_METRIC_NAME = re.compile(r"^[/\w.\- :]+$")


def validate_name(value: str, what: str) -> str:
    """Check that ``value`` is a usable name component: a non-empty string of printable
    characters, at most :data:`MAX_NAME_LENGTH` long, without surrounding whitespace, a path
    separator or ``..`` (names become experiment names and folder names)."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidNameError(f"{what} must be a non-empty string, got {value!r}")
    if value != value.strip():
        raise InvalidNameError(f"{what} must not start or end with whitespace, got {value!r}")
    if not value.isprintable():
        raise InvalidNameError(
            f"{what} must hold printable characters only (no newline, tab or control "
            f"character), got {value!r}"
        )
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidNameError(
            f"{what} is {len(value)} characters long; at most {MAX_NAME_LENGTH} are allowed "
            f"(it becomes part of MLflow experiment names and folder names): {value[:40]!r}..."
        )
    if "/" in value or "\\" in value or ".." in value:
        raise InvalidNameError(f"{what} must not contain a path separator or '..', got {value!r}")
    return value


_VALID_METRIC_NAMES: set[str] = set()  # names already checked (metrics repeat their names)


def validate_metric_name(value: str, what: str = "metric name") -> str:
    """Check a metric name against MLflow's own rule, so a name MLflow would refuse at flush
    time (losing the batch it travels in) is refused here, when the value is created."""
    if isinstance(value, str) and value in _VALID_METRIC_NAMES:
        return value
    if not isinstance(value, str) or not value.strip():
        raise InvalidMetricError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidMetricError(
            f"{what} is {len(value)} characters long; MLflow allows {MAX_KEY_LENGTH}: "
            f"{value[:40]!r}..."
        )
    if not _METRIC_NAME.match(value):
        raise InvalidMetricError(
            f"{what} {value!r} is not a valid MLflow metric name: use letters, digits, "
            "underscores, dashes, periods, spaces, colons and slashes only"
        )
    normalised = posixpath.normpath(value)
    if normalised != value or normalised == "." or value.startswith(("..", "/")):
        raise InvalidMetricError(
            f"{what} {value!r} is not a valid MLflow metric name: no leading slash, '//', "
            "'.' or '..' path components, no trailing slash"
        )
    if len(_VALID_METRIC_NAMES) < 10_000:
        _VALID_METRIC_NAMES.add(value)
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

    ``batch_id`` names the data batch it trains on (required: the same batch resumes the same
    iteration); ``run_id`` is the run the iteration started from (optional).
    """

    plugin_name: str = attrs.field(validator=_name_validator("plugin_name"))
    batch_id: str = attrs.field(validator=_name_validator("batch_id"))
    run_id: str | None = attrs.field(default=None, validator=_optional_name_validator("run_id"))

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
    """Numbers (int, float, numpy scalars, one-element tensors) become floats; anything else is
    left for the validator to refuse with a clear message."""
    if type(value) is float:
        return value
    if isinstance(value, bool | str | bytes) or value is None:
        return value
    if isinstance(value, numbers.Real) or hasattr(value, "__float__"):
        try:
            return float(value)
        except OverflowError as exc:
            raise InvalidMetricError(
                f"metric value {str(value)[:40]} is too large for a 64-bit float"
            ) from exc
        except Exception as exc:  # e.g. a tensor of several elements
            raise InvalidMetricError(
                f"metric value of type {type(value).__name__} is not one number: {exc}"
            ) from exc
    return value


def _check_value(value: Any) -> float:
    number = _to_float(value)
    if not isinstance(number, float):
        raise InvalidMetricError(
            f"metric value must be a number, got {type(number).__name__} {number!r}"
        )
    if not math.isfinite(number):
        raise InvalidMetricError(f"metric value must be finite, got {number!r}")
    return number


def _check_step(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidMetricError(f"metric step must be an int, got {type(value).__name__}")
    if not _INT64[0] <= value <= _INT64[1]:
        raise InvalidMetricError(f"metric step {value} does not fit in 64 bits")
    return value


def _check_timestamp(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT64[1]:
        raise InvalidMetricError(f"metric timestamp_ms must be an int >= 0, got {value!r}")
    return value


@attrs.frozen(init=False)
class MetricValue:
    """One value of a named metric. ``timestamp_ms`` is fixed at creation so a retried
    upload of the same value is recognised as the same point, never counted twice.

    Validated when created, against MLflow's own rules, so nothing MLflow would refuse is ever
    queued: the name (letters, digits, ``_ - . : /`` and spaces, at most 250 characters), a
    finite value that fits a 64-bit float (ints, floats, numpy scalars, one-element tensors),
    an int step. Raises :class:`~tracker_core.errors.InvalidMetricError`.
    """

    name: str
    value: float
    step: int | None = attrs.field(default=None, kw_only=True)
    timestamp_ms: int = attrs.field(default=0, kw_only=True)

    def __init__(
        self,
        name: str,
        value: float,
        *,
        step: int | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        # the checks are written out, not attrs validators: a training loop makes millions of
        # values, and this is most of what save_metric costs its caller (benchmarks/)
        if type(name) is not str or name not in _VALID_METRIC_NAMES:
            validate_metric_name(name)
        if type(value) is not float or not math.isfinite(value):
            value = _check_value(value)
        if step is not None:
            step = _check_step(step)
        if timestamp_ms is None:
            timestamp_ms = time.time_ns() // 1_000_000
        else:
            timestamp_ms = _check_timestamp(timestamp_ms)
        setter = object.__setattr__
        setter(self, "name", name)
        setter(self, "value", value)
        setter(self, "step", step)
        setter(self, "timestamp_ms", timestamp_ms)

    @classmethod
    def _derived(cls, name: str, value: float, step: int, timestamp_ms: int) -> MetricValue:
        """Internal fast path for values derived from checked ones (a step filled in, an
        accumulator's series): no validation, no conversion."""
        self = object.__new__(cls)
        setter = object.__setattr__
        setter(self, "name", name)
        setter(self, "value", value)
        setter(self, "step", step)
        setter(self, "timestamp_ms", timestamp_ms)
        return self

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
