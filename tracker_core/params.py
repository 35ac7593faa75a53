"""Fine-tuning params: typed values that round-trip through MLflow's string params.

Users subclass :class:`FineTuningParams` as an attrs class::

    @attrs.frozen
    class MyParams(FineTuningParams):
        lr: float
        epochs: int = 3
        layers: list[int] = attrs.field(factory=lambda: [64, 32])

Supported field types: ``int``, ``float``, ``bool``, ``str``, :class:`enum.Enum` subclasses,
``list`` of these, and ``X | None`` of any of them. Anything else is rejected when the params
are created, before anything is written.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import types
import typing
from typing import Any, ClassVar, Self

import attrs

from tracker_core.errors import InvalidParamsError

__all__ = ["PARAM_PREFIX", "FineTuningParams"]

PARAM_PREFIX = "params."
_SCALARS = (bool, int, float, str)


def _check_type(tp: Any, where: str) -> None:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise InvalidParamsError(f"{where}: only 'X | None' unions are supported, got {tp!r}")
        _check_type(args[0], where)
        return
    if origin is list:
        (item,) = typing.get_args(tp) or (None,)
        if item is None or typing.get_origin(item) is list:
            raise InvalidParamsError(f"{where}: lists need one scalar item type, got {tp!r}")
        _check_type(item, where)
        return
    if tp in _SCALARS or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return
    raise InvalidParamsError(
        f"{where}: type {tp!r} cannot round-trip through MLflow params "
        "(use int, float, bool, str, an Enum, a list of these, or X | None)"
    )


def _encode(value: Any) -> Any:
    """A JSON-able canonical form of a param value."""
    if isinstance(value, enum.Enum):
        return _encode(value.value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidParamsError(f"param value must be finite, got {value!r}")
        return value
    if value is None or isinstance(value, _SCALARS):
        return value
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    raise InvalidParamsError(f"param value {value!r} of type {type(value).__name__} is unsupported")


def _decode(tp: Any, raw: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if raw is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decode(inner, raw, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(raw, list):
            raise InvalidParamsError(f"{where}: expected a list, got {raw!r}")
        return [_decode(item, v, where) for v in raw]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(raw)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
    elif tp is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
    elif tp is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
    elif tp is str and isinstance(raw, str):
        return raw
    raise InvalidParamsError(f"{where}: cannot read {raw!r} as {tp!r}")


@attrs.frozen
class FineTuningParams:
    """Base class of a run's hyper-parameters.

    A run's identity is :attr:`id`, a stable hash of the canonical params: the same params in
    the same iteration mean the same run, across processes and Python versions.
    """

    _field_types: ClassVar[dict[type, dict[str, Any]]] = {}

    def __attrs_post_init__(self) -> None:
        self.to_dict()  # validates types and values before anything is written

    @classmethod
    def _types(cls) -> dict[str, Any]:
        cached = FineTuningParams._field_types.get(cls)
        if cached is None:
            if not attrs.has(cls):
                raise InvalidParamsError(f"{cls.__name__} must be an attrs class (@attrs.frozen)")
            hints = typing.get_type_hints(cls)
            cached = {}
            for field in attrs.fields(cls):
                tp = hints.get(field.name, field.type)
                _check_type(tp, f"{cls.__name__}.{field.name}")
                cached[field.name] = tp
            FineTuningParams._field_types[cls] = cached
        return cached

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON-able values, by field name."""
        return {name: _encode(getattr(self, name)) for name in self._types()}

    @property
    def id(self) -> str:
        """Stable identity: sha256 of the canonical JSON of the params, 16 hex digits."""
        canonical = json.dumps(
            {"__type__": type(self).__name__, **self.to_dict()},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def to_mlflow(self) -> dict[str, str]:
        """MLflow params (strings): plain ``str`` fields as they are, every other field as JSON."""
        types_ = self._types()
        return {
            PARAM_PREFIX + name: value if types_[name] is str else json.dumps(value)
            for name, value in self.to_dict().items()
        }

    @classmethod
    def from_mlflow(cls, params: typing.Mapping[str, str]) -> Self:
        """Rebuild typed params from the strings MLflow stored; unknown keys are ignored."""
        kwargs: dict[str, Any] = {}
        for name, tp in cls._types().items():
            key = PARAM_PREFIX + name
            if key not in params:
                continue
            text = params[key]
            where = f"{cls.__name__}.{name}"
            if tp is str:
                raw: Any = text
            else:
                try:
                    raw = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise InvalidParamsError(f"{where}: stored value {text!r} is not JSON") from exc
            kwargs[name] = _decode(tp, raw, where)
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise InvalidParamsError(
                f"cannot rebuild {cls.__name__} from MLflow params: {exc}"
            ) from exc
