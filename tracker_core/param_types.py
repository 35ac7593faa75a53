"""From a declared type to its codec: the fields of a frozen attrs class, and the rule of
which annotations :class:`~tracker_core.params.FineTuningParams` supports.

:func:`_compile` turns a declared type into its :class:`~tracker_core.param_codecs._Codec`
(or raises :class:`~tracker_core.param_codecs._Unsupported` naming the rule);
:func:`_compile_attrs` compiles a frozen attrs class field by field into an :class:`_Attrs`
codec (classes may nest and recurse: ``memo`` holds those being compiled).
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import attrs

from tracker_core.errors import InvalidParamsError
from tracker_core.param_codecs import (
    _NONE_TYPE,
    _Bool,
    _Codec,
    _Dict,
    _Enum,
    _Float,
    _Int,
    _List,
    _Literal,
    _Mismatch,
    _Optional,
    _Str,
    _Tuple,
    _type_name,
    _Unsupported,
)


@attrs.frozen
class _Field:
    name: str
    alias: str  # the __init__ argument
    codec: _Codec
    declared: str


def _is_frozen(cls: type) -> bool:
    props = getattr(cls, "__attrs_props__", None)  # attrs >= 25.4
    if props is not None:
        return bool(props.is_frozen)
    return getattr(cls.__setattr__, "__name__", "") == "_frozen_setattrs"


class _Attrs(_Codec):
    """A frozen attrs class: JSON object of its fields, by field name."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.fields: dict[str, _Field] = {}  # filled by _compile_attrs (classes may recurse)

    def describe(self) -> str:
        return self.cls.__qualname__

    def normalise(self, value: Any) -> Any:
        if type(value) is self.cls:
            given = {name: getattr(value, name) for name in self.fields}
        elif isinstance(value, Mapping):  # its fields by name, as stored
            unknown = sorted(str(k) for k in value if k not in self.fields)
            if unknown:
                raise self.refuse(value, f"no field named {', '.join(unknown)}")
            given = dict(value)
        else:
            reason = "a subclass would come back as its base" if isinstance(value, self.cls) else ""
            raise self.refuse(value, reason)
        kwargs = {}
        for name, item in given.items():
            field = self.fields[name]
            try:
                kwargs[field.alias] = field.codec.normalise(item)
            except _Mismatch as exc:
                raise exc.at(f".{name}") from None
        try:
            return self.cls(**kwargs)
        except InvalidParamsError as exc:  # a nested FineTuningParams refused its own values
            raise self.refuse(value, str(exc)) from None
        except (TypeError, ValueError) as exc:  # a missing field, the class's own validators
            raise self.refuse(value, f"{self.describe()}(...) raised {exc}") from None

    def encode(self, value: Any) -> Any:
        return {n: f.codec.encode(getattr(value, n)) for n, f in self.fields.items()}


_SCALAR_CODECS: dict[Any, _Codec] = {int: _Int(), float: _Float(), bool: _Bool(), str: _Str()}


def _compile(tp: Any, memo: dict[type, _Attrs]) -> _Codec:
    """The codec of a declared type; raises :class:`_Unsupported`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not _NONE_TYPE]
        if len(inner) != 1:
            raise _Unsupported(f"{_type_name(tp)}: the only unions supported are 'X | None'")
        return _Optional(_compile(inner[0], memo))
    if origin is Literal:
        return _Literal(args)
    if origin is list and len(args) == 1:
        return _List(_compile(args[0], memo))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _Tuple((_compile(args[0], memo),), variadic=True)
        if Ellipsis not in args:
            return _Tuple(tuple(_compile(a, memo) for a in args), variadic=False)
    if origin is dict and len(args) == 2:
        if args[0] is not str:
            raise _Unsupported(f"{_type_name(tp)}: dict keys must be str (JSON object keys)")
        return _Dict(_compile(args[1], memo))
    if origin is None and isinstance(tp, type):
        if tp in _SCALAR_CODECS:
            return _SCALAR_CODECS[tp]
        if issubclass(tp, enum.Enum):
            return _Enum(tp)
        if attrs.has(tp):
            return _compile_attrs(tp, memo)
        if tp in (list, tuple, dict):
            raise _Unsupported(f"bare {tp.__name__}: give its item types, e.g. list[int]")
    raise _Unsupported(f"type {_type_name(tp)} is not supported")


def _compile_attrs(cls: type, memo: dict[type, _Attrs]) -> _Attrs:
    if cls in memo:
        return memo[cls]
    if not _is_frozen(cls):
        raise _Unsupported(
            f"{cls.__qualname__} is not frozen: use @attrs.frozen, so values cannot change "
            "after they are checked"
        )
    if getattr(cls, "__eq__") is object.__eq__:  # noqa: B009 (mypy: a class, not an instance)
        raise _Unsupported(
            f"{cls.__qualname__} has eq=False: values read back would never be equal"
        )
    codec = memo[cls] = _Attrs(cls)
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:  # NameError for a name only defined in a function, ...
        raise _Unsupported(
            f"cannot resolve the annotations of {cls.__qualname__} ({exc}); define the types "
            "it uses at module level"
        ) from None
    for field in attrs.fields(cls):
        where = f"{cls.__qualname__}.{field.name}"
        if not field.init:
            raise _Unsupported(f"{where} has init=False: its stored value could not be set back")
        tp = hints.get(field.name, field.type)
        try:
            field_codec = _compile(tp, memo)
        except _Unsupported as exc:
            raise _Unsupported(f"{where}: {exc}") from None
        codec.fields[field.name] = _Field(
            field.name, field.alias or field.name, field_codec, field_codec.describe()
        )
    return codec
