"""Tasks as the API shows them: statuses, ids, the task record, and the request shape.

The seed's fields (``id``, ``fine_tuning_method``, ``status``, ``created_at``, ``updated_at``,
``batch_id``) come first; the service adds ``metadata``, ``idempotency_key``,
``max_parallel_runs``, ``progress``, ``result``, ``error``, ``cancel_requested``, ``attempts``,
``worker``, and who created and canceled it (``created_by``, ``canceled_by``: API token names;
None when the API ran without authentication). Timestamps are ISO 8601 in UTC
(``2026-01-02T03:04:05.678901Z``).

``progress`` counts the runs of the task's iteration: ``planned`` = ``queued`` + ``running`` +
``finished`` + ``failed`` + ``pruned`` (``finished``: ended FINISHED; ``failed``: ended FAILED;
``pruned``: stopped by the search's pruner, KILLED). ``proposal`` and ``max_runs`` choose the
iteration's params sets (:mod:`tracker_core.search`; None: the method's own policy).
Once a task is ``canceled``, no run is queued or running any more: those its cancel left
unstarted or stopped count as ``canceled`` (``planned`` = ``finished`` + ``failed`` +
``canceled``).
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
from tracker_core.uris import redact_text
from tracker_core.values import RunStatus, validate_name

__all__ = [
    "MAX_BATCH_ID_LENGTH",
    "MAX_METADATA_BYTES",
    "MAX_PARALLEL_RUNS",
    "TERMINAL_STATUSES",
    "RunRow",
    "RunState",
    "Task",
    "TaskStatus",
    "check_batch_id",
    "metadata_size",
    "new_id",
    "shown_progress",
]

#: the largest ``metadata`` a task may carry, as compact JSON
MAX_METADATA_BYTES = 64 * 1024
MAX_BATCH_ID_LENGTH = 128
#: the largest ``max_parallel_runs`` a task may ask for
MAX_PARALLEL_RUNS = 10_000


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


class RunState(enum.StrEnum):
    """The state of one run of a task whose runs are separate jobs (the run table), in
    progress order: queued (waiting for its job, or in it before it started) -> running ->
    finished (ended FINISHED) | failed (ended FAILED or KILLED); a run whose job stopped
    without ending it is queued again."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"

    @classmethod
    def ended_as(cls, status: RunStatus) -> RunState:
        """The state of a run that ended in MLflow with ``status`` (a terminal one)."""
        assert status.is_terminal, status
        return cls.FINISHED if status == RunStatus.FINISHED else cls.FAILED


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
    #: what the request asked for (None: as many as there are free workers)
    max_parallel_runs: int | None = None
    #: the cap in force once the iteration is planned (None: no cap)
    parallel_runs: int | None = None
    #: the iteration's plan (:meth:`tracker_core.finetune.IterationPlan.to_json`) once its
    #: runs are trained by separate jobs; None while the task's own job runs it
    plan: dict[str, Any] | None = None
    completion_job_id: int | None = None
    #: how the params sets are chosen (``top_n`` / ``search``; None: the method's policy)
    proposal: str | None = None
    #: the most params sets the iteration tries (None: the policy's)
    max_runs: int | None = None
    #: the name of the API token that created it, and of the first that canceled it
    created_by: str | None = None
    canceled_by: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Task:
        fields = attrs.fields_dict(cls)
        return cls(**{k: v for k, v in row.items() if k in fields})

    @property
    def fanned_out(self) -> bool:
        """Its runs are separate jobs (the task's own job has planned the iteration)."""
        return self.plan is not None

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
            "max_parallel_runs": self.max_parallel_runs,
            "proposal": self.proposal,
            "max_runs": self.max_runs,
            "progress": shown_progress(self.status, self.progress),
            "result": self.result,
            "error": None if self.error is None else redact_text(self.error),
            "cancel_requested": self.cancel_requested_at is not None,
            "attempts": self.attempts,
            "worker": self.worker,
            "created_by": self.created_by,
            "canceled_by": self.canceled_by,
        }


def shown_progress(status: TaskStatus, progress: dict[str, Any] | None) -> dict[str, Any] | None:
    """``progress`` as the API shows it: a canceled task's runs that were still queued or
    running when it ended count as ``canceled`` (see the module docstring)."""
    if status != TaskStatus.CANCELED or not progress:
        return progress
    stopped = int(progress.get("queued", 0)) + int(progress.get("running", 0))
    return {**progress, "queued": 0, "running": 0, "canceled": stopped}


@attrs.frozen
class RunRow:
    """One run of a task whose runs are separate jobs (a row of the run table)."""

    task_id: str
    params_id: str
    position: int
    status: RunState = attrs.field(converter=RunState)
    mlflow_status: str | None
    run_id: str | None
    metric: float | None
    error: str | None
    trained: bool
    attempts: int
    failures: int
    worker: str | None
    execution_id: str | None
    job_id: int | None
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    updated_at: dt.datetime

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunRow:
        fields = attrs.fields_dict(cls)
        return cls(**{k: v for k, v in row.items() if k in fields})
