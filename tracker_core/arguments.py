"""Checks of the arguments given to ``connect`` and the seed's classes, made when they are
given, before anything is written: a refusal is an
:class:`~tracker_core.errors.InvalidArgumentError` naming the argument, the value and what
is allowed (a value that holds a URI is shown redacted).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn, TypeVar

import attrs

from tracker_core.errors import InvalidArgumentError
from tracker_core.uris import redact_text

__all__ = [
    "MAX_LEASE_SECONDS",
    "flag",
    "instances",
    "optional_callable",
    "optional_instance",
    "optional_mapping",
    "optional_store",
    "optional_subclass",
    "optional_text",
    "positive_int",
    "refuse",
    "seconds",
    "secret_text",
    "string_list",
    "text",
    "validator",
]

T = TypeVar("T")

#: a week: a dead worker's run locked longer than that helps nobody (a live one renews)
MAX_LEASE_SECONDS = 7 * 24 * 3600.0


def _show(value: Any) -> str:
    shown = redact_text(repr(value))
    return shown if len(shown) <= 80 else f"{shown[:77]}..."


def refuse(name: str, value: Any, allowed: str, *, secret: bool = False) -> NoReturn:
    """Raise :class:`InvalidArgumentError`: ``name=value`` is refused, ``allowed`` is. A
    ``secret`` value is shown as its type only."""
    shown = f"<{type(value).__name__}>" if secret else _show(value)
    raise InvalidArgumentError(f"{name}={shown} is refused: {allowed}")


def validator(
    check: Callable[[str, Any], object],
) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    """An attrs validator running ``check(field name, value)``."""

    def run(_instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        check(attribute.name, value)

    return run


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(name: str, value: Any) -> int:
    """An ``int`` (not a bool, not a float) of at least 1."""
    if not _is_int(value) or value < 1:
        refuse(name, value, "an int of at least 1")
    return int(value)


def flag(name: str, value: Any) -> bool:
    """``True`` or ``False`` (numpy's bools too), nothing truthy."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    refuse(name, value, "True or False")


def seconds(name: str, value: Any, *, maximum: float) -> float:
    """A finite number of seconds, more than 0 and at most ``maximum``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= maximum
    ):
        refuse(name, value, f"a number of seconds, more than 0 and at most {maximum:g}")
    return float(value)


def text(name: str, value: Any) -> str:
    """A non-empty ``str`` without control characters."""
    if not isinstance(value, str) or not value.strip() or not value.isprintable():
        refuse(name, value, "a non-empty text without control characters")
    return value


def optional_text(name: str, value: Any) -> str | None:
    """None, or :func:`text`."""
    return None if value is None else text(name, value)


def secret_text(name: str, value: Any) -> str:
    """:func:`text` for a secret: a refusal never shows the value."""
    if not isinstance(value, str) or not value.strip() or not value.isprintable():
        refuse(name, value, "a non-empty text without control characters", secret=True)
    return value


def string_list(name: str, value: Any) -> list[str] | None:
    """None, or a list/tuple of non-empty one-line texts (a single ``str`` is refused: it
    would be read as its characters)."""
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        refuse(name, value, "None or a list of texts (e.g. ['torch==2.13.0'])")
    items = list(value)
    for item in items:
        if not isinstance(item, str) or not item.strip() or not item.isprintable():
            refuse(name, value, "a list of non-empty one-line texts")
    return items


def optional_instance(name: str, value: T | None, cls: type[Any], what: str) -> T | None:
    """None, or an instance of ``cls`` (``what`` names it in the refusal)."""
    if value is not None and not isinstance(value, cls):
        refuse(name, value, f"None or {what}")
    return value


def optional_store(name: str, value: Any, abc: type[Any]) -> Any:
    """None, or a store: an instance of ``abc``, or an object with every one of its abstract
    methods (a wrapper that delegates to a store, as fault-injection tests use)."""
    if value is None or isinstance(value, abc):
        return value
    missing = sorted(m for m in abc.__abstractmethods__ if not callable(getattr(value, m, None)))
    if missing:
        refuse(name, value, f"None or a {abc.__name__} (this lacks {', '.join(missing[:4])})")
    return value


def instances(name: str, value: Any, cls: type[T], what: str) -> tuple[T, ...]:
    """An iterable (not a str) of ``cls`` instances, as a tuple."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        refuse(name, value, f"a list of {what}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, cls):
            refuse(name, value, f"a list of {what}; {_show(item)} is not one")
    return items


def optional_callable(name: str, value: Callable[..., T] | None, what: str) -> Any:
    """None, or something callable (``what`` says what calling it gives)."""
    if value is not None and not callable(value):
        refuse(name, value, f"None or a callable that returns {what}")
    return value


def optional_mapping(name: str, value: Any) -> dict[str, Any] | None:
    """None, or a mapping with ``str`` keys (as a dict)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        refuse(name, value, "None or a mapping with str keys")
    return dict(value)


def optional_subclass(name: str, value: Any, base: type[T]) -> type[T] | None:
    """None, or a subclass of ``base`` (the class itself, not an instance)."""
    if value is not None and not (isinstance(value, type) and issubclass(value, base)):
        refuse(name, value, f"None or a subclass of {base.__name__} (the class, not an instance)")
    return value
