"""Parallel runs: one iteration's params sets trained at once by several workers.

Real processes, as in ``test_service``: ``tracker-core serve --no-worker`` and ``tracker-core
worker`` subprocesses (one slot each) on a private PostgreSQL, MLflow on SQLite, the sleeping
methods of ``_service_methods``; and ``tracker-core serve`` on its embedded PostgreSQL with a
second worker on the same data folder. The completion's "exactly once, never while a run is
unfinished" is also checked at the database level, where two run ends race for real. Nothing
is mocked; no wall-clock asserts (times are only compared with each other).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _service_harness import (
    Stack,
    alive,
    create_database,
    descendants,
    premigrate,
    stack_on,
    tail,
    wait_for,
)

import tracker_core
from tracker_core import leases
from tracker_core.testing import servers

pytestmark = pytest.mark.skipif(
    not servers.postgres_installed(),
    reason="PostgreSQL's server binaries (initdb, postgres) are not installed here",
)


#: the tests' fast timings, with a longer run lease: three workers training at once on one
#: SQLite file renew their leases under contention (a killed worker's run resumes 8 s later)
TIMINGS = ["--lease-seconds", "8", "--stall-seconds", "5"]


def start_fleet(stack: Stack, workers: int) -> list[Any]:
    procs = [stack.start_worker(*TIMINGS) for _ in range(workers)]
    stack.start_api()
    for w in procs:
        stack.wait_worker_ready(w)
    return procs


@pytest.fixture(scope="module")
def trio(pg: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A database of its own, an API and three workers with one slot each."""
    with stack_on(create_database(pg, "trio"), tmp_path_factory.mktemp("trio")) as s:
        start_fleet(s, 3)
        yield s


def mlflow_manager(stack: Stack, plugin: str) -> tracker_core.ExperimentsManager:
    return tracker_core.connect(
        stack.artifact_uri, tracking_uri=stack.tracking_uri, plugin_name=plugin,
        main_metric="quality",
    )  # fmt: skip


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals that share a moment."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    best = current = 0
    for _, step in edges:
        current += step
        best = max(best, current)
    return best


def run_intervals(manager: tracker_core.ExperimentsManager, experiment_id: str) -> list[Any]:
    """``(start_ms, end_ms)`` of every run of the iteration, as MLflow recorded them."""
    runs = manager.get_runs(experiment_id)
    assert all(r.end_time_ms is not None for r in runs)
    return [(r.start_time_ms, r.end_time_ms) for r in runs]


def lease_claims(run: Any) -> int:
    """How many workers claimed the run's lease (each training attempt claims one)."""
    return sum(1 for key in run.params if key.startswith(leases.LEASE_CLAIM_PREFIX))


# ---------------------------------------------------------------------- three workers, six runs
def test_three_workers_train_one_iterations_runs_at_once_and_complete_it_once(
    trio: Stack,
) -> None:
    first = trio.client.create("svc-par", batch_id="par-1")
    assert first["max_parallel_runs"] is None  # default: as many as there are free workers
    one = trio.wait_status(first["id"], "done")
    task = trio.client.create("svc-par", batch_id="par-2")
    seen = wait_for(
        lambda: (lambda p: p if p.get("running", 0) >= 2 else None)(
            trio.client.get(task["id"])["progress"] or {}
        ),
        120,
        "two runs of the second iteration to be running",
    )
    assert seen["planned"] == 6 and sum(seen[k] for k in ("queued", "running", "finished",
                                                          "failed")) == 6  # fmt: skip
    two = trio.wait_status(task["id"], "done")
    assert two["progress"] == {
        "planned": 6, "queued": 0, "running": 0, "finished": 6, "failed": 0, "pruned": 0,
    }  # fmt: skip
    result = two["result"]
    assert len(result["runs"]) == 6 and result["trained_runs"] == 6 and result["failed_runs"] == []
    assert result["start_run_id"] == one["result"]["best_run_id"]

    with mlflow_manager(trio, "svc-par") as manager:
        # the runs overlapped in time (MLflow's own start and end times), on several workers
        assert most_at_once(run_intervals(manager, result["experiment_id"])) >= 2
        rows = trio.run_rows(task["id"])
        assert [r["status"] for r in rows] == ["finished"] * 6
        assert len({r["worker"] for r in rows}) >= 2
        # exactly `keep` (1) model is left: the best run's
        marked = manager.get_runs(result["experiment_id"], marked_only=True)
        assert [r.run_id for r in marked] == [result["best_run_id"]]
        assert result["best_metric"] == 0.9
        assert manager.find_orphaned_models().orphans == ()
        # completion ran once, and deleted the previous iteration
        assert result["deleted_iteration_id"] == one["result"]["experiment_id"]
        previous = manager.get_experiment(one["result"]["experiment_id"])
        assert previous is not None and previous.lifecycle_stage == "deleted"
    for done in (one, two):
        jobs = trio.jobs_by_kind(done["id"])
        assert [(s, a) for _, s, a in jobs["task"]] == [("succeeded", 1)]
        assert [(s, a) for _, s, a in jobs["run"]] == [("succeeded", 1)] * 6
        assert [(s, a) for _, s, a in jobs["complete"]] == [("succeeded", 1)]
    # every params set of each iteration was trained once
    ends = Counter(p for event, p, _ in trio.trained("svc-par") if event == "end")
    starts = Counter(p for event, p, _ in trio.trained("svc-par") if event == "start")
    assert len(ends) == 6 and set(ends.values()) == {2} and starts == ends


