"""The ``tracker-core`` commands about iterations: ``iterations``, ``runs``, ``best``,
``download`` (they read) and ``run`` (it runs or resumes one iteration of a method).

Also how they find an iteration from a command-line reference and show its runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tracker_core import tags as T
from tracker_core.cli_common import Output, UsageError, _fmt, _manager, _retry, _table
from tracker_core.errors import ModelNotFoundError
from tracker_core.finetune import IterationResult, parse_iteration_name, run_iteration
from tracker_core.manager import ExperimentsManager
from tracker_core.params import PARAM_PREFIX
from tracker_core.values import ExperimentRecord, RunRecord, RunStatus


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
    if args.lease_seconds is not None:
        kwargs["lease_seconds"] = args.lease_seconds
    with connect(args.artifact_uri, tracking_uri=args.tracking_uri, **kwargs) as manager:
        result = run_iteration(method, manager, args.batch_id, seed=args.seed)
    out.emit(result.to_json(), lambda: _result_table(result))
    return 0


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
