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

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Self

import attrs

from tracker_core.errors import InvalidParamsError
from tracker_core.param_codecs import _Mismatch, _show, _Str, _Unsupported
from tracker_core.param_types import _Attrs, _compile_attrs

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