def test_max_parallel_runs_caps_the_runs_out_at_once_and_1_runs_them_in_one_process(
    trio: Stack,
) -> None:
    capped = trio.client.create("svc-par", batch_id="cap-2", max_parallel_runs=2)
    assert capped["max_parallel_runs"] == 2
    one_by_one = trio.client.create("svc-capped", batch_id="cap-1")  # the method caps it at 1
    done = trio.wait_status(capped["id"], "done")
    with mlflow_manager(trio, "svc-par") as manager:
        assert most_at_once(run_intervals(manager, done["result"]["experiment_id"])) <= 2
    assert len(trio.jobs_by_kind(capped["id"])["run"]) == 6
    # a method capped at 1 behaves as before: one job trains every run in one process
    sequential = trio.wait_status(one_by_one["id"], "done")
    jobs = trio.jobs_by_kind(sequential["id"])
    assert [(s, a) for _, s, a in jobs["task"]] == [("succeeded", 1)]
    assert jobs["run"] == [] and jobs["complete"] == [] and trio.run_rows(sequential["id"]) == []
    assert len({pid for _, _, pid in trio.trained("svc-capped")}) == 1
    assert sequential["progress"] == {
        "planned": 3, "queued": 0, "running": 0, "finished": 3, "failed": 0, "pruned": 0,
    }  # fmt: skip


def test_max_parallel_runs_is_checked_and_part_of_the_idempotent_request(trio: Stack) -> None:
    from test_service import post

    before = trio.count_tasks()
    for bad in (0, -1, 10_001, "2", 1.5, True):
        status, answer = post(
            trio, {"fine_tuning_method": "svc-par", "batch_id": "x", "max_parallel_runs": bad}
        )
        assert status == 422 and "max_parallel_runs" in json.dumps(answer), (bad, answer)
    assert trio.count_tasks() == before
    body = {"fine_tuning_method": "svc-fail", "batch_id": "k-1", "idempotency_key": "par-k"}
    status, task = post(trio, {**body, "max_parallel_runs": 2})
    assert status == 201
    status, answer = post(trio, {**body, "max_parallel_runs": 3})
    assert status == 409 and "max_parallel_runs 3" in answer["detail"]
    trio.client.cancel(task["id"])


# ---------------------------------------------------------------------- some runs fail
def test_every_run_failing_ends_the_task_in_error_as_the_driver_does(trio: Stack) -> None:
    task = trio.client.create("svc-fail", batch_id="par-fail")
    ended = trio.wait_status(task["id"], "error")
    assert "IterationFailedError" in ended["error"] and "boom in svc-fail" in ended["error"]
    assert ended["progress"]["failed"] == 3 and ended["result"] is None
    assert [r["status"] for r in trio.run_rows(task["id"])] == ["failed"] * 3
    with mlflow_manager(trio, "svc-fail") as manager:  # the failed iteration was moved aside
        assert [e for e in manager.get_experiments() if e.name.endswith("/ par-fail")] == []


# ---------------------------------------------------------------------- completion, at the database
def test_runs_ending_at_the_same_instant_defer_exactly_one_completion(pg: str) -> None:
    """The ends of an iteration's last runs race in PostgreSQL (separate connections, started
    together, many times): the completion job is deferred once, by the last end, never
    while a run is still running; a job for a run that ended does nothing."""
    asyncio.run(_race_run_ends(create_database(pg, "race")))


