"""The task service rides out its database and its data folder: real ``serve``/``worker``
processes on a PostgreSQL cluster that the test stops and starts again (``kill``-free:
``servers.postgres_cluster``), and embedded ``serve`` processes whose data folder goes away.
Nothing is mocked; no wall-clock asserts (the outages are waited out, never timed)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from _service_harness import (
    FAST_TIMINGS,
    TERMINAL,
    Stack,
    alive,
    create_database,
    descendants,
    stack_on,
    tail,
)
from _service_harness import wait_for as _wait_for
from _service_methods import method_options

from tracker_core.testing import servers

pytestmark = pytest.mark.skipif(
    not servers.postgres_installed(),
    reason="PostgreSQL's server binaries (initdb, postgres) are not installed here",
)

API = "/api/v1/fine-tuning"


def wait_for(check: Callable[[], Any], what: str, timeout: float = 240) -> Any:
    return _wait_for(check, timeout, what, poll=0.2)


def request(url: str, method: str = "GET", body: Any = None) -> tuple[int, dict[str, str], Any]:
    """``(status, headers, decoded JSON)`` of one request, whatever the status."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, _lower(resp.headers), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, _lower(exc.headers), json.loads(exc.read() or b"null")


def _lower(headers: Any) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()}


def task_when_up(stack: Stack, task_id: str) -> dict[str, Any] | None:
    """The task, or None while the API answers 503."""
    status, _, body = request(f"{stack.url}{API}/task/{task_id}")
    assert status in (200, 503), (status, body)
    return body if status == 200 else None


