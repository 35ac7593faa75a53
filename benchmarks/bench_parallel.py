"""Parallel runs: wall time of one iteration of 8 params sets whose training sleeps 2 s, on
1, 2 and 4 task-service workers, and in 4 plain processes running ``run_iteration`` on one
batch, as a ratio to the sequential driver; and what one run job costs on top of its training.

Every configuration gets a private PostgreSQL database for its task queue, a fresh MLflow
tracking store and model folder, an API (``tracker-core serve --no-worker``) and N workers
(``tracker-core worker``, one slot each, shipped timings), all subprocesses, and the
``svc-bench`` method of
``tests/_service_methods.py`` (8 params sets, ``sleep`` 2 s, a tiny model). A first iteration
warms everything up (initial model upload, forkservers); the measured iterations are the
following ones (they start from the previous best model, which every run job downloads, and
their completion deletes the previous iteration), timed from POST to ``done`` by polling the
task row. The sequential driver is ``run_iteration`` in one plain process on its own fresh
store (warm-up iteration first), timed from a start signal to its return; the library path is
the same in ``--processes`` processes at once on one batch (the same start signal; the last
one's return ends it; together they must have trained each params set once). ``1 worker,
max_parallel_runs=1`` is the service's own sequential path (one job trains every run), for
comparison.

Per-run-job overhead, from the run table and Procrastinate's events of the measured
iterations: ``job - train`` is a run job's duration minus its training (child process start,
``connect``, resuming the iteration, the run's lease, downloading the starting model, saving
the model, ending the run, the job's transactions); ``pickup`` is the time from a run job's
deferral to its start when a worker is free (the first wave); ``setup`` and ``completion``
are the durations of the task's own job and of its completion job. The *floor* of a fanned-out
configuration on this machine is ``setup + waves x (training + job - train) + completion``
with that configuration's own medians (``waves``: 8 runs over N workers, rounded up): what it
would take if nothing but its jobs' own work were paid; ``x floor`` is the wall time over it.

The MLflow tracking store is a PostgreSQL database of the same private server (MLflow's SQL
store, as an ``mlflow server`` on PostgreSQL would use it), or with ``--tracking sqlite`` a
SQLite file: one file shared by several writing processes serializes them on its lock.

``.venv/bin/python benchmarks/bench_parallel.py [--workers 1 2 4] [--processes 4]
[--repeat 2] [--tracking postgres|sqlite] [--json]``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import base_parser, emit, quiet_logs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

METHOD = "svc-bench"
SLEEP = 2.0
N_PARAMS = 8

_LIBRARY = """
import pathlib, sys, time, tracker_core
sys.path.insert(0, {tests!r})
from _service_methods import Bench
from tracker_core.finetune import run_iteration
from tracker_core.methods import connect_kwargs
work = pathlib.Path({work!r})
method = Bench()
with tracker_core.connect({models!r}, tracking_uri={tracking!r},
                          **connect_kwargs(method)) as manager:
    if {index} == 0:
        run_iteration(method, manager, "warm-up")
    (work / "ready-{index}").touch()
    for i in range({repeat}):
        while not (work / f"go-{{i}}").exists():
            time.sleep(0.005)
        result = run_iteration(method, manager, f"measured-{{i}}")
        trained = " ".join(r.params.id for r in result.trained_runs)
        assert not result.failed_runs
        (work / f"done-{{i}}-{index}").write_text(f"{{time.time()}} {{trained}}")