async def _race_run_ends(database: str, rounds: int = 25, width: int = 3) -> None:
    from tracker_core.service.models import TaskStatus
    from tracker_core.service.queue import QueueJobs, build_app
    from tracker_core.service.repository import NewTask, PlannedRun, RunEnd, TaskRepository
    from tracker_core.service.schema import ensure_schema
    from tracker_core.service.settings import ServiceSettings

    app = build_app(ServiceSettings(database_url=database), database, max_pool=width + 4)
    async with app.open_async():
        await ensure_schema(app)
        repo, jobs = TaskRepository(app.connector.pool), QueueJobs(app)  # type: ignore[attr-defined]

        async def no_job(_conn: Any, _task: Any) -> int:
            return 0

        for n in range(rounds):
            new = NewTask(f"race-{n}", "m", f"b{n}", None, {}, None)
            task, _ = await repo.tasks.create(new, no_job)
            await repo.tasks.start(task.id, "setup", "w")
            plan = {"experiment_id": f"e{n}", "params": []}
            planned = [PlannedRun(f"p{i}") for i in range(width + 1)] + [
                PlannedRun("done-before", "FINISHED")
            ]
            fanned = await repo.runs.fan_out(task.id, "setup", plan, planned, None, jobs)
            assert fanned is not None and fanned.progress == {
                "planned": width + 2, "queued": width + 1, "running": 0, "finished": 1,
                "failed": 0, "pruned": 0,
            }  # fmt: skip
            rows = {r.params_id: r for r in await repo.runs.runs(task.id)}
            assert rows["done-before"].job_id is None  # no job for a run that had ended
            for i in range(width + 1):
                started = await repo.runs.start_run(task.id, f"p{i}", rows[f"p{i}"].job_id or 0,
                                               f"x{i}", "w", jobs)  # fmt: skip
                assert started is not None
            # a second start of a running run (another job) does nothing
            assert await repo.runs.start_run(task.id, "p0", -1, "other", "w", jobs) is None
            first, _ = await repo.runs.end_run(task.id, "p0", "x0", RunEnd("finished"), jobs)
            assert first is not None and first.completion_job_id is None
            # the last `width` runs end at once
            ends = await asyncio.gather(
                *(
                    repo.runs.end_run(task.id, f"p{i}", f"x{i}", RunEnd("finished"), jobs)
                    for i in range(1, width + 1)
                )
            )
            completion_ids = {t.completion_job_id for t, _ in ends if t is not None}
            completion_ids.discard(None)
            assert len(completion_ids) == 1, completion_ids
            deferred = app.connector.pool  # type: ignore[attr-defined]
            async with deferred.connection() as conn:
                cur = await conn.execute(
                    "SELECT count(*) FROM procrastinate_jobs WHERE task_name = %s "
                    "AND args->>'task_id' = %s",
                    ("tracker_core.complete_iteration", task.id),
                )
                row = await cur.fetchone()
            assert row is not None and row[0] == 1
            final = await repo.tasks.get(task.id)
            assert final is not None and final.status == TaskStatus.PROCESSING
            assert final.progress is not None and final.progress["finished"] == width + 2
            # a job for a run that already finished does nothing
            assert await repo.runs.start_run(task.id, "p1", -1, "late", "w", jobs) is None
            # the completion holds the task only once every run ended
            assert await repo.runs.start_completion(task.id, "c", "w", jobs) is not None


# ---------------------------------------------------------------------- completion, end to end
def test_completion_starts_after_both_runs_that_end_together(trio: Stack) -> None:
    task = trio.client.create("svc-barrier", batch_id="barrier-1")
    done = trio.wait_status(task["id"], "done")
    rows = trio.run_rows(task["id"])
    assert [r["status"] for r in rows] == ["finished", "finished"]
    (complete,) = trio.jobs_by_kind(task["id"])["complete"]
    (started,) = trio.job_started_at(complete[0])
    assert all(r["ended_at"] < started for r in rows)
    with mlflow_manager(trio, "svc-barrier") as manager:
        ends = [end for _, end in run_intervals(manager, done["result"]["experiment_id"])]
    assert max(ends) / 1000 < started.timestamp()
    # they did train at the same time, in two processes
    events = trio.train_events("svc-barrier")
    assert len({pid for _, _, pid, _ in events}) == 2
    arrived = [at for event, _, _, at in events if event == "arrive"]
    ends_at = [at for event, _, _, at in events if event == "end"]
    assert len(arrived) == len(ends_at) == 2 and max(arrived) < min(ends_at)


