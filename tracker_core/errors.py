"""One exception hierarchy for everything tracker-core raises.

Every error names what failed. Messages never contain credentials: anything that
formats user-supplied configuration goes through :func:`redact` first.
"""

from __future__ import annotations

import re

from tracker_core.uris import redact_text

__all__ = [
    "RETRYABLE_ERRORS",
    "ArtifactStoreError",
    "BackendNotInstalledError",
    "CleanupRefusedError",
    "ConfigurationError",
    "InvalidArgumentError",
    "InvalidMetricError",
    "InvalidModelError",
    "InvalidNameError",
    "InvalidParamsError",
    "IterationFailedError",
    "IterationInUseError",
    "LeaseLostError",
    "MaxAttemptsReachedException",
    "ModelFilesMissingError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelNotSavedError",
    "ModelProtectedError",
    "NoActiveIterationError",
    "NoActiveRunError",
    "NoModelToKeepError",
    "PromotionError",
    "RunInUseError",
    "TrackerError",
    "TrackingStoreError",
    "TransientError",
    "UnknownSchemeError",
    "redact",
]


class TrackerError(Exception):
    """Base class of every error raised by tracker-core and its backends."""


class ConfigurationError(TrackerError, ValueError):
    """An argument or setting is invalid; raised before anything is written."""


class InvalidArgumentError(ConfigurationError, TypeError):
    """An argument of ``connect`` or of a seed class is of a type or value it cannot take;
    the message names the argument, the value and what is allowed."""


class InvalidNameError(ConfigurationError):
    """A plugin, experiment or metric name is empty, or contains a path separator or ``..``."""


class InvalidMetricError(ConfigurationError):
    """A metric value is not a finite number, or the main metric is not a non-empty string."""


class InvalidParamsError(ConfigurationError):
    """Fine-tuning params hold a type or a value that cannot round-trip exactly through MLflow
    (see :mod:`tracker_core.params` for the supported types); raised at construction."""


class UnknownSchemeError(ConfigurationError):
    """No backend is registered for the scheme of an artifact URI."""


class BackendNotInstalledError(UnknownSchemeError, ImportError):
    """The scheme is known, but the distribution that serves it is not installed."""


class NoActiveIterationError(TrackerError, RuntimeError):
    """An operation needs a current fine-tuning iteration and none is set."""


class NoActiveRunError(TrackerError, RuntimeError):
    """An operation needs a current run and none is set."""


class ModelNotFoundError(TrackerError, LookupError):
    """No model is stored where one was expected."""


class ModelFilesMissingError(ModelNotFoundError):
    """A run is marked as holding a model, but the model's files are gone from the store
    (a bucket emptied or a folder deleted by hand). ``tracker-core verify`` lists such runs."""


class InvalidModelError(ConfigurationError):
    """The object cannot be saved in the chosen model format (e.g. not a ``torch.nn.Module``),
    or the format cannot load it back as configured (``state_dict`` without ``model_factory``)."""


class ModelLoadError(TrackerError):
    """A stored model could not be read back: its files do not fit the model the factory
    builds (shapes, keys), or they are corrupt."""


class ModelNotSavedError(TrackerError):
    """A run whose ``save_model`` failed cannot end FINISHED until a save succeeds: its best
    metric would stand with no model behind it (end it with ``finish_run(as_failed=True)``)."""


class RunNotFoundError(TrackerError, LookupError):
    """No run has that id (or it was deleted). ``set_run`` meets it when the run it found
    is deleted under it (the younger of two twins, deleted by its creator) and looks again."""


class RunInUseError(TrackerError):
    """Another live worker holds the run's lease: only one worker trains a run at a time.

    ``owner`` names the holder (``host:pid:id``); ``expires_ms`` is when its lease runs out
    unless its heartbeat renews it.
    """

    def __init__(self, message: str, *, run_id: str, owner: str, expires_ms: int) -> None:
        super().__init__(message)
        self.run_id, self.owner, self.expires_ms = run_id, owner, expires_ms


class LeaseLostError(TrackerError):
    """This worker's lease on its run expired and another worker took the run over: stop
    training it (the other worker's results are the run's)."""


class CleanupRefusedError(TrackerError):
    """Deleting an iteration was refused because it could lose a model or break a worker;
    nothing was deleted."""


class NoModelToKeepError(CleanupRefusedError):
    """The current iteration holds no model: deleting the previous one would lose the only
    fine-tuned model."""


class IterationInUseError(CleanupRefusedError):
    """The iteration still has runs held by live workers; it can be deleted once they end."""


class ModelProtectedError(CleanupRefusedError):
    """The model (or an iteration holding it) is the champion or the rollback model of a
    registered model: no cleanup deletes it while an alias points at it."""


class PromotionError(TrackerError):
    """A promotion, rollback or champion lookup could not be done as asked (no model
    registry, no champion to roll back to, a run that holds no servable model)."""


class IterationFailedError(TrackerError, RuntimeError):
    """Every run of a fine-tuning iteration failed; the previous iteration was kept."""


class TrackingStoreError(TrackerError):
    """The tracking side (MLflow) refused or failed an operation."""


class ArtifactStoreError(TrackerError):
    """The artifact side (local disk, S3, GCS) refused or failed an operation."""


class TransientError(TrackerError):
    """A failure worth retrying (connection, timeout, 5xx, 429, throttling).

    Backends raise it, or classify their own exceptions as transient, so that the
    single retry policy of :mod:`tracker_core.retry` can act on it.
    """


class MaxAttemptsReachedException(TrackerError):
    """A remote operation kept failing with transient errors until its attempts ran out.

    The last transient error is chained as ``__cause__``.
    """

    def __init__(self, operation: str, attempts: int, last: BaseException | None = None) -> None:
        text = str(last).strip().splitlines()[0] if last is not None and str(last).strip() else ""
        tail = f"; the last error: {text}" if text else ""
        super().__init__(f"{operation}: gave up after {attempts} attempt(s){tail}")
        self.operation = operation
        self.attempts = attempts


#: failures of the infrastructure, not of the work: the stores failing past their own retries,
#: a model not readable yet, a run lease lost, an iteration still in use. They stop an
#: iteration (its run is left resumable), and another attempt may succeed; the fine-tuning
#: driver never counts them as a run's failure, and the task service retries them.
RETRYABLE_ERRORS: tuple[type[TrackerError], ...] = (
    TrackingStoreError,
    ArtifactStoreError,
    TransientError,
    MaxAttemptsReachedException,
    ModelNotFoundError,
    LeaseLostError,
    IterationInUseError,
)


_SECRET_PATTERNS = [
    # key=value / key: value pairs whose key looks secret
    re.compile(
        r"(?i)((?:secret|password|passwd|token|private_key|access_key|signature|credential)"
        r"[\w\-]*[\"']?\s*[=:]\s*[\"']?)([^\s\"',&}]+)"
    ),
]


def redact(text: str, *secrets: str | None) -> str:
    """Return ``text`` with known secrets and secret-looking values replaced by ``***``."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = redact_text(text)  # user:password@ in URIs, whatever the password holds
    return _SECRET_PATTERNS[0].sub(r"\1***", text)
