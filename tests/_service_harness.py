"""Real processes for the task-service tests: ``tracker-core serve`` / ``worker`` subprocesses
on a private PostgreSQL, an API on a free loopback port, and helpers to watch them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import psutil
import psycopg
from _service_methods import method_options
from psycopg.rows import dict_row

from tracker_core.service.client import ServiceClient
from tracker_core.service.errors import ServiceUnavailableError
from tracker_core.service.settings import psycopg_url
from tracker_core.testing import servers
from tracker_core.testing.harness import fresh_sqlite_uri

TESTS_DIR = Path(__file__).parent
#: short timings so that dead workers are found in seconds (a live one beats every 0.5 s)
FAST_TIMINGS = [
    "--heartbeat-seconds", "0.5",
    "--stall-seconds", "3",
    "--stall-check-seconds", "1",
    "--poll-seconds", "0.5",
    "--cancel-grace-seconds", "10",
    "--shutdown-grace-seconds", "5",
    "--retry-wait-seconds", "1",
    "--lease-seconds", "3",
]  # fmt: skip
TERMINAL = ("done", "error", "canceled")
T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float, what: str, poll: float = 0.1) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def create_database(url: str, name: str) -> str:
    """A new empty database beside ``url``'s; its URL."""
    base = psycopg_url(url)
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return base.rsplit("/", 1)[0] + f"/{name}"


