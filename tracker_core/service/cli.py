"""The service's commands: ``tracker-core serve``, ``tracker-core worker``, ``tracker-core task``.

::

    tracker-core serve [--database-file F] [--no-worker] [--port 5000] # API (+ worker, database)
                       [--allowed-hosts H,...] [--insecure-no-auth]
    tracker-core worker [--database-file F] [--concurrency N]          # a worker
    tracker-core token create|list|revoke                              # API tokens
    tracker-core task create METHOD [--batch-id B] [--idempotency-key K] [--metadata JSON]
                                    [--max-parallel-runs N] [--proposal P] [--max-runs N]
    tracker-core task status ID [--wait]
    tracker-core task list [--status S] [--method M]
    tracker-core task cancel ID
    (task commands: --token-file FILE or $TRACKER_CORE_TOKEN)

:func:`add_service_commands` registers them on the main parser; importing this module imports
only the standard library and tracker-core's core (the web framework, the queue and the
database driver are imported when a command runs). Exit status as everywhere: 0 success,
1 failure (``task status --wait``: the task ended ``error`` or ``canceled``), 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Any

from tracker_core.cli_common import Output, UsageError, _seconds
from tracker_core.leases import DEFAULT_LEASE_SECONDS
from tracker_core.manager import DEFAULT_ARTIFACT_URI, DEFAULT_TRACKING_URI
from tracker_core.service.cli_tasks import (
    cmd_task_cancel,
    cmd_task_create,
    cmd_task_list,
    cmd_task_status,
)
from tracker_core.service.cli_tokens import add_database_args, add_token_commands, database_url
from tracker_core.service.client import DEFAULT_URL
from tracker_core.service.extra import require_service_extra
from tracker_core.service.settings import DEFAULT_DATA_DIR, DEFAULT_HOST, DEFAULT_PORT

__all__ = ["add_service_commands"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- settings from args
def _settings(args: argparse.Namespace, *, serve: bool) -> Any:
    from tracker_core.service.errors import ServiceConfigurationError
    from tracker_core.service.settings import ServiceSettings, parse_method_options

    # --tracking-uri/--artifact-uri after the command, else before it unless left at the
    # library's defaults (the service's defaults live under the data folder)
    tracking = args.service_tracking_uri or (
        args.tracking_uri if args.tracking_uri != DEFAULT_TRACKING_URI else None
    )
    artifacts = args.service_artifact_uri or (
        args.artifact_uri if args.artifact_uri != DEFAULT_ARTIFACT_URI else None
    )
    kwargs: dict[str, Any] = {
        "database_url": database_url(args),
        "data_dir": args.data_dir,
        "tracking_uri": tracking,
        "artifact_uri": artifacts,
        "concurrency": args.concurrency,
        "methods": parse_method_options(args.method),
        "heartbeat_seconds": args.heartbeat_seconds,
        "stall_seconds": args.stall_seconds,
        "stall_check_seconds": args.stall_check_seconds,
        "poll_seconds": args.poll_seconds,
        "cancel_grace_seconds": args.cancel_grace_seconds,
        "shutdown_grace_seconds": args.shutdown_grace_seconds,
        "lease_seconds": args.lease_seconds or DEFAULT_LEASE_SECONDS,
        "max_attempts": args.max_attempts,
        "retry_wait_seconds": args.retry_wait_seconds,
        "keep_jobs_hours": args.keep_jobs_hours,
        "database_outage_seconds": args.database_outage_seconds,
        "warm_child_seconds": args.warm_child_seconds,
        "allow_root": args.allow_root,
    }
    if serve:
        kwargs.update(host=args.host, port=args.port, insecure_no_auth=args.insecure_no_auth)
        kwargs["allowed_hosts"] = [h for h in (args.allowed_hosts or "").split(",") if h.strip()]
    try:
        return ServiceSettings(**kwargs)
    except ServiceConfigurationError:
        raise
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


def _service_logging(args: argparse.Namespace) -> None:
    """Servers log what they do: INFO for tracker-core (WARNING with --quiet), every line with
    its time and level, no secret in any (:mod:`tracker_core.service.logs`)."""
    from tracker_core.service.logs import configure_service_logging

    level = logging.WARNING if args.quiet else logging.INFO
    configure_service_logging(level, verbose=args.verbose)


def cmd_serve(args: argparse.Namespace, out: Output) -> int:
    import asyncio

    require_service_extra()
    settings = _settings(args, serve=True)
    _service_logging(args)
    from tracker_core.service.server import serve

    asyncio.run(serve(settings, with_worker=not args.no_worker))
    return 0


def cmd_worker(args: argparse.Namespace, out: Output) -> int:
    import asyncio

    require_service_extra()
    settings = _settings(args, serve=False)
    _service_logging(args)
    from tracker_core.service.embedded import EmbeddedPostgres
    from tracker_core.service.server import work

    embedded = None
    if settings.database_url is None:  # join (or start) the data folder's embedded database
        embedded = EmbeddedPostgres(settings)
        conninfo = embedded.start()
    else:
        conninfo = settings.database_url
    try:
        asyncio.run(work(settings, conninfo, embedded))
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


# ---------------------------------------------------------------------- the parsers
def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _hours(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be >= 0 and finite, got {text}")
    return value


def _process_args(p: argparse.ArgumentParser) -> None:
    add_database_args(
        p, DEFAULT_DATA_DIR, "the embedded layout's folder: database, MLflow SQLite, models"
    )
    p.add_argument(
        "--tracking-uri",
        dest="service_tracking_uri",
        metavar="URI",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else SQLite in the data folder)",
    )
    p.add_argument(
        "--artifact-uri",
        dest="service_artifact_uri",
        metavar="URI",
        help="where models live: a path, s3:// or gs:// (default: <data folder>/models)",
    )
    p.add_argument(
        "--method",
        action="append",
        metavar="NAME=module:attr",
        help="offer a method that is not an installed entry point (repeatable; also "
        "$TRACKER_CORE_METHODS, comma separated)",
    )
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="N",
        default=1,
        help="tasks this worker runs at once, one training process each (default 1)",
    )
    p.add_argument(
        "--allow-root",
        action="store_true",
        help="as root, let the embedded PostgreSQL run as a 'pgserver' account it creates and "
        "open the data folder's parents to it (see the README)",
    )
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    t = p.add_argument_group("timings (seconds)")
    t.add_argument(
        "--heartbeat-seconds",
        type=_positive_float,
        default=5.0,
        help="worker heartbeat interval (default %(default)s)",
    )
    t.add_argument(
        "--stall-seconds",
        type=_positive_float,
        default=20.0,
        help="a worker silent this long is dead; its task is requeued (default %(default)s)",
    )
    t.add_argument(
        "--lease-seconds",
        type=_seconds,  # the same option, and check, as before the command
        default=argparse.SUPPRESS,  # else it would hide the one given before the command
        help="run lease: a dead worker's run resumes this long after it died (default "
        f"{DEFAULT_LEASE_SECONDS:g}; also taken before the command)",
    )
    t.add_argument(
        "--stall-check-seconds",
        type=_positive_int,
        default=5,
        help="how often to look for dead workers' tasks (default %(default)s)",
    )
    t.add_argument(
        "--poll-seconds",
        type=_positive_float,
        default=2.0,
        help="idle polling, a fallback to LISTEN/NOTIFY (default %(default)s)",
    )
    t.add_argument(
        "--cancel-grace-seconds",
        type=_positive_float,
        default=30.0,
        help="time for a canceled task to reach a safe point before its training "
        "process is terminated (default %(default)s)",
    )
    t.add_argument(
        "--shutdown-grace-seconds",
        type=_positive_float,
        default=10.0,
        help="the same when the worker stops (default %(default)s)",
    )
    t.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=3,
        help="attempts of a task whose stores keep failing (default %(default)s)",
    )
    t.add_argument("--retry-wait-seconds", type=_positive_float, default=10.0,
                   help="wait before a retry, doubled each time (default %(default)s)")  # fmt: skip
    t.add_argument(
        "--database-outage-seconds",
        type=_positive_float,
        default=300.0,
        help="how long to wait for the task database when it does not answer (requests get "
        "503 meanwhile, training goes on) before exiting with status 1 (default %(default)s)",
    )
    t.add_argument(
        "--warm-child-seconds",
        type=_non_negative_float,
        default=10.0,
        help="how long a training process whose job ended waits for the next job of the same "
        "method (no new process, no new connection); 0: a new process per job (default "
        "%(default)s)",
    )
    p.add_argument(
        "--keep-jobs-hours",
        type=_hours,
        default=24,
        help="queue jobs that ended are deleted this many hours later, hourly; tasks are "
        "kept (default %(default)s)",
    )


def _url_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=os.environ.get("TRACKER_CORE_URL") or DEFAULT_URL,
        help="the task service (default: $TRACKER_CORE_URL, else %(default)s)",
    )
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="read the API token from this file (default: $TRACKER_CORE_TOKEN; a token is "
        "never taken on the command line, where `ps` would show it)",
    )
    # also accepted after the command; the main parser's --json works too
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_service_commands(sub: Any) -> None:
    """Register ``serve``, ``worker`` and ``task`` on the main parser's subparsers."""
    p = sub.add_parser(
        "serve",
        help="run the task service: API, a worker, and (by default) an embedded database",
        description="Run the fine-tuning task API on --host:--port with one worker; by default "
        "everything (queue database, MLflow SQLite, models) lives in --data-dir. Ctrl-C stops it.",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="API address (default %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="API port (default %(default)s)")
    p.add_argument("--no-worker", action="store_true", help="API only (distributed layout)")
    p.add_argument(
        "--allowed-hosts",
        metavar="H1,H2",
        help="host names a request may be addressed to (its Host header), comma separated; "
        "others get 400, which stops DNS rebinding (default: the --host address's names plus "
        "localhost and 127.0.0.1; * for any)",
    )
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="take requests without an API token, on any address (off loopback, serve "
        "refuses to start without a token otherwise)",
    )
    _process_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "worker",
        help="run a worker: takes fine-tuning tasks from the queue and runs them",
        description="Run fine-tuning tasks from the queue at --database (without it: the "
        "embedded database of --data-dir, started if needed). Ctrl-C stops it; its running "
        "tasks go back to the queue.",
    )
    _process_args(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("task", help="create, follow and cancel fine-tuning tasks over the API")
    tasks = p.add_subparsers(dest="task_command", required=True, metavar="ACTION")

    q = tasks.add_parser("create", help="create a fine-tuning task", allow_abbrev=False)
    q.add_argument("method", help="the fine-tuning method (GET /api/v1/fine-tuning/methods)")
    q.add_argument("--batch-id", help="the data batch (default: the method's, or a new id)")
    q.add_argument("--idempotency-key", help="repeat-safe: the same key returns the same task")
    q.add_argument("--metadata", help="a JSON object stored with the task")
    q.add_argument(
        "--max-parallel-runs",
        type=_positive_int,
        metavar="N",
        help="train at most N runs of the iteration at once, each on a free worker (default: "
        "as many as there are free workers; 1: one after another)",
    )
    q.add_argument(
        "--proposal",
        choices=("top_n", "search"),
        help="how the params sets are chosen: top_n (the previous iteration's top-N) or "
        "search (an Optuna sampler fed from every earlier iteration, weak runs pruned); "
        "default: the method's",
    )
    q.add_argument("--max-runs", type=_positive_int, metavar="N", help="try at most N params sets")
    _url_arg(q)
    q.set_defaults(func=cmd_task_create)

    q = tasks.add_parser("status", help="show a task (--wait: until it ends)", allow_abbrev=False)
    q.add_argument("task_id")
    q.add_argument("--wait", action="store_true", help="poll until done/error/canceled")
    q.add_argument("--poll", type=_positive_float, default=1.0, help="seconds between polls")
    q.add_argument("--timeout", type=_positive_float, help="give up waiting after this long")
    _url_arg(q)
    q.set_defaults(func=cmd_task_status)

    q = tasks.add_parser("list", help="list tasks, newest first", allow_abbrev=False)
    q.add_argument("--status", choices=["pending", "processing", "done", "error", "canceled"])
    q.add_argument("--method", help="only this fine-tuning method")
    q.add_argument("--limit", type=_positive_int, default=50)
    q.add_argument("--offset", type=int, default=0)
    _url_arg(q)
    q.set_defaults(func=cmd_task_list)

    q = tasks.add_parser(
        "cancel", help="cancel a task (a running one stops at a safe point)", allow_abbrev=False
    )
    q.add_argument("task_id")
    _url_arg(q)
    q.set_defaults(func=cmd_task_cancel)

    add_token_commands(sub, DEFAULT_DATA_DIR)
