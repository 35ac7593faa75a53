"""Logging N metric values for one run: what the training loop pays, and when they are durable.

Four ways to get the same N points (one metric, steps 0..N-1) into one run, then end it:

- ``ours``: ``save_metric(MetricValue(...))`` N times (queued; a background sender sends
  batches of 1,000), then ``finish_run`` (sends what is left, then ends the run);
- ``mlflow async``: ``MlflowClient.log_metric(..., synchronous=False)`` N times (MLflow's
  own asynchronous logging, MLflow 2.8+), then wait for every operation and ``set_terminated``;
- ``naive``: ``MlflowClient.log_metric`` once per value, synchronously (measured on
  ``--naive-n`` values and reported per value: its cost per value is constant);
- ``floor``: ``MlflowClient.log_batch`` of all values in MLflow's 1,000-per-request chunks,
  then ``set_terminated``: the least any client can do.

Two times per way: **caller** (the loop that logs, i.e. what the training loop waits for),
and **durable** (until every value is in the store and the run ended). Against in-process
SQLite and a real ``mlflow server`` (HTTP, SQLite behind it). Run creation is not timed;
``calls`` counts tracking-store calls (HTTP requests for the server).

    .venv/bin/python benchmarks/bench_metrics.py [--n 10000] [--repeat 3] [--json]
"""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # before mlflow is imported

import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import attrs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import CallCounter, Row, base_parser, emit, quiet_logs, tracking_store_classes

import tracker_core
from tracker_core import FineTuningIteration, FineTuningParams, MetricValue
from tracker_core.testing.servers import mlflow_server

PLUGIN = "bench-metrics"
METRIC = "loss"

#: ``way(values) -> (caller seconds, durable seconds)``
Way = Callable[[list[float]], tuple[float, float]]


@attrs.frozen
class Params(FineTuningParams):
    seed: int


def _median_of(
    way: Way, values: list[float], repeat: int, setup: Callable[[], None], counter: CallCounter
) -> tuple[float, float, int]:
    callers, durables, calls = [], [], []
    for _ in range(max(1, repeat)):
        setup()
        before = counter.count
        caller, durable = way(values)
        callers.append(caller)
        durables.append(durable)
        calls.append(counter.count - before)
    return statistics.median(callers), statistics.median(durables), int(statistics.median(calls))


