"""``tracker-core``: look at fine-tuning iterations from a shell, run one, collect garbage.

Commands::

    tracker-core --plugin P iterations                 # iterations of a plugin, newest first
    tracker-core [--plugin P] [--metric M] runs IT     # runs of an iteration (name or id)
    tracker-core --plugin P --metric M best IT         # the best model of an iteration
    tracker-core [--metric M] download IT|RUN DEST     # copy a model's files to DEST
    tracker-core run METHOD --batch-id B               # one iteration of a method
    tracker-core gc [--delete]                         # find (and delete) orphaned models
    tracker-core verify [--unmark]                     # marked models whose files are gone

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
import json
import logging
import os
import sqlite3
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

import attrs

from tracker_core import tags as T
from tracker_core.errors import (
    CleanupRefusedError,
    ConfigurationError,
    ModelNotFoundError,
    TrackerError,
)
from tracker_core.finetune import IterationResult, parse_iteration_name, run_iteration
from tracker_core.manager import DEFAULT_ARTIFACT_URI, DEFAULT_TRACKING_URI, ExperimentsManager
from tracker_core.params import PARAM_PREFIX
from tracker_core.retry import RetryConfig, RetryParams
from tracker_core.values import ExperimentRecord, RunRecord, RunStatus

__all__ = ["main"]

log = logging.getLogger(__name__)
_ANY_PLUGIN = "tracker-core-cli"  # a placeholder plugin name for commands that need none
_ANY_METRIC = "tracker-core-cli"


#: exit status when standard output is closed early: 128 + SIGPIPE, as a shell reports it
EXIT_OUTPUT_CLOSED = 141


class UsageError(Exception):
    """A command-line mistake: exit status 2."""


class _OutputClosed(Exception):
    """Whoever reads our standard output went away (``| head``)."""


# ---------------------------------------------------------------------- output helpers
class Output:
    def __init__(self, as_json: bool, out: TextIO) -> None:
        self.as_json, self.out = as_json, out

    def emit(self, data: Any, table: Callable[[], Iterator[str]]) -> None:
        try:
            if self.as_json:
                json.dump(data, self.out, indent=2, sort_keys=True, default=str)
                self.out.write("\n")
            else:
                for line in table():
                    self.out.write(line + "\n")
            self.out.flush()
        except BrokenPipeError as exc:
            raise _OutputClosed() from exc


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Iterator[str]:
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        yield "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        if n == 0:
            yield "  ".join("-" * w for w in widths)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _decode_params(params: Any) -> dict[str, Any]:
    """MLflow params of a run: the method's params (typed back from JSON where possible)."""
    out: dict[str, Any] = {}
    for key, text in params.items():
        if not key.startswith(PARAM_PREFIX):
            continue
        try:
            out[key[len(PARAM_PREFIX) :]] = json.loads(text)
        except (TypeError, ValueError):
            out[key[len(PARAM_PREFIX) :]] = text
    return out


# ---------------------------------------------------------------------- resolution
def _sqlite_problem(path: Path) -> str | None:
    """Why ``path`` is not an MLflow SQLite database we can read; None if it is one."""
    if not path.is_file():
        return "no such file"
    if not os.access(path, os.R_OK):
        return "this user may not read it"
    if path.stat().st_size == 0:
        return "the file is empty"
    try:
        # read-only: opening this way never creates or changes anything
        with contextlib.closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        ) as conn:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'experiments'"
            ).fetchone()
    except sqlite3.Error as exc:
        return f"not a readable SQLite database: {exc}"
    return None if found else "a SQLite database, but not MLflow's: it has no experiments"


