"""Fine-tuning params: typed values that round-trip exactly through MLflow's string params.

Users subclass :class:`FineTuningParams` as a frozen attrs class::

    @attrs.frozen
    class MyParams(FineTuningParams):
        lr: float
        epochs: int = 3
        layers: list[int] = attrs.field(factory=lambda: [64, 32])
        optimizer: Literal["adam", "sgd"] = "adam"

**The rule: whatever constructs round-trips exactly** through MLflow
(``from_mlflow(to_mlflow(p)) == p`` with the same :attr:`~FineTuningParams.id`), or it is
refused with :class:`~tracker_core.errors.InvalidParamsError` when the params are created,
before anything is written.

Supported field types (nest them freely):

==============================  ==================================================================
declared type                   accepts (and normalises to)
==============================  ==================================================================
``int``                         an int (``numbers.Integral``: numpy ints too), not a bool/float
``float``                       a finite real number, not a bool: ``1`` becomes ``1.0`` (one run),
                                ``-0.0`` becomes ``0.0``
``bool``                        ``True`` or ``False`` only
``str``                         text without NUL characters or lone surrogates
an :class:`enum.Enum` subclass  a member, or a member's value of the same type (``"adam"`` for
                                ``Optimizer.ADAM``); member values must be str, int, float or bool
``Literal[...]``                one of the listed values, compared with their type (str, int, bool)
``list[X]``                     any sequence (not a string), as a list
``tuple[X, ...]``               any sequence, as a tuple
``tuple[X, Y, ...]``            a sequence of exactly that many items, as a tuple
``dict[str, X]``                any mapping with str keys, as a dict (key order kept)
``X | None``                    ``None`` or an ``X``
a frozen attrs class            an instance of exactly that class (or a mapping of its fields)
                                whose fields are all of supported types
==============================  ==================================================================

Anything else (``set``, ``Any``, ``dict[int, X]``, ``int | str``, a non-frozen class, ...) is
refused at the first construction with a message that lists these types.

MLflow keeps at most :data:`MAX_PARAM_VALUE_LENGTH` characters of a param value and truncates
longer ones (the params would come back different, as another run): params whose MLflow string
form (:meth:`FineTuningParams.to_mlflow`) is longer are refused at construction, as are field
names whose key ``params.<field>`` is longer than :data:`MAX_PARAM_KEY_LENGTH`.

How params are stored (unchanged since the first release, so stored runs keep their identity):
a plain ``str`` field as the text itself, every other field as JSON (Enum members by value,
tuples as arrays, attrs instances as objects of their fields). Normalisation happens in
:meth:`FineTuningParams.__attrs_post_init__`: a subclass that defines its own must call
``super().__attrs_post_init__()``.
"""

from __future__ import annotations

import abc
import enum
import hashlib
import json
import math
import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Self

import attrs

from tracker_core.errors import InvalidParamsError

__all__ = [
    "MAX_PARAM_KEY_LENGTH",
    "MAX_PARAM_VALUE_LENGTH",
    "PARAM_PREFIX",
    "SUPPORTED_TYPES",
    "FineTuningParams",
]

PARAM_PREFIX = "params."

#: MLflow's limit on the length of a param value, in characters
#: (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``; the tests check the two agree). The core
#: does not import MLflow, so the value is repeated here.
MAX_PARAM_VALUE_LENGTH = 6000

#: MLflow's limit on the length of a param key (``MAX_ENTITY_KEY_LENGTH``).
MAX_PARAM_KEY_LENGTH = 250

SUPPORTED_TYPES = (
    "int, float, bool, str, Enum subclasses (str/int/float/bool values), "
    "Literal[...] of str/int/bool values, list[X], tuple[X, ...], tuple[X, Y, ...], "
    "dict[str, X], X | None, and frozen attrs classes whose fields are all of these"
)

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


_CODECS: dict[type, _Attrs] = {}


