"""Logging N metric values for one run: tracker-core vs MLflow one call per value vs one batch.

Three ways to get the same N points (one metric, steps 0..N-1) into one run, then end it:

- ``ours``: ``ExperimentsManager.save_metric`` N times, then ``finish_run`` (values are
  buffered and sent with ``log_batch`` every 500 values and at ``finish_run``);
- ``naive``: ``MlflowClient.log_metric`` once per value, then ``set_terminated``;
- ``floor``: ``MlflowClient.log_batch`` of all values (in MLflow's 1,000-per-request chunks),
  then ``set_terminated``: the least any client can do.

Against in-process SQLite and a real ``mlflow server`` (HTTP, SQLite behind it). Run creation
is not timed. ``calls`` counts tracking-store calls (HTTP requests for the server).

    .venv/bin/python benchmarks/bench_metrics.py [--n 2000] [--repeat 3] [--json]
"""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # before mlflow is imported

import contextlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import attrs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import CallCounter, Row, base_parser, emit, measure, quiet_logs

import tracker_core
from tracker_core import FineTuningIteration, FineTuningParams, MetricValue
from tracker_core.testing.servers import mlflow_server

PLUGIN = "bench-metrics"
METRIC = "loss"


@attrs.frozen
class Params(FineTuningParams):
    seed: int


def bench_backend(
    label: str, tracking_uri: str, artifacts: Path, n: int, repeat: int, naive_repeat: int
) -> list[Row]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.store.tracking.abstract_store import AbstractStore
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    client = MlflowClient(tracking_uri)
    mgr = tracker_core.connect(
        str(artifacts),
        tracking_uri=tracking_uri,
        main_metric=METRIC,
        plugin_name=PLUGIN,
        is_loss=True,
        params_type=Params,
    )
    mgr.set_iteration(FineTuningIteration(plugin_name=PLUGIN, batch_id=label))
    experiment_id = mgr.current_experiment_id
    assert experiment_id is not None
    values = [1.0 / (i + 1) for i in range(n)]
    seeds = iter(range(10**6))
    run_ids: dict[str, list[str]] = {"ours": [], "naive": [], "floor": []}
    current: dict[str, str] = {}

    def new_ours_run() -> None:
        mgr.set_run(Params(seed=next(seeds)))
        assert mgr.current_run_id is not None
        current["ours"] = mgr.current_run_id
        run_ids["ours"].append(mgr.current_run_id)

    def new_client_run(kind: str) -> Callable[[], None]:
        def setup() -> None:
            current[kind] = client.create_run(experiment_id).info.run_id
            run_ids[kind].append(current[kind])

        return setup

    def ours() -> None:
        for value in values:
            mgr.save_metric(MetricValue(METRIC, value))
        mgr.finish_run()

    def naive() -> None:
        run_id = current["naive"]
        for step, value in enumerate(values):
            client.log_metric(run_id, METRIC, value, step=step)
        client.set_terminated(run_id)

    def floor() -> None:
        run_id = current["floor"]
        now = int(time.time() * 1000)
        metrics = [Metric(METRIC, v, now, step) for step, v in enumerate(values)]
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics[start : start + 1000], synchronous=True)
        client.set_terminated(run_id)

    # warm up every path once (imports, connection pools, SQLAlchemy caches), untimed
    new_ours_run()
    mgr.save_metric(MetricValue(METRIC, 1.0))
    mgr.finish_run()
    for kind in ("naive", "floor"):
        new_client_run(kind)()
        client.log_metric(current[kind], METRIC, 1.0)
        client.log_batch(current[kind], [Metric(METRIC, 1.0, 0, 1)], synchronous=True)
    for kind in run_ids:
        run_ids[kind].clear()

    calls: dict[str, int] = {}
    times: dict[str, float] = {}
    counter = CallCounter([AbstractStore, RestStore, SqlAlchemyStore])
    with counter:
        times["ours"], calls["ours"] = measure(ours, repeat, new_ours_run, counter)
        times["naive"], calls["naive"] = measure(
            naive, naive_repeat, new_client_run("naive"), counter
        )
        times["floor"], calls["floor"] = measure(floor, repeat, new_client_run("floor"), counter)

    for kind, ids in run_ids.items():  # every way logged every value, once
        for run_id in ids:
            got = len(client.get_metric_history(run_id, METRIC))
            assert got == n, f"{kind}: run {run_id} holds {got} values of {METRIC}, expected {n}"
            assert client.get_run(run_id).info.status == "FINISHED", (kind, run_id)
    mgr.close()

    rows: list[Row] = []
    names = {
        "ours": "tracker-core save_metric x N + finish_run",
        "naive": "MlflowClient.log_metric x N + set_terminated",
        "floor": "MlflowClient.log_batch (1000/request) + set_terminated",
    }
    for kind in ("ours", "naive", "floor"):
        rows.append(
            {
                "store": label,
                "way": names[kind],
                "seconds": times[kind],
                "us/value": times[kind] / n * 1e6,
                "calls": calls[kind],
                "x floor": times[kind] / times["floor"],
                "x ours": times[kind] / times["ours"],
            }
        )
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--n", type=int, default=2000, help="metric values per run")
    parser.add_argument(
        "--naive-repeat", type=int, default=1, help="repetitions of the slow one-call-per-value way"
    )
    parser.add_argument("--no-server", action="store_true", help="SQLite only")
    args = parser.parse_args()
    quiet_logs()

    rows: list[Row] = []
    # MLflow prints "View run ... at" lines on stdout for HTTP URIs: keep stdout for the result
    with (
        contextlib.redirect_stdout(sys.stderr),
        tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp,
    ):
        root = Path(tmp)
        rows += bench_backend(
            "sqlite (in-process)",
            f"sqlite:///{root / 'mlflow.db'}",
            root / "models",
            args.n,
            args.repeat,
            args.naive_repeat,
        )
        if not args.no_server:
            with mlflow_server(root / "server") as uri:
                rows += bench_backend(
                    "mlflow server (HTTP)",
                    uri,
                    root / "server-models",
                    args.n,
                    args.repeat,
                    args.naive_repeat,
                )
    emit(
        f"bench_metrics: {args.n} values of one metric, one run",
        rows,
        ["store", "way", "seconds", "us/value", "calls", "x floor", "x ours"],
        args.json,
        {"n": args.n, "repeat": args.repeat, "naive_repeat": args.naive_repeat},
    )


if __name__ == "__main__":
    main()
