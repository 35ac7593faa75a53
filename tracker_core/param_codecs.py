"""The per-type value codecs behind :class:`~tracker_core.params.FineTuningParams`.

One :class:`_Codec` per supported declared type (``int``, ``float``, ``bool``, ``str``, Enum,
``Literal``, ``list``, ``tuple``, ``dict[str, X]``, ``X | None``; frozen attrs classes in
:mod:`tracker_core.param_types`) checks, normalises and encodes a field's value;
:mod:`tracker_core.param_types` turns a declared type into its codec, or raises
:class:`_Unsupported`. A value that
does not fit raises :class:`_Mismatch`, which :mod:`tracker_core.params` turns into
:class:`~tracker_core.errors.InvalidParamsError`. See :mod:`tracker_core.params` for the rule
and the table of supported types.
"""

from __future__ import annotations

import abc
import enum
import math
import numbers
import typing
from collections.abc import Mapping, Sequence
from typing import Any

_NONE_TYPE = type(None)
_SHOW_MAX = 80


def _show(value: Any) -> str:
    """A value for an error message: its repr (shortened) and its type."""
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        text = object.__repr__(value)
    if len(text) > _SHOW_MAX:
        text = f"{text[: _SHOW_MAX - 20]}...{text[-15:]} ({len(text)} characters)"
    return f"{text} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__qualname__
    return repr(tp).replace("typing.", "")


class _Mismatch(Exception):
    """A value does not fit its codec; ``path`` locates it inside the field's value."""

    def __init__(self, expected: str, value: Any, reason: str = "", path: str = "") -> None:
        super().__init__(expected, value, reason, path)
        self.expected = expected
        self.value = value
        self.reason = reason
        self.path = path

    def at(self, step: str) -> _Mismatch:
        return _Mismatch(self.expected, self.value, self.reason, step + self.path)

    def describe(self, where: str, declared: str, value: Any) -> str:
        """The message of the :class:`InvalidParamsError` for field ``where``."""
        text = f"{where} is declared {declared}, got {_show(value)}"
        if self.path:
            text += f"; {where}{self.path} is {_show(self.value)}, expected {self.expected}"
        return f"{text}: {self.reason}" if self.reason else text


class _Unsupported(Exception):
    """A declared type cannot round-trip."""


# ---------------------------------------------------------------------- codecs
class _Codec(abc.ABC):
    """How one declared type checks, normalises and encodes values.

    ``encode(normalise(x))`` is JSON-able, and ``normalise(json.loads(json.dumps(encoded)))``
    gives back an equal value: that is what makes every accepted value round-trip.
    """

    @abc.abstractmethod
    def describe(self) -> str:
        """The declared type, as users write it."""

    @abc.abstractmethod
    def normalise(self, value: Any) -> Any:
        """``value`` in the declared type; raises :class:`_Mismatch`."""

    def encode(self, value: Any) -> Any:
        """A normalised value's canonical JSON-able form."""
        return value

    def refuse(self, value: Any, reason: str = "") -> _Mismatch:
        return _Mismatch(self.describe(), value, reason)


