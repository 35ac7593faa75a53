"""The HTTP API's request and response bodies (pydantic models): what the OpenAPI docs show
and what a request is checked against before anything is written.

:class:`TaskCreate` is the seed's request (strict: wrong types and unknown fields are a 422
that names the field); the others are what :mod:`tracker_core.service.api` answers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tracker_core.search import MAX_RUNS
from tracker_core.service.models import MAX_METADATA_BYTES, MAX_PARALLEL_RUNS, TaskStatus
from tracker_core.service.tokens import Scope

__all__ = ["MethodOut", "TaskCreate", "TaskList", "TaskOut", "TokenOut"]


class TaskCreate(BaseModel):
    """A new fine-tuning task (the seed's request)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    fine_tuning_method: str = Field(
        min_length=1, max_length=128, description="an installed method (GET .../methods)"
    )
    batch_id: str | None = Field(
        default=None,
        description="the data batch; absent: the method's next_batch_id(), else a new id",
    )
    metadata: dict[str, Any] | None = Field(
        default=None, description=f"any JSON object, at most {MAX_METADATA_BYTES} bytes"
    )
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="repeating a request with the same key returns the same task",
    )
    max_parallel_runs: int | None = Field(
        default=None,
        ge=1,
        le=MAX_PARALLEL_RUNS,
        description="the most runs of the iteration trained at once, each by a free worker "
        "(absent: as many as there are free workers; the method may cap it); 1 trains them "
        "one after another in one process",
    )
    proposal: Literal["top_n", "search"] | None = Field(
        default=None,
        description="how the params sets are chosen: top_n (the previous iteration's top-N) "
        "or search (an Optuna sampler fed from every earlier iteration, weak runs pruned; "
        "the method needs a search space, GET .../methods); absent: the method's own",
    )
    max_runs: int | None = Field(
        default=None, ge=1, le=MAX_RUNS, description="the most params sets the iteration tries"
    )


class TaskOut(BaseModel):
    """A task as the API returns it."""

    id: str
    fine_tuning_method: str
    status: TaskStatus
    created_at: str
    updated_at: str
    batch_id: str
    metadata: dict[str, Any]
    idempotency_key: str | None
    max_parallel_runs: int | None
    proposal: str | None
    max_runs: int | None
    progress: dict[str, Any] | None = Field(
        description="runs of the iteration: planned = queued + running + finished + failed + pruned"
    )
    result: dict[str, Any] | None = Field(
        description="once done: experiment_id, best_run_id, best_metric, best_model_uri, ..."
    )
    error: str | None = Field(description="once failed: what went wrong")
    cancel_requested: bool
    attempts: int
    worker: str | None
    created_by: str | None = Field(description="the API token (its name) that created it")
    canceled_by: str | None = Field(description="the API token (its name) that canceled it")


class TaskList(BaseModel):
    tasks: list[TaskOut]
    total: int
    limit: int
    offset: int


class TokenOut(BaseModel):
    id: str
    name: str
    scope: Scope
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    active: bool


class MethodOut(BaseModel):
    name: str
    source: str
    plugin_name: str | None
    main_metric: str | None
    is_loss: bool | None
    direction: str | None
    proposal: str | None = Field(description="the policy a task gets unless it chooses")
    search_space: dict[str, Any] | None = Field(
        description="the params' search space: {field: Optuna's JSON of its distribution}"
    )
    search: dict[str, Any] | None = Field(
        description="how a search runs: max_runs, sampler, pruner, intermediate_metric"
    )
    error: str | None
