"""The HTTP API (FastAPI): the seed's task endpoints, plus list, cancel, methods and health.

============================================  =================================================
``POST /api/v1/fine-tuning/task``             create a task (201), or return the task of a
                                              repeated idempotency key (200); 409 if that key
                                              was used with another body
``GET  /api/v1/fine-tuning/task/{id}``        one task (404 if unknown)
``GET  /api/v1/fine-tuning/task``             tasks newest first; ``status``,
                                              ``fine_tuning_method``, ``limit``, ``offset``
``POST /api/v1/fine-tuning/task/{id}/cancel`` cancel (pending: at once; processing: its queued
                                              runs never start, running ones stop at their
                                              next safe point); 409 if it already ended
``GET  /api/v1/fine-tuning/methods``          the methods this service offers
``GET  /api/v1/tokens``                       the API tokens (names, scopes, expiry; no secret)
``GET  /health``                              200 when the database answers, else 503
============================================  =================================================

Every route but ``/health`` (and the docs, ``/docs``, served offline) needs a bearer token
whose scope grants it: ``tasks:read`` to read tasks and methods, ``tasks:write`` to create and
cancel tasks, ``admin`` to list tokens (:mod:`tracker_core.service.auth`). A task records the
token names that created and canceled it.

Bad input gets a 4xx that names the field and the rule, and writes nothing: a body over 1 MiB
(413, counted as it streams in), malformed JSON (400), and text PostgreSQL cannot store,
numbers out of range, nesting too deep, control characters in the URL
(:mod:`tracker_core.service.limits`); wrong types, unknown fields, an unknown method, a batch
id that is not a valid name, metadata over 64 KiB (422).

While the task database does not answer, every route that needs it answers 503 with
``Retry-After`` (:mod:`tracker_core.service.gate`), and the API goes back to normal by itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from tracker_core.errors import ConfigurationError
from tracker_core.service.auth import AccessMiddleware, AccessPolicy, AuthMode, requires
from tracker_core.service.bodies import MethodOut, TaskCreate, TaskList, TaskOut, TokenOut
from tracker_core.service.gate import DatabaseGate
from tracker_core.service.limits import MAX_BODY_BYTES, InputLimits, shown
from tracker_core.service.models import (
    MAX_METADATA_BYTES,
    Task,
    TaskStatus,
    check_batch_id,
    metadata_size,
    new_id,
)
from tracker_core.service.outage import Backoff, Outage, OutageRider, probe
from tracker_core.service.queue import QueueJobs, build_app, defer_run_task
from tracker_core.service.registry import MethodRegistry
from tracker_core.service.repository import CancelAction, NewTask, TaskRepository
from tracker_core.service.schema import ensure_schema
from tracker_core.service.settings import ServiceSettings
from tracker_core.service.tokens import Principal, Scope, TokenStore
from tracker_core.uris import redact_text

__all__ = ["API_PREFIX", "MAX_BODY_BYTES", "create_app"]

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1/fine-tuning"
#: how long a request waits for a database connection before it is answered 503
POOL_TIMEOUT = 3.0
#: PostgreSQL's OFFSET is a bigint
_MAX_OFFSET = 2**63 - 1
_NO_AUTH = (
    "authentication is off (--insecure-no-auth): anyone who reaches this API can create and "
    "cancel training tasks"
)


#: a route parameter: who asks, with a token that may create and cancel tasks
Writer = Annotated[Principal, requires(Scope.WRITE)]


def _error(status: int, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status)


def _differences(task: Task, body: TaskCreate) -> list[str]:
    out = []
    if task.fine_tuning_method != body.fine_tuning_method:
        out.append(
            f"fine_tuning_method {body.fine_tuning_method!r} (the task has "
            f"{task.fine_tuning_method!r})"
        )
    if task.requested_batch_id != body.batch_id:
        out.append(
            f"batch_id {body.batch_id!r} (the task was created with {task.requested_batch_id!r})"
        )
    if task.metadata != (body.metadata or {}):
        out.append("metadata (it differs from the task's)")
    if task.max_parallel_runs != body.max_parallel_runs:
        out.append(
            f"max_parallel_runs {body.max_parallel_runs!r} (the task has "
            f"{task.max_parallel_runs!r})"
        )
    for name in ("proposal", "max_runs"):
        if getattr(task, name) != getattr(body, name):
            out.append(f"{name} {getattr(body, name)!r} (the task has {getattr(task, name)!r})")
    return out


def _for_key(task: Task, body: TaskCreate) -> JSONResponse:
    """The answer to a repeated idempotency key: the task (200) or a conflict (409)."""
    diffs = _differences(task, body)
    if diffs:
        return _error(
            409,
            f"idempotency key {body.idempotency_key!r} was used for task {task.id} with "
            f"another request; this one differs in: {'; '.join(diffs)}",
            task_id=task.id,
        )
    return JSONResponse(task.as_json(), status_code=200)


def _field(err: dict[str, Any]) -> str:
    return ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"


def _describe_validation(exc: RequestValidationError) -> str:
    parts = [f"{_field(err)}: {err.get('msg', 'invalid')}" for err in exc.errors()]
    return "; ".join(parts) or "invalid request"


# ---------------------------------------------------------------------- the application
def create_app(
    settings: ServiceSettings, conninfo: str, *, registry: MethodRegistry | None = None
) -> FastAPI:
    """The API of one service process, on the task database at ``conninfo``."""
    registry = registry or MethodRegistry(settings.methods)
    queue_app = build_app(settings, conninfo, max_pool=20, timeout=POOL_TIMEOUT)
    state: dict[str, TaskRepository] = {}
    outage = Outage(settings.database_outage_seconds)
    backoff = Backoff(first=0.5, cap=5.0)

    async def recover() -> None:  # the database is back: drop the pool's dead connections
        if state:
            await queue_app.connector.pool.check()  # type: ignore[attr-defined]

    gate = DatabaseGate(lambda: probe(conninfo, POOL_TIMEOUT), outage, backoff, recover=recover)
    tokens: dict[str, TokenStore] = {}
    policy = AccessPolicy.for_settings(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await OutageRider(outage, backoff).run(lambda: probe(conninfo, POOL_TIMEOUT))
        async with queue_app.open_async():
            await ensure_schema(queue_app)
            state["repo"] = TaskRepository(queue_app.connector.pool)  # type: ignore[attr-defined]
            tokens["store"] = TokenStore(queue_app.connector.pool)  # type: ignore[attr-defined]
            yield

    def repo() -> TaskRepository:
        gate.check()
        return state["repo"]

    app = FastAPIOffline(  # /docs with Swagger UI's files from the package: no CDN
        title="tracker-core task service",
        summary="Fine-tuning tasks, queued and run by tracker-core workers",
        version="1",
        lifespan=lifespan,
    )
    #: the process running this app runs ``gate.watch()`` (it raises past the outage budget)
    app.state.database_gate = gate
    gate.answer_errors(app)
    app.add_middleware(InputLimits, routes=lambda: app.routes)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            first = next(e for e in exc.errors() if e.get("type") == "json_invalid")
            reason = (first.get("ctx") or {}).get("error", "not valid JSON")
            return _error(400, f"the request body is not valid JSON: {reason}")
        log.info(
            "refused %s %s: 422 %s",
            request.method,
            shown(request.url.path),
            shown(_describe_validation(exc)),
        )
        first = exc.errors()[0] if exc.errors() else {}
        return _error(
            422,
            _describe_validation(exc),
            field=_field(first),
            rule=first.get("msg", "invalid"),
            errors=jsonable_errors(exc),
        )

    @app.post(
        f"{API_PREFIX}/task",
        status_code=201,
        response_model=TaskOut,
        responses={200: {"model": TaskOut}, 409: {}, 422: {}},
    )
    async def create_task(body: TaskCreate, who: Writer) -> Any:
        if body.fine_tuning_method not in registry:
            rule = registry.unknown_message(body.fine_tuning_method)
            return _error(422, rule, field="fine_tuning_method", rule=rule)
        if body.batch_id is not None:
            try:
                check_batch_id(body.batch_id)
            except ConfigurationError as exc:
                return _error(422, str(exc), field="batch_id", rule=str(exc))
        metadata = body.metadata or {}
        size = metadata_size(metadata)
        if size > MAX_METADATA_BYTES:
            rule = f"metadata is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES}"
            return _error(422, rule, field="metadata", rule=rule)
        if body.proposal is not None or body.max_runs is not None:
            try:
                await run_in_threadpool(
                    registry.check_proposal, body.fine_tuning_method, body.proposal, body.max_runs
                )
            except ConfigurationError as exc:
                return _error(422, str(exc), field="proposal", rule=str(exc))
        if body.idempotency_key is not None:
            existing = await repo().tasks.get_by_key(body.idempotency_key)
            if existing is not None:
                return _for_key(existing, body)
        batch_id = body.batch_id
        if batch_id is None:
            try:
                method = await run_in_threadpool(registry.load, body.fine_tuning_method)
                proposed = await run_in_threadpool(method.next_batch_id)
                batch_id = check_batch_id(proposed) if proposed is not None else new_id()
            except Exception as exc:
                log.exception("next_batch_id of %r failed", body.fine_tuning_method)
                return _error(
                    500,
                    f"method {body.fine_tuning_method!r} could not propose a batch id: "
                    f"{type(exc).__name__}: {redact_text(str(exc))}",
                )
        new = NewTask(
            id=new_id(),
            fine_tuning_method=body.fine_tuning_method,
            batch_id=batch_id,
            requested_batch_id=body.batch_id,
            metadata=metadata,
            idempotency_key=body.idempotency_key,
            max_parallel_runs=body.max_parallel_runs,
            proposal=body.proposal,
            max_runs=body.max_runs,
            created_by=who.name,
        )

        async def defer(conn: Any, task: Task) -> int:
            return await defer_run_task(
                queue_app,
                conn,
                task_id=task.id,
                method=task.fine_tuning_method,
                batch_id=task.batch_id,
            )

        task, created = await repo().tasks.create(new, defer)
        if not created:
            return _for_key(task, body)
        log.info(
            "task %s created (%s, batch %s) by %s",
            task.id,
            task.fine_tuning_method,
            batch_id,
            who.name or "an unauthenticated request",
        )
        return JSONResponse(
            task.as_json(),
            status_code=201,
            headers={"Location": f"{API_PREFIX}/task/{task.id}"},
        )

    @app.get(
        f"{API_PREFIX}/task/{{task_id}}",
        response_model=TaskOut,
        responses={404: {}},
        dependencies=[requires(Scope.READ)],
    )
    async def get_task(task_id: str) -> Any:
        task = await repo().tasks.get(task_id)
        if task is None:
            return _error(404, f"no task with id {task_id!r}")
        return task.as_json()

    @app.get(f"{API_PREFIX}/task", response_model=TaskList, dependencies=[requires(Scope.READ)])
    async def list_tasks(
        status: TaskStatus | None = None,
        fine_tuning_method: str | None = None,
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0, le=_MAX_OFFSET),
    ) -> Any:
        tasks, total = await repo().tasks.list(
            status=status, method=fine_tuning_method, limit=limit, offset=offset
        )
        return {
            "tasks": [t.as_json() for t in tasks],
            "total": total,
            "limit": limit,
            "offset": offset,
        }

    @app.post(
        f"{API_PREFIX}/task/{{task_id}}/cancel",
        response_model=TaskOut,
        responses={404: {}, 409: {}},
    )
    async def cancel_task(task_id: str, who: Writer) -> Any:
        outcome = await repo().tasks.cancel(task_id, QueueJobs(queue_app), by=who.name)
        if outcome is None:
            return _error(404, f"no task with id {task_id!r}")
        if outcome.action == CancelAction.FINISHED:
            return _error(
                409,
                f"task {task_id} already ended ({outcome.task.status.value}); "
                "there is nothing to cancel",
                task=outcome.task.as_json(),
            )
        log.info("task %s: %s by %s", task_id, outcome.action.value, who.name or "anonymous")
        return outcome.task.as_json()

    @app.get(
        f"{API_PREFIX}/methods", response_model=list[MethodOut], dependencies=[requires(Scope.READ)]
    )
    async def methods() -> Any:
        infos = await run_in_threadpool(registry.describe)
        return [i.as_json() for i in infos]

    @app.get("/api/v1/tokens", response_model=list[TokenOut], dependencies=[requires(Scope.ADMIN)])
    async def list_tokens() -> Any:
        return [t.as_json() for t in await tokens["store"].list(everything=True)]

    @app.get("/health", responses={503: {}})
    async def health() -> Any:
        repo()  # 503 while the database is down
        async with queue_app.connector.pool.connection() as conn:  # type: ignore[attr-defined]
            await conn.execute("SELECT 1")
        if policy.mode is AuthMode.OFF:
            return {"status": "ok", "database": "ok", "warning": _NO_AUTH}
        return {"status": "ok", "database": "ok"}

    # outermost: a request is checked before anything reads its body
    app.add_middleware(AccessMiddleware, policy=policy, tokens=lambda: tokens["store"], gate=gate)
    return app


def jsonable_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors without the offending input (it may be large, or secret)."""
    return [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
