"""The ``tracker-core task`` commands: create, follow, list and cancel tasks over the API.

Clients of a running service (:class:`~tracker_core.service.client.ServiceClient`, imported
when a command runs), and how they print a task; :mod:`tracker_core.service.cli` registers
them with the ``serve`` and ``worker`` commands.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any

from tracker_core.cli_common import Output, UsageError, _table


def _client(args: argparse.Namespace) -> Any:
    from tracker_core.service.cli_tokens import token_from
    from tracker_core.service.client import ServiceClient

    return ServiceClient(args.url, token=token_from(args))


def _progress(task: dict[str, Any]) -> str:
    """``ended/planned`` and what is not plain: ``4/6 (2 running, 1 failed)``."""
    p = task.get("progress") or {}
    if not p:
        return ""
    ended = sum(int(p.get(k, 0)) for k in ("finished", "failed", "pruned"))
    extra = [
        f"{p[k]} {k}" for k in ("running", "queued", "failed", "pruned", "canceled") if p.get(k)
    ]
    return f"{ended}/{p.get('planned', '?')}" + (f" ({', '.join(extra)})" if extra else "")


def _task_lines(task: dict[str, Any]) -> Iterator[str]:
    yield f"task {task['id']}: {task['status']}" + (
        " (cancel requested)"
        if task.get("cancel_requested") and task["status"] == "processing"
        else ""
    )
    yield f"  method:   {task['fine_tuning_method']}"
    yield f"  batch:    {task['batch_id']}"
    yield f"  created:  {task['created_at']}" + (
        f" by {task['created_by']}" if task.get("created_by") else ""
    )
    yield f"  updated:  {task['updated_at']}"
    if task.get("progress"):
        yield f"  runs:     {_progress(task)}"
    if task.get("worker"):
        yield f"  worker:   {task['worker']}"
    if task.get("canceled_by"):
        yield f"  canceled by: {task['canceled_by']}"
    result = task.get("result") or {}
    if result:
        yield f"  iteration: {result.get('iteration')} (experiment {result.get('experiment_id')})"
        yield (
            f"  best run: {result.get('best_run_id')} "
            f"{result.get('main_metric')}={result.get('best_metric')}"
        )
        yield f"  model:    {result.get('best_model_uri')}"
        promotion = result.get("promotion")
        if promotion:
            yield (
                f"  promotion: {promotion.get('outcome')} (holdout {promotion.get('holdout')}, "
                f"champion {promotion.get('champion_holdout')}): {promotion.get('reason')}"
            )
    if task.get("error"):
        yield f"  error:    {task['error']}"


def cmd_task_create(args: argparse.Namespace, out: Output) -> int:
    metadata = None
    if args.metadata is not None:
        try:
            metadata = json.loads(args.metadata)
        except ValueError as exc:
            raise UsageError(f"--metadata is not valid JSON: {exc}") from exc
        if not isinstance(metadata, dict):
            raise UsageError("--metadata must be a JSON object")
    task = _client(args).create(
        args.method,
        batch_id=args.batch_id,
        metadata=metadata,
        idempotency_key=args.idempotency_key,
        max_parallel_runs=args.max_parallel_runs,
        proposal=args.proposal,
        max_runs=args.max_runs,
    )
    out.emit(task, lambda: _task_lines(task))
    return 0


def cmd_task_status(args: argparse.Namespace, out: Output) -> int:
    client = _client(args)
    if args.wait:
        task = client.wait(args.task_id, poll=args.poll, timeout=args.timeout)
    else:
        task = client.get(args.task_id)
    out.emit(task, lambda: _task_lines(task))
    return 1 if args.wait and task["status"] != "done" else 0


def cmd_task_list(args: argparse.Namespace, out: Output) -> int:
    page = _client(args).list(
        status=args.status, method=args.method, limit=args.limit, offset=args.offset
    )
    tasks = page["tasks"]

    def table() -> Iterator[str]:
        if not tasks:
            yield "no tasks"
            return
        yield from _table(
            ["id", "status", "method", "batch", "runs", "updated"],
            [
                [t["id"], t["status"], t["fine_tuning_method"], t["batch_id"], _progress(t),
                 t["updated_at"]]
                for t in tasks
            ],
        )  # fmt: skip
        if page["total"] > len(tasks):
            yield f"({len(tasks)} of {page['total']}; --offset/--limit for more)"

    out.emit(page, table)
    return 0


def cmd_task_cancel(args: argparse.Namespace, out: Output) -> int:
    task = _client(args).cancel(args.task_id)
    out.emit(task, lambda: _task_lines(task))
    return 0