class _Int(_Codec):
    def describe(self) -> str:
        return "int"

    def normalise(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise self.refuse(value)
        return int(value)


class _Float(_Codec):
    def describe(self) -> str:
        return "float"

    def normalise(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self.refuse(value)
        try:
            number = float(value)
        except OverflowError:
            raise self.refuse(value, "too large for a float") from None
        if not math.isfinite(number):
            raise self.refuse(value, "must be finite")
        return number + 0.0  # -0.0 == 0.0, so they are one value (and one run)


class _Bool(_Codec):
    def describe(self) -> str:
        return "bool"

    def normalise(self, value: Any) -> Any:
        if not isinstance(value, bool):
            raise self.refuse(value)
        return value


class _Str(_Codec):
    def describe(self) -> str:
        return "str"

    def normalise(self, value: Any) -> Any:
        if not isinstance(value, str):
            raise self.refuse(value)
        if "\x00" in value:
            raise self.refuse(value, "a NUL character cannot be stored by tracking databases")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise self.refuse(value, "not valid Unicode text (a lone surrogate)") from None
        return str.__str__(value)  # a str subclass (a StrEnum member, ...) as a plain str


_JSON_SCALARS = (str, int, float, bool)


class _Enum(_Codec):
    def __init__(self, cls: type[enum.Enum]) -> None:
        for member in cls:
            value = member.value
            if type(value) not in _JSON_SCALARS or (
                isinstance(value, float) and not math.isfinite(value)
            ):
                raise _Unsupported(
                    f"enum {cls.__qualname__} has member {member.name} = {_show(value)}; "
                    "member values must be str, int, finite float or bool"
                )
        self.cls = cls

    def describe(self) -> str:
        return self.cls.__qualname__

    def normalise(self, value: Any) -> Any:
        if isinstance(value, self.cls):
            return value
        if isinstance(value, enum.Enum):
            raise self.refuse(value, f"a member of {type(value).__qualname__}")
        try:
            member = self.cls(value)
        except (ValueError, TypeError):
            raise self.refuse(value, f"not a member of {self.describe()} nor its value") from None
        if type(member.value) is not type(value):  # True is not 1, 1.0 is not 1
            raise self.refuse(value, f"the value of {member} is {_show(member.value)}")
        return member

    def encode(self, value: Any) -> Any:
        return value.value


class _Literal(_Codec):
    def __init__(self, values: tuple[Any, ...]) -> None:
        for value in values:
            if type(value) not in (str, int, bool, _NONE_TYPE):
                raise _Unsupported(
                    f"Literal value {_show(value)}: Literal values must be str, int or bool"
                )
        self.values = values

    def describe(self) -> str:
        return f"Literal[{', '.join(map(repr, self.values))}]"

    def normalise(self, value: Any) -> Any:
        for allowed in self.values:
            if type(allowed) is type(value) and allowed == value:
                return allowed
        raise self.refuse(value)


class _Optional(_Codec):
    def __init__(self, inner: _Codec) -> None:
        self.inner = inner

    def describe(self) -> str:
        return f"{self.inner.describe()} | None"

    def normalise(self, value: Any) -> Any:
        return None if value is None else self.inner.normalise(value)

    def encode(self, value: Any) -> Any:
        return None if value is None else self.inner.encode(value)


def _items(codec: _Codec, value: Any) -> Sequence[Any]:
    if isinstance(value, str | bytes | bytearray) or not isinstance(value, Sequence):
        raise codec.refuse(value, "not a sequence")
    return value


class _List(_Codec):
    def __init__(self, item: _Codec) -> None:
        self.item = item

    def describe(self) -> str:
        return f"list[{self.item.describe()}]"

    def normalise(self, value: Any) -> Any:
        out = []
        for index, item in enumerate(_items(self, value)):
            try:
                out.append(self.item.normalise(item))
            except _Mismatch as exc:
                raise exc.at(f"[{index}]") from None
        return out

    def encode(self, value: Any) -> Any:
        return [self.item.encode(v) for v in value]


class _Tuple(_Codec):
    """``tuple[X, ...]`` (``items`` is one codec, ``variadic``) or ``tuple[X, Y]``."""

    def __init__(self, items: tuple[_Codec, ...], variadic: bool) -> None:
        self.items = items
        self.variadic = variadic

    def describe(self) -> str:
        if self.variadic:
            return f"tuple[{self.items[0].describe()}, ...]"
        return f"tuple[{', '.join(c.describe() for c in self.items) or '()'}]"

    def _codec(self, index: int) -> _Codec:
        return self.items[0] if self.variadic else self.items[index]

    def normalise(self, value: Any) -> Any:
        seq = _items(self, value)
        if not self.variadic and len(seq) != len(self.items):
            raise self.refuse(value, f"{len(seq)} items instead of {len(self.items)}")
        out = []
        for index, item in enumerate(seq):
            try:
                out.append(self._codec(index).normalise(item))
            except _Mismatch as exc:
                raise exc.at(f"[{index}]") from None
        return tuple(out)

    def encode(self, value: Any) -> Any:
        return [self._codec(i).encode(v) for i, v in enumerate(value)]


class _Dict(_Codec):
    _KEY = _Str()

    def __init__(self, value: _Codec) -> None:
        self.value = value

    def describe(self) -> str:
        return f"dict[str, {self.value.describe()}]"

    def normalise(self, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise self.refuse(value, "not a mapping")
        out = {}
        for key, item in value.items():
            try:
                norm_key = self._KEY.normalise(key)
            except _Mismatch as exc:
                reason = f"keys must be str{': ' + exc.reason if exc.reason else ''}"
                raise _Mismatch("a str key", key, reason, f"[{key!r}]") from None
            try:
                out[norm_key] = self.value.normalise(item)
            except _Mismatch as exc:
                raise exc.at(f"[{key!r}]") from None
        return out

    def encode(self, value: Any) -> Any:
        return {k: self.value.encode(v) for k, v in value.items()}