"""


def tracking_store(pg: str, work: Path, kind: str) -> str:
    """A fresh MLflow tracking URI for one configuration, its schema created."""
    from _service_harness import create_database, premigrate

    if kind == "sqlite":
        uri = f"sqlite:///{work / 'mlflow.db'}"
    else:
        url = create_database(pg, f"mlflow_{work.name.replace('-', '_')}")
        uri = "postgresql+psycopg://" + url.split("://", 1)[1]
    premigrate(uri, str(work / "models"))
    return uri


def library(pg: str, work: Path, processes: int, repeat: int, kind: str) -> list[float]:
    """``run_iteration`` in ``processes`` plain processes at once on one batch (one of them
    runs a warm-up iteration first): the seconds of each measured iteration, from the start
    signal to the last return."""
    work.mkdir(parents=True)
    tracking, models = tracking_store(pg, work, kind), str(work / "models")
    env = {**os.environ, "MLFLOW_LOGGING_LEVEL": "ERROR"}
    procs: list[subprocess.Popen[bytes]] = []

    def start(index: int) -> None:
        code = _LIBRARY.format(
            tests=str(ROOT / "tests"), work=str(work), models=models, tracking=tracking,
            repeat=repeat, index=index,
        )  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env))

    def wait_for(paths: list[Path]) -> None:
        deadline = time.monotonic() + 600
        while not all(p.exists() for p in paths):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                raise RuntimeError(f"a run_iteration process failed ({work})")
            time.sleep(0.01)

    walls: list[float] = []
    try:
        start(0)
        wait_for([work / "ready-0"])  # the warm-up iteration is done: the initial model exists
        for index in range(1, processes):
            start(index)
        wait_for([work / f"ready-{k}" for k in range(processes)])
        for i in range(repeat):
            go = time.time()
            (work / f"go-{i}").touch()
            done = [work / f"done-{i}-{k}" for k in range(processes)]
            wait_for(done)
            ends, trained = [], []
            for path in done:
                end, *ids = path.read_text().split()
                ends.append(float(end))
                trained += ids
            if sorted(trained) != sorted(set(trained)) or len(trained) != N_PARAMS:
                raise RuntimeError(f"{processes} process(es) trained {trained}")
            walls.append(max(ends) - go)
            print(f"{work.name}: {walls[-1]:.2f} s", file=sys.stderr, flush=True)
        for proc in procs:
            proc.wait(timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return walls


def wait_done(conn: Any, task_id: str, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute(
            "SELECT status, error FROM tracker_core_tasks WHERE id = %s", (task_id,)
        ).fetchone()
        if row[0] == "done":
            return time.perf_counter()
        if row[0] in ("error", "canceled") or time.monotonic() > deadline:
            raise RuntimeError(f"task {task_id} ended {row[0]}: {row[1]}")
        time.sleep(0.01)


def service(
    pg: str, work: Path, workers: int, repeat: int, cap: int | None, kind: str
) -> tuple[list[float], dict[str, list[float]]]:
    """Seconds of each measured iteration on ``workers`` workers, and the per-job figures."""
    import psycopg
    from _service_harness import create_database
    from bench_service import Service

    from tracker_core.service.client import ServiceClient
    from tracker_core.service.settings import psycopg_url

    work.mkdir(parents=True)
    database = create_database(pg, work.name.replace("-", "_"))
    svc = Service(database, work, tracking_store(pg, work, kind))
    svc.env["TC_SERVICE_TRAIN_LOG"] = str(work / "train.log")
    walls: list[float] = []
    figures: dict[str, list[float]] = {
        "job - train": [],
        "pickup": [],
        "setup": [],
        "completion": [],
    }
    try:
        svc.api()
        for _ in range(workers):
            svc.worker()
        client = ServiceClient(svc.url, timeout=120)
        with psycopg.connect(psycopg_url(database), autocommit=True) as conn:
            warm = client.create(METHOD, batch_id="warm-up", max_parallel_runs=cap)
            wait_done(conn, warm["id"])
            for i in range(repeat):
                start = time.perf_counter()
                task = client.create(METHOD, batch_id=f"measured-{i}", max_parallel_runs=cap)
                walls.append(wait_done(conn, task["id"]) - start)
                print(f"{work.name}: {walls[-1]:.2f} s", file=sys.stderr, flush=True)
                _job_figures(conn, task["id"], work / "train.log", figures)
    finally:
        svc.stop_all()
    return walls, figures


def _job_figures(conn: Any, task_id: str, train_log: Path, out: dict[str, list[float]]) -> None:
    """Per-run-job figures of one fanned-out task (see the module docstring)."""
    deadline = time.monotonic() + 60  # the task is done a moment before its last job ends
    while (
        conn.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE args->>'task_id' = %s "
            "AND status IN ('todo', 'doing')",
            (task_id,),
        ).fetchone()[0]
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    events: dict[int, dict[str, float]] = {}
    for job_id, name, kind, at in conn.execute(
        "SELECT j.id, j.task_name, e.type::text, extract(epoch FROM e.at) "
        "FROM procrastinate_jobs j JOIN procrastinate_events e ON e.job_id = j.id "
        "WHERE j.args->>'task_id' = %s",
        (task_id,),
    ).fetchall():
        events.setdefault(job_id, {"name": name})[kind] = float(at)  # type: ignore[assignment]
    runs = conn.execute(
        "SELECT params_id, job_id, extract(epoch FROM started_at) FROM tracker_core_runs "
        "WHERE task_id = %s",
        (task_id,),
    ).fetchall()
    if not runs:  # the sequential path: one job did everything
        return
    trained: dict[str, float] = {}
    starts: dict[str, float] = {}
    for line in train_log.read_text().splitlines():
        event, method, params_id, _, at = line.split()
        if method == METHOD and event == "start":
            starts[params_id] = float(at)
        elif method == METHOD and event == "end" and params_id in starts:
            trained[params_id] = float(at) - starts[params_id]  # the latest training of it
    first_wave_start = min(
        e["started"] for e in events.values() if str(e["name"]).endswith("run_params")
    )
    for params_id, job_id, _ in runs:
        job = events[job_id]
        out["job - train"].append(job["succeeded"] - job["started"] - trained[params_id])
        if job["started"] - job["deferred"] < 1.0 or job["started"] <= first_wave_start + 0.5:
            out["pickup"].append(job["started"] - job["deferred"])
    for job in events.values():
        if str(job["name"]).endswith("run_task"):
            out["setup"].append(job["succeeded"] - job["started"])
        elif str(job["name"]).endswith("complete_iteration"):
            out["completion"].append(job["succeeded"] - job["started"])


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--processes", type=int, default=4, help="library path: processes")
    parser.add_argument("--tracking", choices=["postgres", "sqlite"], default="postgres")
    args = parser.parse_args()
    quiet_logs()
    from tracker_core.testing import servers

    rows: list[dict[str, Any]] = []
    figures: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as tmp:
        work = Path(tmp)
        with servers.postgres(work / "pg") as pg:
            driver = library(pg, work / "driver", 1, args.repeat, args.tracking)
            sequential = statistics.median(driver)
            rows.append(
                {"way": "sequential driver (run_iteration, one process)", "seconds": sequential}
            )
            many = library(pg, work / "library", args.processes, args.repeat, args.tracking)
            rows.append(
                {
                    "way": f"run_iteration, {args.processes} processes on one batch",
                    "seconds": statistics.median(many),
                    "training floor s": -(-N_PARAMS // args.processes) * SLEEP,
                }
            )
            configs: list[tuple[int, int | None]] = [(1, 1)] + [(n, None) for n in args.workers]
            for workers, cap in configs:
                walls, found = service(
                    pg, work / f"w{workers}-c{cap}", workers, args.repeat, cap, args.tracking
                )
                label = f"service, {workers} worker(s)" + (
                    ", max_parallel_runs=1" if cap == 1 else ""
                )
                row: dict[str, Any] = {"way": label, "seconds": statistics.median(walls)}
                waves = N_PARAMS if cap == 1 else -(-N_PARAMS // workers)
                row["training floor s"] = waves * SLEEP
                if cap is None:
                    row["floor s"] = (
                        statistics.median(found["setup"])
                        + waves * (SLEEP + statistics.median(found["job - train"]))
                        + statistics.median(found["completion"])
                    )
                    row["x floor"] = row["seconds"] / row["floor s"]
                rows.append(row)
                for key, values in found.items():
                    figures.setdefault(key, []).extend(values)
    rows[0]["training floor s"] = N_PARAMS * SLEEP
    for row in rows:
        row["x sequential"] = row["seconds"] / sequential
    meta = {
        "iteration": f"{N_PARAMS} params sets, training sleeps {SLEEP} s each",
        "tracking store": args.tracking,
        "load average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    for key, values in figures.items():
        if values:
            meta[f"{key} s (p50, max, n)"] = (
                f"{statistics.median(values):.2f}, {max(values):.2f}, {len(values)}"
            )
    emit(
        "Parallel runs: one iteration on N workers vs the sequential driver",
        rows,
        ["way", "seconds", "x sequential", "training floor s", "floor s", "x floor"],
        args.json,
        meta,
    )


if __name__ == "__main__":
    main()
