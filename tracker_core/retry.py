"""The one retry policy every remote call goes through.

:class:`RetryConfig` is a value: per-operation attempts and waits, printable and comparable.
:class:`Retrier` turns it into tenacity policies and classifies errors: only transient ones
(connection, timeout, 5xx, 429, throttling) are retried; anything else fails at once.
Exhaustion raises :class:`~tracker_core.errors.MaxAttemptsReachedException` chained to the
last error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import attrs
import tenacity

from tracker_core.errors import ConfigurationError, MaxAttemptsReachedException, TransientError

__all__ = ["ErrorClassifier", "Retrier", "RetryConfig", "RetryParams", "is_builtin_transient"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: ``classifier(exc)`` returns True (transient), False (permanent) or None (no opinion).
ErrorClassifier = Callable[[BaseException], bool | None]


def _positive(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if value < 0 or (attr.name == "max_attempts" and value < 1):
        raise ConfigurationError(f"{attr.name} must be positive, got {value!r}")


@attrs.frozen
class RetryParams:
    """Attempts and waits of one operation: exponential backoff from ``wait_time_seconds``,
    capped at ``max_wait_seconds``, with jitter."""

    max_attempts: int = attrs.field(default=3, validator=_positive)
    wait_time_seconds: float = attrs.field(default=1.0, validator=_positive)
    max_wait_seconds: float = attrs.field(default=30.0, validator=_positive)


def _frozen_operations(value: Mapping[str, RetryParams]) -> Mapping[str, RetryParams]:
    from types import MappingProxyType

    return MappingProxyType(dict(value))


@attrs.frozen
class RetryConfig:
    """Retry parameters by operation name, with a default.

    Operation names are the manager's: ``log_metric``, ``log_params``, ``search``,
    ``create``, ``upload_model``, ``download_model``, ``delete_model``... Indexing with an
    unknown name gives the default, so ``config["upload_model"]`` always works.
    """

    default_params: RetryParams = RetryParams()
    operations: Mapping[str, RetryParams] = attrs.field(factory=dict, converter=_frozen_operations)

    def __getitem__(self, operation: str) -> RetryParams:
        return self.operations.get(operation, self.default_params)

    def with_operation(self, operation: str, params: RetryParams) -> RetryConfig:
        return attrs.evolve(self, operations={**self.operations, operation: params})


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what caused it (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def classify_chain(exc: BaseException, classify_one: ErrorClassifier) -> bool | None:
    """The first verdict ``classify_one`` gives along the exception chain of ``exc``."""
    for link in exception_chain(exc):
        verdict = classify_one(link)
        if verdict is not None:
            return verdict
    return None


def classify_http_status(status: object) -> bool | None:
    """HTTP status -> transient (5xx, 408, 429), permanent (other 4xx; 501 Not Implemented
    and 505 HTTP Version Not Supported, which no retry changes), or no opinion."""
    try:
        code = int(status)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    if code in (501, 505):
        return False
    if code >= 500 or code in (408, 429):
        return True
    if 400 <= code < 500:
        return False
    return None


def is_builtin_transient(exc: BaseException) -> bool | None:
    """Transient errors every backend shares: our own marker, connection errors, timeouts."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return None


class Retrier:
    """Runs callables under a :class:`RetryConfig`, retrying only what classifiers call transient.

    Thread-safe: it holds no mutable state.
    """

    def __init__(
        self, config: RetryConfig | None = None, classifiers: Iterable[ErrorClassifier] = ()
    ) -> None:
        self.config = config or RetryConfig()
        self.classifiers: tuple[ErrorClassifier, ...] = (*classifiers, is_builtin_transient)

    def is_transient(self, exc: BaseException) -> bool:
        for classify in self.classifiers:
            verdict = classify(exc)
            if verdict is not None:
                return verdict
        cause = exc.__cause__ or exc.__context__
        return cause is not None and cause is not exc and self.is_transient(cause)

    def with_classifiers(self, *classifiers: ErrorClassifier) -> Retrier:
        return Retrier(self.config, (*classifiers, *self.classifiers[:-1]))

    def call(self, operation: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn(*args, **kwargs)`` under the policy of ``operation``."""
        params = self.config[operation]
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(params.max_attempts),
            wait=tenacity.wait_exponential_jitter(
                multiplier=params.wait_time_seconds,
                max=params.max_wait_seconds,
                jitter=params.wait_time_seconds,
            )
            if params.wait_time_seconds > 0
            else tenacity.wait_none(),
            retry=tenacity.retry_if_exception(self.is_transient),
            before_sleep=self._log_retry(operation),
            reraise=False,
        )
        try:
            return retrying(fn, *args, **kwargs)
        except tenacity.RetryError as exc:
            last = exc.last_attempt.exception()
            raise MaxAttemptsReachedException(operation, params.max_attempts, last) from last

    @staticmethod
    def _log_retry(operation: str) -> Callable[[tenacity.RetryCallState], None]:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "%s: attempt %d failed with %s; retrying",
                operation,
                state.attempt_number,
                type(exc).__name__,
            )

        return before_sleep