# ---------------------------------------------------------------------- cancel
def test_cancel_in_the_middle_starts_no_new_run_skips_completion_and_a_later_task_resumes(
    trio: Stack,
) -> None:
    # eight runs of 2 s on three workers: three train, five wait in the queue
    task = trio.client.create("svc-cpar", batch_id="cancel-par")

    def queued_job_waiting() -> bool:
        rows = trio.run_rows(task["id"])
        finished = sum(r["status"] == "finished" for r in rows)
        todo = trio.sql(
            "SELECT count(*) FROM procrastinate_jobs j JOIN tracker_core_runs r "
            "ON r.job_id = j.id WHERE r.task_id = %s AND j.status = 'todo'",
            task["id"],
        )[0][0]
        return finished >= 1 and todo >= 1

    wait_for(queued_job_waiting, 120, "a finished run and a run job waiting in the queue")
    asked = trio.client.cancel(task["id"])
    assert asked["status"] == "processing" and asked["cancel_requested"] is True
    ended = trio.wait_status(task["id"], "canceled")
    assert ended["result"] is None and ended["error"] is None
    requested_at = trio.sql(
        "SELECT cancel_requested_at FROM tracker_core_tasks WHERE id = %s", task["id"]
    )[0][0]
    rows = trio.run_rows(task["id"])
    # no run started after the cancel; the queued ones never started and their jobs are
    # canceled; no completion
    assert all(r["started_at"] < requested_at for r in rows if r["started_at"] is not None)
    never = [r for r in rows if r["attempts"] == 0]
    assert never and all(r["status"] == "queued" for r in never)
    statuses = dict(trio.sql(
        "SELECT id, status::text FROM procrastinate_jobs WHERE args->>'task_id' = %s", task["id"]
    ))  # fmt: skip
    assert any(statuses[r["job_id"]] == "cancelled" for r in never if r["job_id"] is not None)
    jobs = trio.jobs_by_kind(task["id"])
    assert jobs["complete"] == [] and ended["progress"]["running"] == 0
    # it shows no run queued: those its cancel left unstarted or stopped count as canceled
    left = sum(r["status"] == "queued" for r in rows)
    assert ended["progress"]["queued"] == 0 and ended["progress"]["canceled"] == left >= 1
    started = {p for event, p, _ in trio.trained("svc-cpar") if event == "start"}
    assert started == {r["params_id"] for r in rows if r["attempts"] > 0}
    with mlflow_manager(trio, "svc-cpar") as manager:
        (iteration,) = [e for e in manager.get_experiments() if e.name.endswith("/ cancel-par")]
        states = Counter(r.status.value for r in manager.get_runs(iteration.experiment_id))
    stopped = sum(1 for r in rows if r["attempts"] > 0 and r["status"] == "queued")
    assert states["RUNNING"] == stopped >= 1  # left as a crash leaves them: resumable
    assert states["FINISHED"] == sum(r["status"] == "finished" for r in rows) >= 1
    # a later task for the same batch resumes the iteration; finished runs are not trained
    again = trio.client.create("svc-cpar", batch_id="cancel-par")
    done = trio.wait_status(again["id"], "done")
    assert done["result"]["experiment_id"] == iteration.experiment_id
    assert done["result"]["resumed"] is True and len(done["result"]["runs"]) == 8
    assert done["result"]["trained_runs"] == 8 - states["FINISHED"]
    ends = Counter(p for event, p, _ in trio.trained("svc-cpar") if event == "end")
    assert len(ends) == 8 and set(ends.values()) == {1}