def wait_ended(stack: Stack, task_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        task = task_when_up(stack, task_id)
        return task if task is not None and task["status"] in TERMINAL else None

    task: dict[str, Any] = wait_for(ended, f"task {task_id} to end")
    return task


def assert_unavailable(stack: Stack, create: dict[str, Any]) -> None:
    """Every route that needs the database answers 503 with Retry-After (``create``: the
    body of a POST)."""
    for method, path, body in [
        ("GET", "/health", None),
        ("GET", f"{API}/task", None),
        ("POST", f"{API}/task", create),
    ]:
        status, headers, answer = request(stack.url + path, method, body)
        assert status == 503, (method, path, status, answer)
        assert int(headers["retry-after"]) >= 1 and "does not answer" in answer["detail"]


def started_runs(stack: Stack, since: int) -> list[tuple[str, str, int, float]]:
    return stack.train_events("svc-outage")[since:]


def outage_round(
    stack: Stack,
    cluster: servers.PostgresCluster,
    batch: str,
    *,
    seconds: float,
    mode: str,
    during: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """A two-run task whose runs train on the two workers while the database is stopped for
    ``seconds`` (and until both runs ended: their ends are written once it is back).
    ``during`` runs once the database is stopped."""
    since = len(stack.train_events("svc-outage"))
    task = stack.client.create("svc-outage", batch_id=batch)
    wait_for(
        lambda: len([e for e in started_runs(stack, since) if e[0] == "start"]) == 2,
        "both runs to train",
    )
    cluster.stop(mode)
    stopped = time.monotonic()
    key = f"{batch}-during"
    create = {"fine_tuning_method": "svc-fast", "idempotency_key": key, "max_parallel_runs": 1}
    assert_unavailable(stack, create)
    during()
    wait_for(
        lambda: len([e for e in started_runs(stack, since) if e[0] == "end"]) == 2,
        "both runs to end during the outage",
    )
    time.sleep(max(0.0, seconds - (time.monotonic() - stopped)))
    restarted_at = time.time()
    cluster.start()
    # the POST refused during the outage did not land; repeated, it creates the task
    wait_for(lambda: request(stack.url + "/health")[0] == 200, "the API to recover")
    assert stack.sql("SELECT count(*) FROM tracker_core_tasks WHERE idempotency_key = %s", key) == [
        (0,)
    ]
    status, _, later = request(f"{stack.url}{API}/task", "POST", create)
    assert status == 201, later
    done = wait_ended(stack, task["id"])
    assert done["status"] == "done" and done["attempts"] == 1, done
    assert done["progress"] == {
        "planned": 2, "queued": 0, "running": 0, "finished": 2, "failed": 0, "pruned": 0,
    }  # fmt: skip
    events = started_runs(stack, since)
    # each run trained once, by one child kept alive through the outage, and ended in it
    starts = Counter(p for event, p, _, _ in events if event == "start")
    assert len(starts) == 2 and set(starts.values()) == {1}, events
    pids = {p: {pid for _, q, pid, _ in events if q == p} for p in starts}
    assert all(len(v) == 1 for v in pids.values()), events
    assert all(at < restarted_at for event, _, _, at in events if event == "end"), events
    assert [s for _, s, _ in stack.jobs_of(task["id"])] == ["succeeded"] * 4
    assert wait_ended(stack, later["id"])["status"] == "done"
    return done


def test_a_distributed_setup_rides_out_a_10_s_and_a_60_s_database_outage(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """An API and two workers on a PostgreSQL stopped twice while a task's two runs train
    (the second time as a crash): the runs go on, their ends are written when it is back,
    the task ends done, nothing is trained twice, no process exits. A worker and an API with
    a 5 s ``--database-outage-seconds`` (on another database of the same server, so that
    they take none of these jobs) give up in the first outage, with one line each."""
    work = tmp_path_factory.mktemp("outage")
    with (
        servers.postgres_cluster(work / "pg", durable=True) as cluster,
        stack_on(cluster.url, work / "svc") as stack,
    ):
        workers = [stack.start_worker(), stack.start_worker()]
        api = stack.start_api()
        budget = ["--database-outage-seconds", "5"]
        elsewhere = create_database(cluster.url, "short")
        port = servers.free_port()
        short = [
            stack.spawn(
                ["worker", "--database", elsewhere, *stack.common(), *FAST_TIMINGS, *budget],
                "worker-short",
            ),
            stack.spawn(
                ["serve", "--no-worker", "--database", elsewhere, "--port", str(port),
                 *stack.common(), *budget],
                "api-short",
            ),
        ]  # fmt: skip
        for worker in [*workers, short[0]]:
            stack.wait_worker_ready(worker)
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}"), "the second API to answer")

        def short_ones_give_up() -> None:
            for proc in short:
                assert proc.wait(timeout=120) == 1, tail(proc)
                log = Path(proc.log_path).read_text()  # type: ignore[attr-defined]
                (line,) = [x for x in log.splitlines() if x.startswith("tracker-core: error")]
                assert "the task database did not answer for" in line, line
                assert "(--database-outage-seconds 5)" in line and "Traceback" not in log, log

        outage_round(stack, cluster, "out-10", seconds=10, mode="fast", during=short_ones_give_up)
        outage_round(stack, cluster, "out-60", seconds=60, mode="immediate")
        assert [p.poll() for p in [*workers, api]] == [None, None, None], [
            tail(p) for p in [*workers, api]
        ]


def _answers(url: str) -> bool:
    try:
        return request(url + "/health")[0] == 200
    except (urllib.error.URLError, OSError):
        return False


# ---------------------------------------------------------------------- the embedded layout
@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data folder outside pytest's tree (as root, the embedded PostgreSQL runs as another
    account that must reach it)."""
    path = Path(tempfile.mkdtemp(prefix="tracker-core-outage-"))
    try:
        yield path / "data"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def processes_on(data: Path) -> list[psutil.Process]:
    """Processes whose command line names the data folder (its PostgreSQL)."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(data) in part for part in proc.info["cmdline"] or ()):
                out.append(proc)
        except psutil.Error:
            continue
    return alive(out)


def test_whatever_ends_an_embedded_serve_stops_its_postgres(tmp_path: Path, data_dir: Path) -> None:
    """An API that cannot start, SIGTERM, and the data folder removed under a running
    ``serve`` (which once left its PostgreSQL running) each end serve, with one line saying
    why, and leave no process behind."""
    stack = Stack(database="", work=tmp_path, tracking_uri="", artifact_uri="")

    def serve(port: int) -> subprocess.Popen[bytes]:
        args = ["serve", "--data-dir", str(data_dir), "--port", str(port), "--allow-root"]
        return stack.spawn([*args, *method_options(), *FAST_TIMINGS], "serve")

    def ended(proc: subprocess.Popen[bytes], family: list[psutil.Process]) -> int:
        code = proc.wait(timeout=120)
        wait_for(lambda: not alive(family) and not processes_on(data_dir), "no process left", 60)
        return code

    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            proc = serve(taken.getsockname()[1])
            assert ended(proc, []) == 1
        assert "could not start" in tail(proc, 1), tail(proc)

        port = servers.free_port()
        stack.url = f"http://127.0.0.1:{port}"
        proc = serve(port)
        stack.wait_healthy(proc)
        family = [*descendants(proc.pid), *processes_on(data_dir)]
        proc.send_signal(signal.SIGTERM)
        assert ended(proc, family) == 0, tail(proc)

        proc = serve(port)
        stack.wait_healthy(proc)
        family = [*descendants(proc.pid), *processes_on(data_dir)]
        assert processes_on(data_dir), "the embedded PostgreSQL runs"
        while data_dir.exists():  # the service may remove files meanwhile, as it stops
            shutil.rmtree(data_dir, ignore_errors=True)
        assert ended(proc, family) == 1, tail(proc)
        assert f"the data folder {data_dir} was removed" in tail(proc, 1), tail(proc)
    finally:
        stack.stop_all()