def _class_codec(cls: type[FineTuningParams]) -> _Attrs:
    cached = _CODECS.get(cls)
    if cached is not None:
        return cached
    if not attrs.has(cls):
        raise InvalidParamsError(f"{cls.__name__} must be an attrs class (@attrs.frozen)")
    try:
        codec = _compile_attrs(cls, {})
    except _Unsupported as exc:
        raise InvalidParamsError(
            f"{cls.__name__} cannot be used as fine-tuning params: {exc}. Every field must "
            "round-trip exactly through MLflow's string params; supported field types: "
            f"{SUPPORTED_TYPES}."
        ) from None
    for name in codec.fields:
        if len(PARAM_PREFIX + name) > MAX_PARAM_KEY_LENGTH:
            raise InvalidParamsError(
                f"{cls.__name__}.{name}: the MLflow param key {PARAM_PREFIX}{name!r} is "
                f"{len(PARAM_PREFIX + name)} characters long; MLflow accepts at most "
                f"{MAX_PARAM_KEY_LENGTH}: use a shorter field name"
            )
    _CODECS[cls] = codec
    return codec


@attrs.frozen
class FineTuningParams:
    """Base class of a run's hyper-parameters (see the module docstring for the field types).

    Every field is checked and normalised against its declared type when the params are
    created; what cannot round-trip exactly through MLflow raises :class:`InvalidParamsError`
    naming the class, the field, the declared type and the value.

    A run's identity is :attr:`id`, a stable hash of the canonical params: the same params in
    the same iteration mean the same run, across processes and Python versions.
    """

    def __attrs_post_init__(self) -> None:
        cls = type(self)
        codec = _class_codec(cls)
        for name, field in codec.fields.items():
            value = getattr(self, name)
            try:
                normalised = field.codec.normalise(value)
            except _Mismatch as exc:
                where = f"{cls.__name__}.{name}"
                raise InvalidParamsError(exc.describe(where, field.declared, value)) from None
            object.__setattr__(self, name, normalised)  # frozen: allowed in post-init
        for key, text in self.to_mlflow().items():
            if len(text) > MAX_PARAM_VALUE_LENGTH:
                raise InvalidParamsError(
                    f"{cls.__name__}.{key[len(PARAM_PREFIX) :]}: its MLflow param {key!r} would "
                    f"be {len(text)} characters long, and MLflow keeps at most "
                    f"{MAX_PARAM_VALUE_LENGTH} characters of a param value (it would truncate "
                    "it and the params would come back different). Keep large values out of "
                    "the params: store them as a file and put its name or hash in the params."
                )

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON-able values, by field name."""
        fields = _class_codec(type(self)).fields
        return {name: f.codec.encode(getattr(self, name)) for name, f in fields.items()}

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
        fields = _class_codec(type(self)).fields
        out = {}
        for name, value in self.to_dict().items():
            key = PARAM_PREFIX + name
            if isinstance(fields[name].codec, _Str):
                out[key] = value
                continue
            try:
                out[key] = json.dumps(value)
            except ValueError as exc:  # an int of more than 4300 digits
                raise InvalidParamsError(f"{type(self).__name__}.{name}: {exc}") from None
        return out

    @classmethod
    def from_mlflow(cls, params: Mapping[str, str]) -> Self:
        """Rebuild typed params from the strings MLflow stored; unknown keys are ignored."""
        kwargs: dict[str, Any] = {}
        for name, field in _class_codec(cls).fields.items():
            key = PARAM_PREFIX + name
            if key not in params:
                continue
            text = params[key]
            if isinstance(field.codec, _Str):
                kwargs[field.alias] = text
                continue
            try:
                kwargs[field.alias] = json.loads(text)
            except ValueError as exc:
                raise InvalidParamsError(
                    f"{cls.__name__}.{name}: stored value {_show(text)} is not JSON"
                ) from exc
        try:
            return cls(**kwargs)
        except InvalidParamsError as exc:
            raise InvalidParamsError(
                f"cannot rebuild {cls.__name__} from MLflow params: {exc}"
            ) from exc
        except TypeError as exc:
            raise InvalidParamsError(
                f"cannot rebuild {cls.__name__} from MLflow params: {exc}"
            ) from exc
