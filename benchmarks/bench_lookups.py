"""Finding the last finished iteration's best model: tracker-core vs "fetch everything".

A store holds N iterations (experiments) of one plugin with 5 runs each; every iteration has
one marked model; the newest iteration is still running (one RUNNING run), so the answer is
the one before it. Two ways to find that iteration and its best model's URL:

- ``ours``: ``ExperimentsManager.get_last_model_url()`` without a current iteration (newest
  iterations first, one ``max_results=1`` run query per check, then the marked runs of the
  one found), and ``get_last_finished_iteration_id()`` alone;
- ``naive``: ``MlflowClient.search_experiments`` (every page), ``search_runs`` over every
  experiment (every page), then pick in Python.

Measured at N=20 and N=200 (the same store, grown) on in-process SQLite. The store is
written with ``MlflowClient`` and the tags tracker-core writes; writing it is not timed.

    .venv/bin/python benchmarks/bench_lookups.py [--sizes 20,200] [--runs 5] [--repeat 5] [--json]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import attrs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import CallCounter, Row, base_parser, emit, measure, quiet_logs, tracking_store_classes

import tracker_core
from tracker_core import FineTuningIteration, FineTuningParams
from tracker_core import tags as T

PLUGIN = "bench-lookups"
METRIC = "quality"
TERMINAL = ("FINISHED", "FAILED", "KILLED")


@attrs.frozen
class Params(FineTuningParams):
    seed: int


def grow(client: Any, models_uri: str, start: int, stop: int, runs: int) -> str | None:
    """Add iterations ``start..stop-1``; the newest gets a RUNNING run. Returns the URL of the
    best model of the newest finished iteration."""
    from mlflow.entities import Metric, Param, RunTag

    expected: str | None = None
    for i in range(start, stop):
        name = str(FineTuningIteration(plugin_name=PLUGIN, batch_id=f"batch-{i:04d}"))
        experiment_id = client.create_experiment(
            name,
            artifact_location=f"{models_uri}/{i:04d}",
            tags={
                T.TAG_PLUGIN: PLUGIN,
                T.TAG_KIND: T.KIND_ITERATION,
                T.TAG_BATCH: f"batch-{i:04d}",
            },
        )
        newest = i == stop - 1
        for r in range(runs):
            params = Params(seed=r)
            run = client.create_run(
                experiment_id,
                run_name=params.id,
                tags={T.TAG_PLUGIN: PLUGIN, T.TAG_PARAMS_ID: params.id},
            )
            run_id = run.info.run_id
            best = r == runs - 1  # the highest quality
            uri = f"{run.info.artifact_uri}/{T.MODEL_DIR}"
            tags = [RunTag(T.TAG_MODEL_UPLOADED, T.TRUE if best else T.FALSE)]
            if best:
                tags += [RunTag(T.TAG_MODEL_URI, uri), RunTag(T.TAG_MODEL_FORMAT, "state_dict")]
            now = int(time.time() * 1000)
            client.log_batch(
                run_id,
                metrics=[Metric(METRIC, 0.5 + r / 100, now, 0), Metric("loss", 1.0, now, 0)],
                params=[Param(k, v) for k, v in params.to_mlflow().items()],
                tags=tags,
            )
            if newest and r == 0:
                continue  # still running: the newest iteration is not finished
            client.set_terminated(run_id, "FINISHED")
            if best and not newest:
                expected = uri
    return expected


def naive_lookup(client: Any) -> str | None:
    """Fetch every experiment and every run, pick in Python."""
    from mlflow.entities import ViewType

    experiments: list[Any] = []
    token = None
    while True:
        page = client.search_experiments(
            view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        )
        experiments += page
        token = page.token
        if not token:
            break
    mine = [
        e
        for e in experiments
        if e.tags.get(T.TAG_PLUGIN) == PLUGIN and e.tags.get(T.TAG_KIND) == T.KIND_ITERATION
    ]
    runs_of: dict[str, list[Any]] = defaultdict(list)
    ids = [e.experiment_id for e in mine]
    token = None
    while ids:
        runs = client.search_runs(ids, max_results=1000, page_token=token)
        for run in runs:
            runs_of[run.info.experiment_id].append(run)
        token = runs.token
        if not token:
            break
    for experiment in sorted(
        mine, key=lambda e: (e.creation_time, int(e.experiment_id)), reverse=True
    ):
        runs = runs_of.get(experiment.experiment_id, [])
        if not runs or any(r.info.status not in TERMINAL for r in runs):
            continue
        marked = [
            r
            for r in runs
            if r.data.tags.get(T.TAG_MODEL_UPLOADED) == T.TRUE
            and r.info.status != "FAILED"
            and METRIC in r.data.metrics
        ]
        if not marked:
            return None
        best = max(marked, key=lambda r: r.data.metrics[METRIC])
        uri: str | None = best.data.tags.get(T.TAG_MODEL_URI)
        return uri
    return None


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.set_defaults(repeat=5)
    parser.add_argument("--sizes", default="20,200", help="iteration counts, ascending")
    parser.add_argument("--runs", type=int, default=5, help="runs per iteration")
    args = parser.parse_args()
    quiet_logs()
    sizes = sorted(int(s) for s in args.sizes.split(","))

    from mlflow import MlflowClient

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-lookups-") as tmp:
        root = Path(tmp)
        tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        models_uri = (root / "models").as_uri()
        client = MlflowClient(tracking_uri)
        mgr = tracker_core.connect(
            models_uri, tracking_uri=tracking_uri, main_metric=METRIC, plugin_name=PLUGIN
        )
        counter = CallCounter(tracking_store_classes())
        built = 0
        for size in sizes:
            start = time.perf_counter()
            if built:  # the previous newest iteration finishes before the store grows
                for run in client.search_runs(
                    [e.experiment_id for e in client.search_experiments()],
                    filter_string="attributes.status = 'RUNNING'",
                ):
                    client.set_terminated(run.info.run_id, "FINISHED")
            expected = grow(client, models_uri, built, size, args.runs)
            built = size
            setup_s = time.perf_counter() - start
            print(
                f"  built {size} iterations x {args.runs} runs in {setup_s:.1f} s", file=sys.stderr
            )

            assert mgr.get_last_model_url() == expected, (mgr.get_last_model_url(), expected)
            assert naive_lookup(client) == expected
            with counter:
                ways = [
                    ("tracker-core get_last_model_url", mgr.get_last_model_url),
                    (
                        "tracker-core get_last_finished_iteration_id",
                        mgr.get_last_finished_iteration_id,
                    ),
                    (
                        "naive: every experiment + every run, pick in Python",
                        lambda: naive_lookup(client),
                    ),
                ]
                results = {name: measure(fn, args.repeat, None, counter) for name, fn in ways}
            ours = results[ways[0][0]][0]
            for name, (seconds, calls) in results.items():
                rows.append(
                    {
                        "iterations": size,
                        "runs": size * args.runs,
                        "way": name,
                        "ms": seconds * 1000,
                        "calls": calls,
                        "x ours": seconds / ours,
                    }
                )
        mgr.close()
    for row in rows:  # growth from the smallest store, per way
        first = next(r for r in rows if r["way"] == row["way"])
        row[f"x at N={sizes[0]}"] = row["ms"] / first["ms"]
    emit(
        f"bench_lookups: last finished iteration's best model, {args.runs} runs per iteration",
        rows,
        ["iterations", "runs", "way", "ms", "calls", "x ours", f"x at N={sizes[0]}"],
        args.json,
        {"sizes": sizes, "runs_per_iteration": args.runs, "repeat": args.repeat},
    )


if __name__ == "__main__":
    main()