# ---------------------------------------------------------------------- kill -9
@pytest.fixture(scope="module")
def fleet(pg: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A database of its own, an API and three workers (one slot each), one to be killed."""
    with stack_on(create_database(pg, "pfleet"), tmp_path_factory.mktemp("pfleet")) as s:
        start_fleet(s, 3)
        yield s


def test_kill_9_of_a_worker_mid_run_another_worker_finishes_that_run(fleet: Stack) -> None:
    task = fleet.client.create("svc-kpar", batch_id="kill-par")

    def training() -> dict[str, Any] | None:
        started = {p for event, p, _ in fleet.trained("svc-kpar") if event == "start"}
        ended = {p for event, p, _ in fleet.trained("svc-kpar") if event == "end"}
        running = [
            r
            for r in fleet.run_rows(task["id"])
            if r["status"] == "running" and r["params_id"] in started - ended
        ]
        return running[0] if running else None

    victim_run = wait_for(training, 120, "a run to be training")
    pid = int(victim_run["worker"].rsplit(":", 1)[1])
    (victim,) = [p for p in fleet.procs if p.pid == pid]
    children = descendants(pid)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    wait_for(lambda: not alive(children), 30, "the dead worker's children to exit")

    done = fleet.wait_status(task["id"], "done", timeout=240)
    assert done["progress"]["finished"] == 4 and done["result"]["failed_runs"] == []
    rows = {r["params_id"]: r for r in fleet.run_rows(task["id"])}
    killed = rows[victim_run["params_id"]]
    assert killed["status"] == "finished" and killed["attempts"] == 2
    assert killed["worker"] != victim_run["worker"]  # finished by another worker
    events = fleet.trained("svc-kpar")
    starts = Counter(p for event, p, _ in events if event == "start")
    ends = Counter(p for event, p, _ in events if event == "end")
    assert starts[killed["params_id"]] == 2  # once killed, once completed
    assert ends == Counter(dict.fromkeys(rows, 1))  # every run ended training once
    assert all(starts[p] == 1 for p in rows if p != killed["params_id"])  # the others went on
    with mlflow_manager(fleet, "svc-kpar") as manager:
        runs = manager.get_runs(done["result"]["experiment_id"])
        assert sorted(r.run_name for r in runs) == sorted(rows)  # one MLflow run per params set
        assert all(r.status.value == "FINISHED" for r in runs)
        by_name = {r.run_name: r for r in runs}
        assert lease_claims(by_name[killed["params_id"]]) == 2  # trained at most twice
        assert all(
            lease_claims(r) == 1 for name, r in by_name.items() if name != killed["params_id"]
        )
        last_end = max(r.end_time_ms for r in runs if r.end_time_ms is not None)
    # completion ran once, after the killed run was finished by the other worker
    jobs = fleet.jobs_by_kind(task["id"])
    ((complete_id, status, attempts),) = jobs["complete"]
    assert (status, attempts) == ("succeeded", 1)
    (started,) = fleet.job_started_at(complete_id)
    assert last_end / 1000 < started.timestamp()
    assert sorted(a for _, _, a in jobs["run"]) == [1, 1, 1, 2]  # the killed run's job, retried


# ---------------------------------------------------------------------- the embedded layout
@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data folder outside pytest's tree (see test_service.data_dir)."""
    path = Path(tempfile.mkdtemp(prefix="tracker-core-par-"))
    try:
        yield path / "data"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_embedded_serve_and_a_second_worker_share_one_iterations_runs(
    tmp_path: Path, data_dir: Path
) -> None:
    from _service_methods import method_options

    data = data_dir
    premigrate(f"sqlite:///{data / 'mlflow.db'}", str(data / "models"))
    stack = Stack(database="", work=tmp_path, tracking_uri="", artifact_uri="")
    port = servers.free_port()
    stack.url = f"http://127.0.0.1:{port}"
    common = ["--data-dir", str(data), "--allow-root", *method_options(), "--poll-seconds", "0.5"]
    try:
        serve = stack.spawn(["serve", "--port", str(port), *common], "serve")
        stack.wait_healthy(serve)
        worker = stack.spawn(["worker", *common], "worker")  # joins the embedded database
        stack.wait_worker_ready(worker)
        task = stack.client.create("svc-par", batch_id="embedded-par")
        done = stack.wait_status(task["id"], "done")
        assert len(done["result"]["runs"]) == 6 and done["result"]["trained_runs"] == 6
        assert done["progress"]["finished"] == 6

        def runs_trained_by(proc: Any) -> int:
            text = Path(proc.log_path).read_text(errors="replace")
            return sum(1 for line in text.splitlines() if ": training, attempt 1" in line)

        # both processes trained runs of the one iteration
        assert runs_trained_by(serve) >= 1 and runs_trained_by(worker) >= 1, tail(worker)
        assert runs_trained_by(serve) + runs_trained_by(worker) == 6
        ends = Counter(p for event, p, _ in stack.trained("svc-par") if event == "end")
        assert len(ends) == 6 and set(ends.values()) == {1}
        assert stack.stop(worker) == 0 and stack.stop(serve) == 0
    finally:
        stack.stop_all()
