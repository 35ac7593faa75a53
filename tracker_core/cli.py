"""``tracker-core``: look at fine-tuning iterations from a shell, run one, collect garbage.

Commands::

    tracker-core --plugin P iterations                 # iterations of a plugin, newest first
    tracker-core [--plugin P] [--metric M] runs IT     # runs of an iteration (name or id)
    tracker-core --plugin P --metric M best IT         # the best model of an iteration
    tracker-core [--metric M] download IT|RUN DEST     # copy a model's files to DEST
    tracker-core run METHOD --batch-id B               # one iteration of a method
    tracker-core gc [--delete]                         # find (and delete) orphaned models
    tracker-core verify [--unmark]                     # marked models whose files are gone
    tracker-core --plugin P champion                   # the champion (models:/P@champion)
    tracker-core --plugin P promote RUN | rollback     # a person's decision, with --by
    tracker-core --plugin P lineage [REF] [--plot F]   # where a model came from

Tables for people, ``--json`` for scripts. Exit status: 0 success, 1 the operation failed
(``verify``: a marked model has no files), 2 usage error, 130 interrupted, 141 standard
output closed early (``tracker-core --json runs X | head -1``: the reader went away, as a
shell reports a process killed by SIGPIPE; nothing is printed about it). Errors are one line
on stderr; ``--debug`` adds the traceback.

Only ``run`` writes to the tracking store. Every other command needs an existing one: a
``sqlite:`` database file that does not exist (or an MLflow file store folder) is an error,
never a new empty database. A read-only database file serves every read.

``gc`` and ``verify`` against a root that does not exist: a missing bucket (S3, GCS) is an
error naming it, since a bucket must exist before anything is written and its absence means a
wrong name, endpoint or account; a missing prefix in an existing bucket, or a missing local
folder, holds nothing to collect (the first model written creates it). ``gc`` and ``verify``
touch nothing that belongs to a run held by a live worker (its lease has not expired);
``gc --include-running`` also takes those, for when no worker is running.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import TextIO

from tracker_core.cli_champion import add_champion_commands
from tracker_core.cli_common import EXIT_OUTPUT_CLOSED as EXIT_OUTPUT_CLOSED
from tracker_core.cli_common import Output as Output
from tracker_core.cli_common import UsageError as UsageError
from tracker_core.cli_common import _attempts, _OutputClosed, _seconds
from tracker_core.cli_common import _table as _table
from tracker_core.cli_common import require_tracking_store as require_tracking_store
from tracker_core.cli_iterations import cmd_best, cmd_download, cmd_iterations, cmd_run, cmd_runs
from tracker_core.cli_reconcile import cmd_gc, cmd_verify
from tracker_core.errors import ConfigurationError, TrackerError
from tracker_core.leases import DEFAULT_LEASE_SECONDS
from tracker_core.manager import DEFAULT_ARTIFACT_URI, DEFAULT_TRACKING_URI
from tracker_core.retry import RetryParams

__all__ = ["main"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- parser and main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracker-core",
        description="Fine-tuning iterations tracked in MLflow, best models in object storage.",
    )
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else %(default)s)",
    )
    parser.add_argument(
        "--artifact-uri",
        default=DEFAULT_ARTIFACT_URI,
        help="where models live: a path, file://, s3:// or gs:// (default: ./%(default)s)",
    )
    parser.add_argument("--plugin", help="the fine-tuning method (plugin) name")
    parser.add_argument("--metric", help="the main metric that ranks runs")
    parser.add_argument("--loss", action="store_true", help="lower --metric is better")
    parser.add_argument(
        "--retries",
        type=_attempts,
        metavar="N",
        help=f"attempts of each request to the stores before giving up (default: "
        f"{RetryParams().max_attempts}, or the method's own policy for `run`)",
    )
    parser.add_argument(
        "--lease-seconds",
        type=_seconds,
        metavar="S",
        help=f"the workers' lease time: a run created and never claimed is left to its "
        f"creator that long before gc deletes it as abandoned, and `run` holds its runs with "
        f"it (default: {DEFAULT_LEASE_SECONDS:g}, or the method's own for `run`)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("iterations", help="list the iterations of --plugin, newest first")
    p.set_defaults(func=cmd_iterations)

    p = sub.add_parser("runs", help="list the runs of an iteration with params and metrics")
    p.add_argument("iteration", help="experiment id, experiment name, or batch id (with --plugin)")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("best", help="show the best model of an iteration (needs --metric)")
    p.add_argument("iteration", help="experiment id, experiment name, or batch id (with --plugin)")
    p.set_defaults(func=cmd_best)

    p = sub.add_parser("download", help="copy a model's files: a run's, or an iteration's best")
    p.add_argument("target", help="a run id, or an iteration (its best model; needs --metric)")
    p.add_argument("dest", help="destination folder")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("run", help="run (or resume) one iteration of a fine-tuning method")
    p.add_argument("method", help="an entry point of tracker_core.methods, or module:attr")
    p.add_argument("--batch-id", required=True, help="the data batch of this iteration")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial params (default 0)")
    p.add_argument("--n-top-runs", type=int, help="params sets carried to the next iteration")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "gc", help="find model folders and uploads no run needs (crash debris); dry run"
    )
    p.add_argument("--delete", action="store_true", help="delete them")
    p.add_argument(
        "--include-running",
        action="store_true",
        help="also models and uploads of runs held by live workers (only if none is running)",
    )
    p.add_argument("--max-depth", type=int, default=5, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser(
        "verify", help="list runs marked as holding a model whose files are gone (exit 1 if any)"
    )
    p.add_argument(
        "--unmark",
        action="store_true",
        help="unmark them as a deletion would (runs held by live workers are left alone)",
    )
    p.set_defaults(func=cmd_verify)

    add_champion_commands(sub)

    # serve / worker / task: the task service (it imports its web and queue stack on use)
    from tracker_core.service.cli import add_service_commands

    add_service_commands(sub)
    return parser


def main(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failed, 2 usage)."""
    out_stream = stdout or sys.stdout
    err_stream = stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else 2
    _configure_logging(args.verbose, err_stream)
    try:
        status: int = args.func(args, Output(args.json, out_stream))
        return status
    except _OutputClosed:
        _discard_output(out_stream)
        return EXIT_OUTPUT_CLOSED
    except UsageError as exc:
        parser.print_usage(err_stream)
        err_stream.write(f"tracker-core: error: {exc}\n")
        return 2
    except (TrackerError, OSError) as exc:
        if args.debug:
            traceback.print_exc(file=err_stream)
        err_stream.write(f"tracker-core: error: {_one_line(exc)}\n")
        return 1
    except KeyboardInterrupt:
        err_stream.write("tracker-core: interrupted\n")
        return 130
    except Exception as exc:  # a bug or an unexpected failure: still one line unless --debug
        if args.debug:
            traceback.print_exc(file=err_stream)
        err_stream.write(
            f"tracker-core: unexpected error: {type(exc).__name__}: {_one_line(exc)}"
            " (use --debug for the traceback)\n"
        )
        return 1


def _discard_output(stream: TextIO) -> None:
    """After a broken pipe: point standard output at /dev/null, so that the interpreter's
    final flush does not print "Exception ignored ... BrokenPipeError" (the recipe of
    Python's documentation, "Note on SIGPIPE")."""
    if stream is not sys.stdout and stream is not sys.__stdout__:
        return
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, ConfigurationError | TrackerError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _configure_logging(verbose: bool, stream: TextIO) -> None:
    root = logging.getLogger("tracker_core")
    if not any(getattr(h, "_tracker_cli", False) for h in root.handlers):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._tracker_cli = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for h in root.handlers:
        if getattr(h, "_tracker_cli", False) and isinstance(h, logging.StreamHandler):
            h.setStream(stream)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    # MLflow's own notices (database setup, pickle warnings) are noise on a command line;
    # it reads its level when first imported, so say it before that, and after for good measure
    if not verbose and "mlflow" not in sys.modules:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "CRITICAL")
    # MLflow logs a traceback at ERROR before raising what we report in one line anyway
    logging.getLogger("mlflow").setLevel(logging.INFO if verbose else logging.CRITICAL)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