def require_tracking_store(uri: str) -> None:
    """Raise :class:`ConfigurationError` unless a local tracking store at ``uri`` exists.

    A ``sqlite:`` URI must name an existing MLflow database, a plain path or ``file:`` URI
    (MLflow's file store) an existing folder. Other URIs (a tracking server, PostgreSQL) are
    not checked here. Commands that only read must not create a database: MLflow would
    create and migrate an empty one, and report nothing found in it.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    where: Path | None
    problem: str | None
    if scheme == "sqlite" or scheme.startswith("sqlite+"):
        raw = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if raw in ("", ":memory:"):
            where, problem = None, "an in-memory database holds nothing"
        else:
            where = Path(raw)
            problem = _sqlite_problem(where)
    elif scheme in ("", "file"):
        where = Path(unquote(parts.path) if scheme == "file" else uri)
        problem = None if where.is_dir() else "no such folder"
    else:
        return
    if problem:
        raise ConfigurationError(
            f"no tracking database at {where.absolute() if where else uri} ({problem}): "
            "point --tracking-uri (or MLFLOW_TRACKING_URI) at an existing one, "
            "e.g. sqlite:////abs/path/mlflow.db"
        )


def _manager(
    args: argparse.Namespace, *, plugin: bool = False, metric: bool = False
) -> ExperimentsManager:
    """A manager for a command that reads (or repairs) an existing tracking store."""
    from tracker_core.connect import connect

    if plugin and not args.plugin:
        raise UsageError(f"{args.command}: --plugin is required")
    if metric and not args.metric:
        raise UsageError(f"{args.command}: --metric is required")
    require_tracking_store(args.tracking_uri)
    return connect(
        args.artifact_uri,
        tracking_uri=args.tracking_uri,
        plugin_name=args.plugin or _ANY_PLUGIN,
        main_metric=args.metric or _ANY_METRIC,
        is_loss=args.loss,
        retry=_retry(args),
    )


def _retry(args: argparse.Namespace) -> RetryConfig | None:
    """``--retries N``: N attempts of every operation (None: the default policy, or the
    method's own for ``run``)."""
    return None if args.retries is None else RetryConfig(RetryParams(max_attempts=args.retries))


def _attempts(text: str) -> int:
    """``--retries``: a whole number of attempts, at least one."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of attempts >= 1, got {text!r}")
    return value


def _is_run_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def _find_iteration(
    manager: ExperimentsManager, args: argparse.Namespace, ref: str
) -> ExperimentRecord:
    """An iteration by experiment id, full experiment name, or (with --plugin) batch id."""
    if ref.isdigit():
        found = manager.get_experiment(ref)
        if found is None or found.lifecycle_stage != "active":
            raise ModelNotFoundError(f"no active experiment with id {ref}")
        return found
    by_name = manager.get_experiment_by_name(ref)
    if by_name is not None:
        return by_name
    if args.plugin:
        for experiment in manager.get_experiments():
            if experiment.tags.get(T.TAG_BATCH) == ref:
                return experiment
    hint = "" if args.plugin else " (with --plugin, a batch id works too)"
    raise ModelNotFoundError(f"no iteration named {ref!r}{hint}")


def _sorted_runs(runs: Sequence[RunRecord], metric: str | None, is_loss: bool) -> list[RunRecord]:
    def key(run: RunRecord) -> tuple[int, float, int, str]:
        value = run.metrics.get(metric) if metric else None
        if value is None or run.status != RunStatus.FINISHED:
            return (1, 0.0, run.start_time_ms, run.run_id)
        return (0, value if is_loss else -value, run.start_time_ms, run.run_id)

    return sorted(runs, key=key)


def _run_json(run: RunRecord) -> dict[str, Any]:
    marked = run.tags.get(T.TAG_MODEL_UPLOADED) == T.TRUE
    return {
        "run_id": run.run_id,
        "run_name": run.run_name,
        "experiment_id": run.experiment_id,
        "status": run.status.value,
        "params": _decode_params(run.params),
        "metrics": {
            k: v
            for k, v in run.metrics.items()
            if k not in (T.METRIC_MODEL_UPLOADED, T.METRIC_MODEL_DELETED)
        },
        "has_model": marked,
        "model_uri": run.tags.get(T.TAG_MODEL_URI) if marked else None,
    }


# ---------------------------------------------------------------------- commands
def cmd_iterations(args: argparse.Namespace, out: Output) -> int:
    with _manager(args, plugin=True) as manager:
        experiments = manager.get_experiments()
    data = []
    for e in experiments:
        parsed = parse_iteration_name(e.name)
        data.append(
            {
                "experiment_id": e.experiment_id,
                "name": e.name,
                "batch_id": e.tags.get(T.TAG_BATCH, parsed.batch_id if parsed else ""),
                "start_run_id": parsed.run_id if parsed else None,
                "created_ms": e.creation_time_ms,
                "artifact_location": e.artifact_location,
            }
        )
    out.emit(
        data,
        lambda: (
            _table(
                ["experiment", "batch", "started from run", "name"],
                [[d["experiment_id"], d["batch_id"], d["start_run_id"], d["name"]] for d in data],
            )
            if data
            else iter([f"no iterations of plugin {args.plugin!r}"])
        ),
    )
    return 0


def cmd_runs(args: argparse.Namespace, out: Output) -> int:
    with _manager(args) as manager:
        experiment = _find_iteration(manager, args, args.iteration)
        runs = manager.get_runs(experiment.experiment_id)
    runs = _sorted_runs(runs, args.metric, args.loss)
    data = [_run_json(r) for r in runs]
    param_names = sorted({k for d in data for k in d["params"]})
    metric_names = sorted({k for d in data for k in d["metrics"]})
    if args.metric in metric_names:  # the main metric first
        metric_names.remove(args.metric)
        metric_names.insert(0, args.metric)

    def table() -> Iterator[str]:
        yield f"{experiment.name} (experiment {experiment.experiment_id}): {len(data)} run(s)"
        rows = [
            [d["run_id"], d["status"], "yes" if d["has_model"] else ""]
            + [json.dumps(d["params"].get(p)) for p in param_names]
            + [_fmt(d["metrics"].get(m)) for m in metric_names]
            for d in data
        ]
        yield from _table(["run", "status", "model", *param_names, *metric_names], rows)

    out.emit(
        {"experiment_id": experiment.experiment_id, "name": experiment.name, "runs": data}, table
    )
    return 0


def _best(manager: ExperimentsManager, experiment: ExperimentRecord) -> RunRecord:
    best = manager.get_best_model_run(experiment.experiment_id)
    if best is None:
        raise ModelNotFoundError(f"iteration {experiment.name!r} holds no model")
    return best


def cmd_best(args: argparse.Namespace, out: Output) -> int:
    with _manager(args, metric=True) as manager:
        experiment = _find_iteration(manager, args, args.iteration)
        best = _best(manager, experiment)
    data = {
        **_run_json(best),
        "iteration": experiment.name,
        "main_metric": args.metric,
        "value": best.metrics.get(args.metric),
    }
    out.emit(
        data,
        lambda: iter(
            [
                f"iteration:  {experiment.name} (experiment {experiment.experiment_id})",
                f"best run:   {best.run_id}",
                f"{args.metric}: {_fmt(best.metrics.get(args.metric))}",
                f"params:     {json.dumps(data['params'], sort_keys=True)}",
                f"model:      {data['model_uri']}",
            ]
        ),
    )
    return 0


def cmd_download(args: argparse.Namespace, out: Output) -> int:
    with _manager(args) as manager:
        if _is_run_id(args.target):
            run_id = args.target
        else:
            if not args.metric:
                raise UsageError("download: --metric is required to pick an iteration's best model")
            run_id = _best(manager, _find_iteration(manager, args, args.target)).run_id
        destination = manager.download_model_files(run_id, Path(args.dest), progress=None)
    files = sorted(str(p.relative_to(destination)) for p in destination.rglob("*") if p.is_file())
    data = {"run_id": run_id, "destination": str(destination.resolve()), "files": files}
    out.emit(data, lambda: iter([f"model of run {run_id}: {len(files)} file(s) in {destination}"]))
    return 0


def cmd_run(args: argparse.Namespace, out: Output) -> int:
    from tracker_core.connect import connect
    from tracker_core.methods import connect_kwargs, load_method

    if ":" in args.method and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # module:attr paths resolve from the current folder
    method = load_method(args.method)
    kwargs = connect_kwargs(method)
    if args.n_top_runs is not None:
        kwargs["n_top_runs"] = args.n_top_runs
    if args.retries is not None:
        kwargs["retry"] = _retry(args)
    with connect(args.artifact_uri, tracking_uri=args.tracking_uri, **kwargs) as manager:
        result = run_iteration(method, manager, args.batch_id, seed=args.seed)
    out.emit(_result_json(result), lambda: _result_table(result))
    return 0


def _result_json(result: IterationResult) -> dict[str, Any]:
    return {
        "plugin": result.plugin_name,
        "iteration": result.iteration_name,
        "experiment_id": result.experiment_id,
        "batch_id": result.batch_id,
        "start_run_id": result.start_run_id,
        "started_from_initial": result.started_from_initial,
        "resumed": result.resumed,
        "main_metric": result.main_metric,
        "best_run_id": result.best_run_id,
        "best_metric": result.best_metric,
        "best_model_uri": result.best_model_uri,
        "deleted_iteration_id": result.deleted_iteration_id,
        "runs": [
            {
                "run_id": r.run_id,
                "params": r.params.to_dict(),
                "status": r.status.value,
                "metric": r.metric,
                "trained": r.trained,
                "has_model": r.has_model,
                "error": r.error,
            }
            for r in result.runs
        ],
    }


def _result_table(result: IterationResult) -> Iterator[str]:
    yield f"iteration {result.iteration_name!r} (experiment {result.experiment_id})"
    names = sorted({k for r in result.runs for k in r.params.to_dict()})
    rows = [
        [r.run_id, r.status.value, "trained" if r.trained else "skipped", _fmt(r.metric)]
        + [json.dumps(r.params.to_dict()[n]) for n in names]
        + [r.error or ""]
        for r in result.runs
    ]
    yield from _table(["run", "status", "this call", result.main_metric, *names, "error"], rows)
    yield f"best run {result.best_run_id}: {result.main_metric}={_fmt(result.best_metric)}"
    yield f"best model: {result.best_model_uri}"


def cmd_gc(args: argparse.Namespace, out: Output) -> int:
    with _manager(args) as manager:
        store = manager.artifacts
        scan = manager.find_orphaned_models(
            include_running=args.include_running, max_depth=args.max_depth
        )
        if args.delete and (scan.orphans or scan.uploads) and scan.experiments == 0:
            raise CleanupRefusedError(
                f"gc --delete: no experiment of the tracking store {manager.tracking_uri} keeps "
                f"its models under {store.root}, so every model there looks orphaned; check "
                "--tracking-uri and --artifact-uri (nothing was deleted)"
            )
        orphans: list[dict[str, Any]] = [attrs.asdict(o) for o in scan.orphans]
        uploads: list[dict[str, Any]] = [attrs.asdict(u) for u in scan.uploads]
        twins: list[dict[str, Any]] = [attrs.asdict(t) for t in scan.twins]
        if args.delete:
            for orphan, model in zip(orphans, scan.orphans, strict=True):
                orphan["deleted"] = manager.delete_orphaned_model(model)
            for item, upload in zip(uploads, scan.uploads, strict=True):
                manager.abort_orphaned_upload(upload)
                item["aborted"] = True
            for item, twin in zip(twins, scan.twins, strict=True):
                item["deleted"] = manager.delete_abandoned_twin(twin)
    skipped = [attrs.asdict(o) for o in scan.skipped]
    skipped_uploads = [attrs.asdict(u) for u in scan.skipped_uploads]
    missing = [attrs.asdict(m) for m in scan.missing]
    data = {
        "root": store.root,
        "dry_run": not args.delete,
        "orphans": orphans,
        "skipped": skipped,
        "uploads": uploads,
        "skipped_uploads": skipped_uploads,
        "missing": missing,
        "twins": twins,
        "marked_models": scan.marked_models,
    }

    def table() -> Iterator[str]:
        verb = "deleted" if args.delete else "would delete"
        yield (
            f"{len(orphans)} orphaned model folder(s) under {store.root} ({verb}); "
            f"{scan.marked_models} marked model(s) kept"
        )
        if orphans:
            yield from _table(["folder", "reason"], [[o["uri"], o["reason"]] for o in orphans])
        if uploads:
            yield (
                f"{len(uploads)} incomplete upload(s) "
                f"({'aborted' if args.delete else 'would abort'}):"
            )
            yield from _table(["object", "reason"], [[u["uri"], u["reason"]] for u in uploads])
        if twins:
            yield f"{len(twins)} run(s) their creators left beside a run of the same name ({verb}):"
            rows = [[t["run_id"], t["run_name"], t["kept_run_id"]] for t in twins]
            yield from _table(["run", "name", "kept run"], rows)
        for s in skipped:
            yield f"skipped {s['uri']}: {s['reason']} (use --include-running if it is dead)"
        for u in skipped_uploads:
            yield f"skipped upload of {u['uri']}: {u['reason']}"
        for m in missing:
            yield f"run {m['run_id']} is marked as holding {m['uri']}, but its files are gone"
        if missing:
            yield "marked models without files: see `tracker-core verify` (and `--unmark`)"
        if (orphans or uploads or twins) and not args.delete:
            yield "dry run: nothing deleted; run again with --delete to delete them"

    out.emit(data, table)
    return 0


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    with _manager(args) as manager:
        store = manager.artifacts
        scan = manager.find_models_missing_files()
        missing: list[dict[str, Any]] = [attrs.asdict(m) for m in scan.missing]
        if args.unmark:
            for item, model in zip(missing, scan.missing, strict=True):
                item["unmarked"] = manager.unmark_model_missing_files(model)
    remaining = [m for m in missing if not m.get("unmarked")]
    data = {
        "root": store.root,
        "checked": scan.checked,
        "missing": missing,
        "outside": list(scan.outside),
    }

    def table() -> Iterator[str]:
        yield (
            f"{scan.checked} marked model(s) under {store.root} checked: "
            f"{len(missing)} with their files gone"
        )
        if missing:
            rows = [
                [
                    m["run_id"],
                    m["experiment_id"],
                    "unmarked" if m.get("unmarked") else "live worker" if m["live"] else "marked",
                    m["uri"],
                ]
                for m in missing
            ]
            yield from _table(["run", "experiment", "state", "model"], rows)
        if scan.outside:
            yield f"{len(scan.outside)} marked model(s) live in another store: not checked"
        if remaining and not args.unmark:
            yield "run again with --unmark to unmark them (an initial model can then be uploaded)"

    out.emit(data, table)
    return 1 if remaining else 0


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
