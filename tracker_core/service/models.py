"""Tasks as the API shows them: statuses, ids, the task record, and the request shape.

The seed's fields (``id``, ``fine_tuning_method``, ``status``, ``created_at``, ``updated_at``,
``batch_id``) come first; the service adds ``metadata``, ``idempotency_key``, ``progress``,
``result``, ``error``, ``cancel_requested``, ``attempts`` and ``worker``. Timestamps are ISO 8601
in UTC (``2026-01-02T03:04:05.678901Z``).
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import os
import time
from typing import Any

import attrs

from tracker_core.errors import ConfigurationError
from tracker_core.values import validate_name

__all__ = [
    "MAX_BATCH_ID_LENGTH",
    "MAX_METADATA_BYTES",
    "TERMINAL_STATUSES",
    "Task",
    "TaskStatus",
    "check_batch_id",
    "metadata_size",
    "new_id",
]

#: the largest ``metadata`` a task may carry, as compact JSON
MAX_METADATA_BYTES = 64 * 1024
MAX_BATCH_ID_LENGTH = 128


class TaskStatus(enum.StrEnum):
    """The seed's statuses: pending -> processing -> done | error | canceled; pending ->
    canceled. A processing task whose worker died or stopped goes back to pending."""

    PENDING = "pending"
    PROCESSING = "processing"
    DONE = "done"
    ERROR = "error"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({TaskStatus.DONE, TaskStatus.ERROR, TaskStatus.CANCELED})


def new_id(at: float | None = None) -> str:
    """A 24-hex-digit id that sorts by creation time (to the second), like the seed's
    ObjectIds: 8 digits of Unix time, then 16 random ones."""
    seconds = int(time.time() if at is None else at)
    return f"{seconds:08x}{os.urandom(8).hex()}"


def check_batch_id(value: str) -> str:
    """A batch id usable in an iteration name: the library's name rules, printable, at most
    :data:`MAX_BATCH_ID_LENGTH` characters, no surrounding spaces."""
    validate_name(value, "batch_id")
    if len(value) > MAX_BATCH_ID_LENGTH:
        raise ConfigurationError(
            f"batch_id must be at most {MAX_BATCH_ID_LENGTH} characters, got {len(value)}"
        )
    if value != value.strip() or not value.isprintable() or " / " in value:
        raise ConfigurationError(
            f"batch_id must be printable, without surrounding spaces or ' / ', got {value!r}"
        )
    return value


def metadata_size(metadata: Any) -> int:
    """Bytes of ``metadata`` as compact UTF-8 JSON (what the limit counts)."""
    return len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode())


def iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@attrs.frozen
class Task:
    """One row of the task table."""

    id: str
    fine_tuning_method: str
    status: TaskStatus = attrs.field(converter=TaskStatus)
    created_at: dt.datetime
    updated_at: dt.datetime
    batch_id: str
    metadata: dict[str, Any]
    idempotency_key: str | None
    #: what the request said (None: the batch id was chosen by the service)
    requested_batch_id: str | None
    progress: dict[str, Any] | None
    result: dict[str, Any] | None
    error: str | None
    cancel_requested_at: dt.datetime | None
    attempts: int
    worker: str | None
    execution_id: str | None
    job_id: int | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Task:
        fields = attrs.fields_dict(cls)
        return cls(**{k: v for k, v in row.items() if k in fields})

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "fine_tuning_method": self.fine_tuning_method,
            "status": self.status.value,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "batch_id": self.batch_id,
            "metadata": self.metadata,
            "idempotency_key": self.idempotency_key,
            "progress": self.progress,
            "result": self.result,
            "error": self.error,
            "cancel_requested": self.cancel_requested_at is not None,
            "attempts": self.attempts,
            "worker": self.worker,
        }