def bench_backend(
    label: str,
    tracking_uri: str,
    artifacts: Path,
    n: int,
    naive_n: int,
    repeat: int,
    fast_repeat: int = 5,
) -> list[Row]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)
    mgr = tracker_core.connect(
        str(artifacts),
        tracking_uri=tracking_uri,
        main_metric=METRIC,
        plugin_name=PLUGIN,
        is_loss=True,
        params_type=Params,
    )
    mgr.set_iteration(FineTuningIteration(plugin_name=PLUGIN, batch_id=label.split()[0]))
    experiment_id = mgr.current_experiment_id
    assert experiment_id is not None
    seeds = iter(range(10**6))
    runs: dict[str, list[tuple[str, int]]] = {}  # way -> (run id, values logged)
    current: dict[str, str] = {}

    def new_run(kind: str) -> Callable[[], None]:
        def setup() -> None:
            if kind == "ours":
                mgr.set_run(Params(seed=next(seeds)))
                current[kind] = mgr.current_run_id or ""
            else:
                current[kind] = client.create_run(experiment_id).info.run_id

        return setup

    def ours(values: list[float]) -> tuple[float, float]:
        start = time.perf_counter()
        for value in values:
            mgr.save_metric(MetricValue(METRIC, value))
        caller = time.perf_counter() - start
        mgr.finish_run()
        return caller, time.perf_counter() - start

    def mlflow_async(values: list[float]) -> tuple[float, float]:
        run_id = current["async"]
        start = time.perf_counter()
        ops = [
            client.log_metric(run_id, METRIC, v, step=step, synchronous=False)
            for step, v in enumerate(values)
        ]
        caller = time.perf_counter() - start
        for op in ops:
            assert op is not None  # synchronous=False always returns its operation
            op.wait()  # type: ignore[no-untyped-call]
        client.set_terminated(run_id)
        return caller, time.perf_counter() - start

    def naive(values: list[float]) -> tuple[float, float]:
        run_id = current["naive"]
        start = time.perf_counter()
        for step, value in enumerate(values):
            client.log_metric(run_id, METRIC, value, step=step)
        caller = time.perf_counter() - start
        client.set_terminated(run_id)
        return caller, time.perf_counter() - start

    def floor(values: list[float]) -> tuple[float, float]:
        run_id = current["floor"]
        start = time.perf_counter()
        now = int(time.time() * 1000)
        metrics = [Metric(METRIC, v, now, step) for step, v in enumerate(values)]
        for first in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics[first : first + 1000], synchronous=True)
        caller = time.perf_counter() - start
        client.set_terminated(run_id)
        return caller, time.perf_counter() - start

    # the cheap ways run at least fast_repeat times: their caller loop takes ~70 ms, so one
    # run of them is at the mercy of whatever else the machine does (before d5c8784 it also
    # swung with whether a background send overlapped the loop)
    cheap = max(repeat, fast_repeat)
    ways: dict[str, tuple[Way, int, int]] = {
        "ours": (ours, n, cheap),
        "async": (mlflow_async, n, repeat),
        "naive": (naive, naive_n, 1),
        "floor": (floor, n, cheap),
    }
    # warm up every path once (imports, threads, connection pools, SQLAlchemy caches), untimed
    for way, _, _ in ways.values():
        new_run(next(k for k, v in ways.items() if v[0] is way))()
        way([1.0, 0.5])

    counter = CallCounter(tracking_store_classes())
    results: dict[str, tuple[float, float, int]] = {}
    with counter:
        for kind, (way, count, times) in ways.items():
            values = [1.0 / (i + 1) for i in range(count)]
            setup = new_run(kind)

            def recorded(
                setup: Callable[[], None] = setup, kind: str = kind, count: int = count
            ) -> None:
                setup()
                runs.setdefault(kind, []).append((current[kind], count))

            results[kind] = _median_of(way, values, times, recorded, counter)

    for kind, logged in runs.items():  # every way logged every value, once, and ended the run
        for run_id, count in logged:
            got = len(client.get_metric_history(run_id, METRIC))
            assert got == count, f"{kind}: run {run_id} holds {got} values, expected {count}"
            assert client.get_run(run_id).info.status == "FINISHED", (kind, run_id)
    mgr.close()

    names = {
        "ours": "tracker-core save_metric x N + finish_run",
        "async": "MLflow log_metric(synchronous=False) x N + wait + set_terminated",
        "naive": f"MLflow log_metric x N (measured on {naive_n}) + set_terminated",
        "floor": "MLflow log_batch (1000/request) + set_terminated",
    }
    per_value = {k: (c / ways[k][1], d / ways[k][1]) for k, (c, d, _) in results.items()}
    rows: list[Row] = []
    for kind in ("ours", "async", "naive", "floor"):
        caller, durable = per_value[kind]
        rows.append(
            {
                "store": label,
                "way": names[kind],
                "caller us/value": caller * 1e6,
                "durable s (N values)": durable * n,
                "calls": results[kind][2],
                "caller x ours": caller / per_value["ours"][0],
                "durable x floor": durable / per_value["floor"][1],
            }
        )
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--n", type=int, default=10_000, help="metric values per run")
    parser.add_argument(
        "--naive-n", type=int, default=1000, help="values the one-call-per-value way logs"
    )
    parser.add_argument("--no-server", action="store_true", help="SQLite only")
    parser.add_argument(
        "--fast-repeat",
        type=int,
        default=5,
        help="repetitions of the cheap ways (ours, log_batch), at least --repeat",
    )
    args = parser.parse_args()
    quiet_logs()

    rows: list[Row] = []
    with (
        contextlib.redirect_stdout(sys.stderr),  # keep stdout for the result
        tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp,
    ):
        root = Path(tmp)
        rows += bench_backend(
            "sqlite (in-process)",
            f"sqlite:///{root / 'mlflow.db'}",
            root / "models",
            args.n,
            args.naive_n,
            args.repeat,
            args.fast_repeat,
        )
        if not args.no_server:
            with mlflow_server(root / "server") as uri:
                rows += bench_backend(
                    "mlflow server (HTTP)",
                    uri,
                    root / "server-models",
                    args.n,
                    args.naive_n,
                    args.repeat,
                    args.fast_repeat,
                )
    emit(
        f"bench_metrics: {args.n} values of one metric, one run",
        rows,
        [
            "store",
            "way",
            "caller us/value",
            "durable s (N values)",
            "calls",
            "caller x ours",
            "durable x floor",
        ],
        args.json,
        {"n": args.n, "naive_n": args.naive_n, "repeat": args.repeat},
    )


if __name__ == "__main__":
    main()