def premigrate(tracking_uri: str, artifact_uri: str) -> None:
    """Create MLflow's schema before the service starts, so no training process pays for it
    in a test. A SQLite database is a copy of one migrated once per test process."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        fresh_sqlite_uri(path.parent, path.name)
        return
    import tracker_core

    with tracker_core.connect(
        artifact_uri, tracking_uri=tracking_uri, main_metric="q", plugin_name="svc-setup"
    ) as manager:
        manager.get_experiments()


@attrs.define
class Stack:
    """A task database, the MLflow side, and the service processes started on them."""

    database: str
    work: Path
    tracking_uri: str
    artifact_uri: str
    url: str = ""
    procs: list[subprocess.Popen[bytes]] = attrs.field(factory=list)
    #: the API token of ``client`` (None: none sent)
    token: str | None = None
    #: more environment for the processes it starts
    extra_env: dict[str, str] = attrs.field(factory=dict)

    @property
    def client(self) -> ServiceClient:
        return ServiceClient(self.url, timeout=60, token=self.token)

    @property
    def train_log(self) -> Path:
        return self.work / "train.log"

    def env(self) -> dict[str, str]:
        path = [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in path if p),
            "TC_SERVICE_TRAIN_LOG": str(self.train_log),
            "TC_SERVICE_BARRIER_DIR": str(self.work / "barrier"),
            "MLFLOW_LOGGING_LEVEL": "ERROR",
            **self.extra_env,
        }

    def common(self) -> list[str]:
        return [
            "--tracking-uri", self.tracking_uri,
            "--artifact-uri", self.artifact_uri,
            *method_options(),
        ]  # fmt: skip

    def spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = self.work / f"{name}-{len(self.procs)}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tracker_core", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=self.work,
            )
        proc.log_path = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def start_api(self) -> subprocess.Popen[bytes]:
        port = servers.free_port()
        self.url = f"http://127.0.0.1:{port}"
        proc = self.spawn(
            ["serve", "--no-worker", "--database", self.database, "--port", str(port),
             *self.common()],
            "api",
        )  # fmt: skip
        self.wait_healthy(proc)
        return proc

    def wait_healthy(self, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the service exited ({proc.returncode}):\n{tail(proc)}")
            try:
                return self.client.health().get("status") == "ok"
            except ServiceUnavailableError:
                return False

        wait_for(healthy, timeout, "the API to answer /health", poll=0.2)

    def start_worker(self, *extra: str) -> subprocess.Popen[bytes]:
        return self.spawn(
            ["worker", "--database", self.database, *self.common(), *FAST_TIMINGS, *extra],
            "worker",
        )

    def wait_worker_ready(self, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
        """Until the worker process has registered its Procrastinate workers."""
        wait_for(
            lambda: (
                "task slot(s) on" in Path(proc.log_path).read_text()  # type: ignore[attr-defined]
                or (proc.poll() is not None and _raise(f"worker exited:\n{tail(proc)}"))
            ),
            timeout,
            "the worker to start",
            poll=0.2,
        )

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        return int(proc.returncode)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(psycopg_url(self.database), autocommit=True) as conn:
            return list(conn.execute(query, params).fetchall())  # type: ignore[arg-type]

    def count_tasks(self) -> int:
        return int(self.sql("SELECT count(*) FROM tracker_core_tasks")[0][0])

    def jobs_of(self, task_id: str) -> list[tuple[Any, ...]]:
        """``(id, status, attempts)`` of the task's Procrastinate jobs."""
        return self.sql(
            "SELECT id, status::text, attempts FROM procrastinate_jobs "
            "WHERE args->>'task_id' = %s ORDER BY id",
            task_id,
        )

    def wait_status(self, task_id: str, *statuses: str, timeout: float = 180) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            task = self.client.get(task_id)
            if task["status"] in statuses:
                return task
            if task["status"] in TERMINAL:
                raise AssertionError(f"task ended {task['status']}, not {statuses}: {task}")
            return None

        return wait_for(reached, timeout, f"task {task_id} to be {'/'.join(statuses)}", poll=0.2)

    def trained(self, method: str) -> list[tuple[str, str, int]]:
        """``(event, params id, pid)`` of every train call of ``method`` so far."""
        return [(event, p, pid) for event, p, pid, _ in self.train_events(method)]

    def train_events(self, method: str) -> list[tuple[str, str, int, float]]:
        """``(event, params id, pid, unix time)`` of every train call of ``method`` so far."""
        if not self.train_log.exists():
            return []
        out = []
        for line in self.train_log.read_text().splitlines():
            event, name, params_id, pid, at = line.split()
            if name == method:
                out.append((event, params_id, int(pid), float(at)))
        return out

    def run_rows(self, task_id: str) -> list[dict[str, Any]]:
        """The task's rows of the run table (parallel runs), in plan order."""
        with psycopg.connect(psycopg_url(self.database), autocommit=True) as conn:
            cur = conn.cursor(row_factory=dict_row)
            cur.execute(
                "SELECT * FROM tracker_core_runs WHERE task_id = %s ORDER BY position", (task_id,)
            )
            return list(cur.fetchall())

    def jobs_by_kind(self, task_id: str) -> dict[str, list[tuple[Any, ...]]]:
        """The task's Procrastinate jobs by kind (``task``, ``run``, ``complete``):
        ``(id, status, attempts)`` each."""
        kinds = {
            "tracker_core.run_task": "task",
            "tracker_core.run_params": "run",
            "tracker_core.complete_iteration": "complete",
        }
        out: dict[str, list[tuple[Any, ...]]] = {"task": [], "run": [], "complete": []}
        for job_id, name, status, attempts in self.sql(
            "SELECT id, task_name, status::text, attempts FROM procrastinate_jobs "
            "WHERE args->>'task_id' = %s ORDER BY id",
            task_id,
        ):
            out[kinds[name]].append((job_id, status, attempts))
        return out

    def job_started_at(self, job_id: int) -> list[Any]:
        """When the job started, each time it did (Procrastinate's events)."""
        return [
            row[0]
            for row in self.sql(
                "SELECT at FROM procrastinate_events WHERE job_id = %s AND type = 'started' "
                "ORDER BY at",
                job_id,
            )
        ]


def _raise(message: str) -> bool:
    raise AssertionError(message)


def tail(proc: subprocess.Popen[bytes], lines: int = 60) -> str:
    path = getattr(proc, "log_path", None)
    if path is None or not Path(path).exists():
        return "(no log)"
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


@contextlib.contextmanager
def stack_on(url: str, work: Path) -> Iterator[Stack]:
    work.mkdir(parents=True, exist_ok=True)
    stack = Stack(
        database=url,
        work=work,
        tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
        artifact_uri=str(work / "models"),
    )
    premigrate(stack.tracking_uri, stack.artifact_uri)
    try:
        yield stack
    finally:
        stack.stop_all()
