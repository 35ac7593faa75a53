"""The task service's latencies: POST -> processing, API p50/p99 under 50 clients, and the
time from ``kill -9`` of a worker to its task's redelivery, with the shipped settings.

Starts a private PostgreSQL (``tracker_core.testing.servers.postgres``), an API (``tracker-core
serve --no-worker``) and workers (``tracker-core worker``, shipped timings: heartbeat 5 s,
stall 20 s, stall check every 5 s, poll 2 s) as subprocesses, MLflow on SQLite, and the fast
test methods of ``tests/_service_methods.py``. Three phases:

1. **POST -> processing**, one idle worker: POST a task, poll its row in PostgreSQL every
   millisecond until it is ``processing``; wait for it to end; repeat (``--tasks``).
2. **API under load**, no worker (the API and its database only): 50 client threads each
   POST ``--requests`` tasks, then GET random ones; p50/p99 per request, side by side with
   ``GET /health`` (one database round trip) as the floor.
3. **kill -9 -> redelivery**, two idle workers: a task starts on one, that worker is killed,
   and the time until the task is ``processing`` on the other is measured (``--kills``).

``.venv/bin/python benchmarks/bench_service.py [--json]``.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
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


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Service:
    def __init__(self, database: str, work: Path, tracking_uri: str | None = None) -> None:
        from _service_methods import method_options

        self.database, self.work = database, work
        self.tracking_uri = tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
        self.common = [
            "--database", database,
            "--tracking-uri", self.tracking_uri,
            "--artifact-uri", str(work / "models"),
            *method_options(),
        ]  # fmt: skip
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT / "tests"),
            "MLFLOW_LOGGING_LEVEL": "ERROR",
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.url = ""

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.work / f"proc-{len(self.procs)}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "tracker_core", *args, *self.common],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def api(self) -> None:
        from tracker_core.service.client import ServiceClient
        from tracker_core.testing import servers

        port = servers.free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.spawn("serve", "--no-worker", "--port", str(port))
        deadline = time.monotonic() + 120
        while True:
            try:
                ServiceClient(self.url).health()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def worker(self) -> subprocess.Popen[bytes]:
        """A worker process, once it has registered its Procrastinate workers."""
        proc = self.spawn("worker")
        log = self.work / f"proc-{len(self.procs) - 1}.log"
        deadline = time.monotonic() + 120
        while "task slot(s) on" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        return proc

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        import psycopg

        from tracker_core.service.settings import psycopg_url

        with psycopg.connect(psycopg_url(self.database), autocommit=True) as conn:
            try:
                return list(conn.execute(query, params).fetchall())  # type: ignore[arg-type]
            except psycopg.errors.UndefinedTable:
                return [(0,)]

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


def status_of(conn: Any, task_id: str) -> tuple[str, str | None]:
    row = conn.execute(
        "SELECT status, worker FROM tracker_core_tasks WHERE id = %s", (task_id,)
    ).fetchone()
    return row[0], row[1]


def wait_until(conn: Any, task_id: str, want: tuple[str, ...], timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while True:
        status, _ = status_of(conn, task_id)
        if status in want:
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task_id} still {status}")
        time.sleep(0.001)


def phase_post_to_processing(svc: Service, n: int) -> list[float]:
    import psycopg

    from tracker_core.service.client import ServiceClient
    from tracker_core.service.settings import psycopg_url

    client = ServiceClient(svc.url)
    out = []
    with psycopg.connect(psycopg_url(svc.database), autocommit=True) as conn:
        for i in range(n + 1):
            start = time.perf_counter()
            task = client.create("svc-fast", batch_id=f"lat-{i}")
            seen = wait_until(conn, task["id"], ("processing", "done", "error"))
            if i:  # the first one warms the worker's forkserver up
                out.append(seen - start)
            wait_until(conn, task["id"], ("done", "error", "canceled"))
    return out


def phase_api_load(svc: Service, clients: int, requests: int) -> dict[str, list[float]]:
    from tracker_core.service.client import ServiceClient

    client = ServiceClient(svc.url, timeout=120)
    times: dict[str, list[float]] = {"POST": [], "GET": [], "GET /health": []}
    ids: list[str] = []

    def timed(kind: str, fn: Any) -> Any:
        start = time.perf_counter()
        result = fn()
        times[kind].append(time.perf_counter() - start)
        return result

    def poster(c: int) -> None:
        for r in range(requests):
            batch = f"load-{c}-{r}"
            task = timed("POST", lambda b=batch: client.create("svc-fast", batch_id=b))
            ids.append(task["id"])

    def getter(_c: int) -> None:
        for _ in range(requests):
            task_id = random.choice(ids)
            timed("GET", lambda t=task_id: client.get(t))

    def health(_c: int) -> None:
        for _ in range(requests):
            timed("GET /health", client.health)

    for job in (poster, getter, health):
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(job, range(clients)))
    for task_id in ids:  # leave nothing for a worker
        client.cancel(task_id)
    return times


def phase_kill(svc: Service, kills: int) -> list[float]:
    import psycopg

    from tracker_core.service.client import ServiceClient
    from tracker_core.service.settings import psycopg_url

    client = ServiceClient(svc.url)
    workers = [svc.worker(), svc.worker()]
    out = []
    with psycopg.connect(psycopg_url(svc.database), autocommit=True) as conn:
        for i in range(kills):
            task = client.create("svc-long", batch_id=f"kill-{i}")
            wait_until(conn, task["id"], ("processing",))
            _, worker = status_of(conn, task["id"])
            assert worker is not None
            pid = int(worker.rsplit(":", 1)[1])
            (victim,) = [w for w in workers if w.pid == pid]
            time.sleep(1.0)  # let its first run start
            os.kill(pid, signal.SIGKILL)
            killed = time.perf_counter()
            victim.wait()
            while True:
                status, now = status_of(conn, task["id"])
                if status == "processing" and now != worker:
                    out.append(time.perf_counter() - killed)
                    break
                time.sleep(0.01)
            wait_until(conn, task["id"], ("done", "error"))
            workers.remove(victim)
            workers.append(svc.worker())
    return out


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20, help="phase 1 tasks (default 20)")
    parser.add_argument("--clients", type=int, default=50, help="phase 2 clients (default 50)")
    parser.add_argument("--requests", type=int, default=10, help="per client (default 10)")
    parser.add_argument("--kills", type=int, default=3, help="phase 3 kills (default 3)")
    args = parser.parse_args()
    quiet_logs()
    from _service_harness import premigrate

    from tracker_core.testing import servers

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        work = Path(tmp)
        with servers.postgres(work / "pg") as database:
            svc = Service(database, work)
            premigrate(f"sqlite:///{work / 'mlflow.db'}", str(work / "models"))
            try:
                svc.api()
                worker = svc.worker()
                latency = phase_post_to_processing(svc, args.tasks)
                rows.append(_row("POST -> processing (idle worker)", latency, None))
                svc.stop(worker)
                load = phase_api_load(svc, args.clients, args.requests)
                floor = statistics.median(load["GET /health"])
                for kind in ("GET /health", "POST", "GET"):
                    rows.append(_row(f"{kind} at {args.clients} clients", load[kind], floor))
                kills = phase_kill(svc, args.kills)
                rows.append(_row("kill -9 -> processing on another worker", kills, None))
            finally:
                svc.stop_all()
    emit(
        "Task service latencies",
        rows,
        ["measure", "n", "p50 ms", "p99 ms", "max ms", "p50 x /health"],
        args.json,
        {"settings": "shipped: heartbeat 5 s, stall 20 s, stall check 5 s, poll 2 s"},
    )


def _row(what: str, seconds: list[float], floor: float | None) -> dict[str, Any]:
    p50 = statistics.median(seconds)
    return {
        "measure": what,
        "n": len(seconds),
        "p50 ms": p50 * 1000,
        "p99 ms": pct(seconds, 0.99) * 1000,
        "max ms": max(seconds) * 1000,
        "p50 x /health": None if floor is None else p50 / floor,
    }


if __name__ == "__main__":
    main()
