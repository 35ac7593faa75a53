"""The task service end to end: ``tracker-core serve --no-worker`` (uvicorn on a loopback
port) and ``tracker-core worker`` subprocesses on a private PostgreSQL, MLflow on SQLite, the
fast methods of ``_service_methods``. Nothing is mocked; no wall-clock asserts."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import select
import shutil
import signal
import socket
import tempfile
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
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
from _service_methods import SearchParams

import tracker_core
from tracker_core.cli import main
from tracker_core.testing import servers

pytestmark = pytest.mark.skipif(
    not servers.postgres_installed(),
    reason="PostgreSQL's server binaries (initdb, postgres) are not installed here",
)

API = "/api/v1/fine-tuning"


@pytest.fixture(scope="module")
def stack(pg: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API and one worker with two task slots."""
    with stack_on(pg, tmp_path_factory.mktemp("svc")) as s:
        worker = s.start_worker("--concurrency", "2")
        s.start_api()
        s.wait_worker_ready(worker)
        yield s


@pytest.fixture(scope="module")
def done_task(stack: Stack) -> dict[str, Any]:
    """A svc-fast task run to ``done``; what POST answered is under ``"created"``."""
    created = stack.client.create("svc-fast", batch_id="life-1", metadata={"who": "test"})
    done = stack.wait_status(created["id"], "done")
    return {**done, "created": created}


def raw(stack: Stack, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    """One request with a raw body: ``(status, decoded JSON)``."""
    req = urllib.request.Request(
        stack.url + path, data=body, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def post(stack: Stack, body: dict[str, Any]) -> tuple[int, Any]:
    return raw(stack, "POST", f"{API}/task", json.dumps(body).encode())


def mlflow_manager(stack: Stack, plugin: str) -> tracker_core.ExperimentsManager:
    return tracker_core.connect(
        stack.artifact_uri, tracking_uri=stack.tracking_uri, plugin_name=plugin,
        main_metric="quality",
    )  # fmt: skip


# ---------------------------------------------------------------------- lifecycle
def test_task_runs_to_done_and_its_result_matches_mlflow(
    stack: Stack, done_task: dict[str, Any], tmp_path: Path
) -> None:
    created = done_task["created"]
    assert created["status"] == "pending" and created["batch_id"] == "life-1"
    assert created["metadata"] == {"who": "test"} and created["result"] is None
    assert done_task["status"] == "done" and done_task["error"] is None
    assert done_task["updated_at"] > created["updated_at"] == created["created_at"]
    assert done_task["created_at"].endswith("Z") and done_task["attempts"] == 1
    assert done_task["progress"] == {
        "planned": 3, "queued": 0, "running": 0, "finished": 3, "failed": 0, "pruned": 0,
    }  # fmt: skip
    result = done_task["result"]
    with mlflow_manager(stack, "svc-fast") as manager:
        experiment = manager.get_experiment(result["experiment_id"])
        assert experiment is not None and experiment.name == result["iteration"]
        runs = manager.get_runs(result["experiment_id"])
        assert sorted(r.status.value for r in runs) == ["FINISHED"] * 3
        best = manager.get_best_model_run(result["experiment_id"])
        assert best is not None and best.run_id == result["best_run_id"]
        assert best.metrics["quality"] == result["best_metric"] == 0.9
        files = manager.download_model_files(best.run_id, tmp_path / "model", progress=None)
        assert any(files.rglob("*"))
    assert result["best_model_uri"].endswith(f"/{best.run_id}/artifacts/model")
    # its jobs are done too, after one attempt each: its own (the plan), one per run (the
    # worker has two slots, so by default the runs are separate jobs), the completion
    assert [(status, attempts) for _, status, attempts in stack.jobs_of(done_task["id"])] == [
        ("succeeded", 1)
    ] * 5


def test_every_run_failing_ends_the_task_in_error(stack: Stack) -> None:
    task = stack.client.create("svc-fail", batch_id="fail-1")
    ended = stack.wait_status(task["id"], "error")
    assert "IterationFailedError" in ended["error"] and "boom in svc-fail" in ended["error"]
    assert ended["result"] is None and ended["progress"]["failed"] == 3


def test_without_batch_id_the_method_hook_or_a_generated_id_is_used(stack: Stack) -> None:
    hooked = stack.client.create("svc-batched")
    assert hooked["batch_id"] == "batch-from-the-method"
    generated = [stack.client.create("svc-fail") for _ in range(2)]
    assert generated[0]["batch_id"] != generated[1]["batch_id"]
    assert all(len(t["batch_id"]) == 24 and int(t["batch_id"], 16) >= 0 for t in generated)
    for task in (hooked, *generated):  # no need to train them
        stack.client.cancel(task["id"])


# ---------------------------------------------------------------------- idempotency
def test_concurrent_posts_with_one_key_create_one_task_and_one_job(stack: Stack) -> None:
    body = {"fine_tuning_method": "svc-fast", "batch_id": "idem-1", "idempotency_key": "k-50"}
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda _: post(stack, body), range(50)))
    statuses = Counter(status for status, _ in answers)
    assert statuses == {201: 1, 200: 49}, statuses
    ids = {task["id"] for _, task in answers}
    assert len(ids) == 1
    (task_id,) = ids
    assert stack.sql("SELECT count(*) FROM tracker_core_tasks WHERE idempotency_key = 'k-50'") == [
        (1,)
    ]
    assert len(stack.jobs_of(task_id)) == 1
    stack.client.cancel(task_id)


def test_same_key_with_another_body_is_a_conflict_naming_the_difference(stack: Stack) -> None:
    first = {"fine_tuning_method": "svc-fail", "batch_id": "conf-1", "idempotency_key": "k-409"}
    status, task = post(stack, first)
    assert status == 201
    before = stack.count_tasks()
    status, answer = post(stack, {**first, "batch_id": "conf-2"})
    assert status == 409 and "batch_id" in answer["detail"] and "conf-2" in answer["detail"]
    assert answer["task_id"] == task["id"]
    status, answer = post(stack, {**first, "metadata": {"x": 1}})
    assert status == 409 and "metadata" in answer["detail"]
    status, again = post(stack, first)
    assert status == 200 and again["id"] == task["id"]
    assert stack.count_tasks() == before
    stack.client.cancel(task["id"])


# ---------------------------------------------------------------------- bad input
def test_bad_input_gets_a_clear_4xx_and_writes_nothing(
    stack: Stack, done_task: dict[str, Any]
) -> None:
    before = stack.count_tasks()
    # the task queue's jobs (the maintenance queue gets a periodic job every second)
    count_jobs = "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = 'tracker-core-tasks'"
    jobs_before = stack.sql(count_jobs)
    ok = {"fine_tuning_method": "svc-fast", "batch_id": "bad-1"}
    cases: list[tuple[bytes, int, str]] = [
        (b'{"fine_tuning_method": "svc-fast",', 400, "not valid JSON"),
        (b"[1, 2]", 422, "dictionary"),
        (json.dumps({**ok, "batch_id": 7}).encode(), 422, "batch_id"),
        (json.dumps({**ok, "metadata": [1]}).encode(), 422, "metadata"),
        (json.dumps({**ok, "metadata": "x"}).encode(), 422, "metadata"),
        (json.dumps({**ok, "idempotency_key": 5}).encode(), 422, "idempotency_key"),
        (json.dumps({"batch_id": "b"}).encode(), 422, "fine_tuning_method"),
        (json.dumps({**ok, "colour": "red"}).encode(), 422, "colour"),
        (json.dumps({**ok, "fine_tuning_method": "nope"}).encode(), 422, "svc-fast"),
        (json.dumps({**ok, "batch_id": "a/b"}).encode(), 422, "batch_id"),
        (json.dumps({**ok, "batch_id": ".."}).encode(), 422, "batch_id"),
        (json.dumps({**ok, "batch_id": ""}).encode(), 422, "batch_id"),
        (json.dumps({**ok, "batch_id": " padded"}).encode(), 422, "batch_id"),
        (json.dumps({**ok, "batch_id": "x" * 129}).encode(), 422, "128"),
        (json.dumps({**ok, "metadata": {"blob": "x" * 65536}}).encode(), 422, "65536"),
        (b'{"fine_tuning_method": "' + b"x" * (1024 * 1024) + b'"}', 413, "limit"),
    ]
    for body, expected, needle in cases:
        status, answer = raw(stack, "POST", f"{API}/task", body)
        assert status == expected, (body[:80], status, answer)
        assert needle in json.dumps(answer), (body[:80], answer)
    # the unknown-method answer lists what is installed
    _, answer = post(stack, {**ok, "fine_tuning_method": "nope"})
    assert "svc-kill" in answer["detail"] and "installed" in answer["detail"]
    assert raw(stack, "GET", f"{API}/task/0000")[0] == 404
    assert raw(stack, "POST", f"{API}/task/0000/cancel")[0] == 404
    assert raw(stack, "GET", f"{API}/task?status=sleeping")[0] == 422
    assert raw(stack, "GET", f"{API}/task?limit=0")[0] == 422
    status, answer = raw(stack, "POST", f"{API}/task/{done_task['id']}/cancel")
    assert status == 409 and "already ended (done)" in answer["detail"]
    assert stack.count_tasks() == before
    assert stack.sql(count_jobs) == jobs_before
    assert stack.client.get(done_task["id"])["status"] == "done"


def _api_log(stack: Stack) -> Path:
    (api,) = [p for p in stack.procs if "serve" in p.args]  # type: ignore[operator]
    return Path(api.log_path)  # type: ignore[attr-defined]


def test_input_the_database_cannot_take_is_a_4xx_naming_the_field_and_the_rule(
    stack: Stack, done_task: dict[str, Any]
) -> None:
    """Text with NUL or a lone surrogate, NaN, deep nesting, huge integers, and NUL in the
    URL once reached psycopg or the JSON parser: a bare 500 and a traceback, or "There was an
    error parsing the body". Each is a 4xx naming the field and the rule, writes nothing, and
    logs one line."""
    before = stack.count_tasks()
    count_jobs = "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = 'tracker-core-tasks'"
    jobs_before = stack.sql(count_jobs)
    task = f"{API}/task"
    ok = b'"fine_tuning_method": "svc-fast", "batch_id": "rules-1"'

    def body(extra: bytes) -> bytes:
        return b"{" + ok + b", " + extra + b"}"

    deep = b'"metadata": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1000
    cases: list[tuple[str, str, bytes | None, int, str, str]] = [
        ("POST", task, body(b'"metadata": {"a\\u0000": 1}'), 422, "metadata.a\\u0000", "NUL"),
        ("POST", task, body(b'"metadata": {"a": "x\\u0000"}'), 422, "metadata.a", "NUL"),
        ("POST", task, body(b'"idempotency_key": "k\\u0000"'), 422, "idempotency_key", "NUL"),
        ("POST", task, body(b'"metadata": {"a": ["\\ud800"]}'), 422, "metadata.a[0]", "surrogate"),
        ("POST", task, body(b'"idempotency_key": "\\udfff"'), 422, "idempotency_key", "surrogate"),
        ("POST", task, body(b'"metadata": {"a": NaN}'), 400, "metadata.a", "NaN"),
        ("POST", task, body(b'"metadata": {"a": -Infinity}'), 400, "metadata.a", "Infinity"),
        ("POST", task, body(b'"metadata": {"a": 1e999}'), 422, "metadata.a", "out of range"),
        ("POST", task, body(deep), 422, "metadata", "nested deeper than 32 levels"),
        ("POST", task, body(b'"metadata": {"a": ' + b"9" * 5000 + b"}"), 422, "metadata.a",
         "5000 digits; the limit is 64"),
        ("POST", task, b"{\xff}", 400, "body", "UTF-8"),
        ("GET", f"{task}/ab%00c", None, 422, "path parameter task_id", "control characters"),
        ("POST", f"{task}/ab%00c/cancel", None, 422, "path parameter task_id", "control"),
        ("GET", f"{task}?fine_tuning_method=a%00b", None, 422,
         "query parameter fine_tuning_method", "control characters"),
        ("GET", f"{task}?status=done&limit=5%0A", None, 422, "query parameter limit", "control"),
        ("GET", f"{task}?offset=99999999999999999999", None, 422, "query.offset",
         "less than or equal to 9223372036854775807"),
    ]  # fmt: skip
    log = _api_log(stack)
    logged = len(log.read_text().splitlines())
    for method, path, data, expected, field, rule in cases:
        status, answer = raw(stack, method, path, data)
        assert status == expected, (method, path, (data or b"")[:80], status, answer)
        assert answer["field"] == field and rule in answer["rule"], (path, answer)
        assert answer["detail"] == f"{answer['field']}: {answer['rule']}"
    assert stack.count_tasks() == before
    assert stack.sql(count_jobs) == jobs_before
    lines = log.read_text().splitlines()[logged:]
    refused = [line for line in lines if ": refused " in line]
    assert len(refused) == len(cases) and not any("Traceback" in line for line in lines), lines
    # a task's JSON still round-trips what the rules let through
    status, fine = post(stack, {**json.loads(b"{" + ok + b"}"), "metadata": {"t": "a\tb\u00e9"}})
    assert status == 201 and fine["metadata"] == {"t": "a\tb\u00e9"}
    stack.client.cancel(fine["id"])


def _send_chunked(url: str, path: str, total: int) -> tuple[int, Any]:
    """POST ``total`` bytes of chunked body (never held in memory) until the server answers;
    ``(status, decoded JSON)`` of its answer."""
    host, port = url.removeprefix("http://").split(":")
    chunk = b"x" * 65536
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < total and not select.select([sock], [], [], 0)[0]:
                sock.sendall(frame)
                sent += len(chunk)
            sock.sendall(b"0\r\n\r\n")
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                answer += data
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert sent < total, "the server read the whole body"
    return int(head.split()[1]), json.loads(payload)


def test_a_body_over_the_limit_is_refused_while_it_streams_whatever_its_framing(
    stack: Stack,
) -> None:
    """The 1 MiB limit once read only Content-Length: a 200 MiB chunked body was read and
    parsed whole (the API's memory grew by 800 MiB)."""
    (api,) = [p for p in stack.procs if "serve" in p.args]  # type: ignore[operator]
    before = stack.count_tasks()
    rss = psutil.Process(api.pid).memory_info().rss
    status, answer = _send_chunked(stack.url, f"{API}/task", 200 * 1024 * 1024)
    assert status == 413 and answer["field"] == "body", answer
    assert "the limit is 1048576" in answer["rule"]
    grown = psutil.Process(api.pid).memory_info().rss - rss
    assert grown < 64 * 1024 * 1024, f"the API grew by {grown >> 20} MiB"
    # a client that sends a whole (moderately) oversized body still reads its 413
    for _ in range(3):
        status, answer = raw(stack, "POST", f"{API}/task", b" " * (3 * 1024 * 1024))
        assert status == 413 and answer["rule"] == "is 3145728 bytes; the limit is 1048576"
    assert stack.count_tasks() == before
    assert stack.client.health()["status"] == "ok"


def test_methods_health_list_and_openapi(stack: Stack, done_task: dict[str, Any]) -> None:
    methods = {m["name"]: m for m in stack.client.methods()}
    assert methods["svc-fast"]["main_metric"] == "quality"
    assert methods["svc-fast"]["direction"] == "maximize" and methods["svc-fast"]["error"] is None
    assert stack.client.health() == {"status": "ok", "database": "ok"}
    page = stack.client.list(status="done", method="svc-fast", limit=1)
    assert page["limit"] == 1 and page["total"] >= 1 and len(page["tasks"]) == 1
    everything = stack.client.list(limit=500)["tasks"]
    stamps = [(t["created_at"], t["id"]) for t in everything]
    assert stamps == sorted(stamps, reverse=True)  # newest first
    status, spec = raw(stack, "GET", "/openapi.json")
    assert status == 200 and f"{API}/task/{{task_id}}/cancel" in spec["paths"]


# ---------------------------------------------------------------------- the search (issue 19)
def test_a_task_searches_prunes_and_counts_its_pruned_run(stack: Stack) -> None:
    methods = {m["name"]: m for m in stack.client.methods()}
    assert methods["svc-fast"]["search_space"] is None and methods["svc-fast"]["search"] is None
    searched = methods["svc-search"]
    assert searched["proposal"] == "top_n" and searched["error"] is None
    assert searched["search_space"] == {
        "x": {"name": "FloatDistribution", "attributes": {"log": False, "step": None,
                                                          "low": 0.0, "high": 1.0}},
    }  # fmt: skip
    assert searched["search"] == {
        "max_runs": 8, "sampler": "TPESampler", "pruner": "MedianPruner",
        "intermediate_metric": "quality",
    }  # fmt: skip

    # refused up front, naming the field and the rule; nothing is written
    before = stack.count_tasks()
    status, body = post(stack, {"fine_tuning_method": "svc-fast", "proposal": "search"})
    assert status == 422 and body["field"] == "proposal" and "search space" in body["rule"]
    status, body = post(stack, {"fine_tuning_method": "svc-search", "proposal": "grid"})
    assert status == 422 and body["field"] == "proposal"
    status, body = post(stack, {"fine_tuning_method": "svc-search", "max_runs": 0})
    assert status == 422 and body["field"] == "max_runs"
    assert stack.count_tasks() == before

    # the first iteration's runs are its three initial sets, as parallel run jobs; the weak
    # one is pruned from the others' values in the tracking store
    created = stack.client.create("svc-search", batch_id="s1", proposal="search", max_runs=3)
    assert created["proposal"] == "search" and created["max_runs"] == 3
    done = stack.wait_status(created["id"], "done")
    assert done["progress"] == {
        "planned": 3, "queued": 0, "running": 0, "finished": 2, "failed": 0, "pruned": 1,
    }  # fmt: skip
    (pruned,) = done["result"]["pruned_runs"]
    assert pruned["params"] == {"x": 0.0} and done["result"]["failed_runs"] == []
    assert done["result"]["best_metric"] == 1.0 and len(done["result"]["runs"]) == 3
    with mlflow_manager(stack, "svc-search") as manager:
        run = manager.get_run_by_id(pruned["run_id"])
        assert run is not None and run.status.value == "KILLED"
        assert run.tags["tracker.pruned"] == "true"

    # the next batch, one run after another: the incumbent and two sets the sampler proposes
    # from the first batch; the same key and body is the same task, another budget a conflict
    body = {"fine_tuning_method": "svc-search", "batch_id": "s2", "proposal": "search",
            "max_runs": 3, "max_parallel_runs": 1, "idempotency_key": "search-s2"}  # fmt: skip
    status, task = post(stack, body)
    assert status == 201
    status, again = post(stack, body)
    assert status == 200 and again["id"] == task["id"]
    status, conflict = post(stack, {**body, "max_runs": 4})
    assert status == 409 and "max_runs 4 (the task has 3)" in conflict["detail"]
    second = stack.wait_status(task["id"], "done")
    assert second["progress"]["planned"] == 3 and second["progress"]["queued"] == 0
    with mlflow_manager(stack, "svc-search") as manager:
        runs = manager.get_runs(second["result"]["experiment_id"])
        xs = sorted(SearchParams.from_mlflow(r.params).x for r in runs)
    assert len(xs) == 3 and 0.7 in xs and len(set(xs) - {0.7, 0.6, 0.0}) == 2


# ---------------------------------------------------------------------- one iteration at a time
def test_same_batch_waits_for_the_running_task_and_a_pending_cancel_never_starts(
    stack: Stack,
) -> None:
    first = stack.client.create("svc-lock", batch_id="lock-1")
    stack.wait_status(first["id"], "processing")
    second = stack.client.create("svc-lock", batch_id="lock-1")
    doomed = stack.client.create("svc-lock", batch_id="lock-1")
    canceled = stack.client.cancel(doomed["id"])
    assert canceled["status"] == "canceled" and canceled["updated_at"] > doomed["updated_at"]
    # the worker has a free slot, but the iteration's lock keeps the second one waiting
    assert stack.client.get(second["id"])["status"] == "pending"
    one = stack.wait_status(first["id"], "done")
    two = stack.wait_status(second["id"], "done")
    assert two["result"]["best_run_id"] == one["result"]["best_run_id"]
    assert two["result"]["experiment_id"] == one["result"]["experiment_id"]
    assert two["result"]["trained_runs"] == 0 and two["result"]["resumed"] is True
    # every run was trained once, by the first task
    starts = Counter(p for event, p, _ in stack.trained("svc-lock") if event == "start")
    assert len(starts) == 3 and set(starts.values()) == {1}
    gone = stack.client.get(doomed["id"])
    assert gone["status"] == "canceled" and gone["attempts"] == 0 and gone["worker"] is None
    assert [status for _, status, _ in stack.jobs_of(doomed["id"])] == ["cancelled"]


def test_cancel_processing_stops_at_a_safe_point_and_a_later_task_resumes(stack: Stack) -> None:
    # one run at a time, in the task's own job (parallel runs: test_parallel)
    task = stack.client.create("svc-cancel", batch_id="cancel-1", max_parallel_runs=1)
    stack.wait_status(task["id"], "processing")
    wait_for(
        lambda: (stack.client.get(task["id"])["progress"] or {}).get("finished", 0) >= 1,
        120,
        "the first run to finish",
    )
    asked = stack.client.cancel(task["id"])
    assert asked["status"] == "processing" and asked["cancel_requested"] is True
    ended = stack.wait_status(task["id"], "canceled")
    assert ended["error"] is None and ended["result"] is None
    with mlflow_manager(stack, "svc-cancel") as manager:
        (iteration,) = [e for e in manager.get_experiments() if e.name.endswith("/ cancel-1")]
        states = Counter(r.status.value for r in manager.get_runs(iteration.experiment_id))
    assert states["RUNNING"] == 1 and states["FINISHED"] >= 1  # left as a crash leaves it
    # a later task for the same batch resumes, its runs in parallel: finished runs are not
    # trained again
    again = stack.client.create("svc-cancel", batch_id="cancel-1")
    done = stack.wait_status(again["id"], "done")
    assert done["result"]["resumed"] is True
    assert done["result"]["experiment_id"] == iteration.experiment_id
    ends = Counter(p for event, p, _ in stack.trained("svc-cancel") if event == "end")
    assert len(ends) == 3 and set(ends.values()) == {1}
    assert done["result"]["trained_runs"] == 3 - states["FINISHED"]


# ---------------------------------------------------------------------- the command line
def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_against_the_live_api(stack: Stack, done_task: dict[str, Any]) -> None:
    url = ["--url", stack.url]
    create = ["task", "create", "svc-fail", "--batch-id", "cli-1", "--metadata", '{"a": 1}']
    create += ["--idempotency-key", "cli-k", "--proposal", "top_n", "--max-runs", "2", *url]
    code, out, _ = run_cli(*create, "--json")
    assert code == 0
    created = json.loads(out)
    assert created["batch_id"] == "cli-1" and created["metadata"] == {"a": 1}
    assert created["proposal"] == "top_n" and created["max_runs"] == 2
    code, _, err = run_cli("task", "create", "svc-fast", "--proposal", "search", *url)
    assert code == 1 and "HTTP 422" in err and "search space" in err
    code, out, _ = run_cli("--json", *create)
    assert code == 0 and json.loads(out)["id"] == created["id"]
    code, out, _ = run_cli("task", "cancel", created["id"], *url)
    assert code == 0 and f"task {created['id']}:" in out
    code, out, _ = run_cli("task", "status", created["id"], "--wait", "--poll", "0.2", *url)
    assert code == 1 and f"task {created['id']}: canceled" in out  # --wait: not done exits 1
    code, out, _ = run_cli("task", "status", done_task["id"], "--wait", *url)
    assert code == 0 and "best run:" in out and done_task["result"]["best_run_id"] in out
    code, out, _ = run_cli("task", "list", "--status", "done", *url)
    assert code == 0 and done_task["id"] in out and "3/3" in out
    code, _, err = run_cli("task", "cancel", done_task["id"], *url)
    assert code == 1 and "HTTP 409" in err and "nothing to cancel" in err
    code, _, err = run_cli("task", "status", "ffff", *url)
    assert code == 1 and "HTTP 404" in err
    code, _, err = run_cli("task", "create", "svc-fast", "--metadata", "{oops", *url)
    assert code == 2 and "--metadata" in err
    code, _, err = run_cli("task", "list", "--url", f"http://127.0.0.1:{servers.free_port()}")
    assert code == 1 and "cannot reach the task service" in err


def test_jobs_that_ended_are_deleted_after_keep_jobs_hours_and_tasks_stay(
    stack: Stack, done_task: dict[str, Any]
) -> None:
    """Procrastinate keeps every job (the stalled-jobs check alone makes one a second here):
    the hourly maintenance deletes the jobs that ended over ``keep_jobs_hours`` ago (0 here:
    all) with their events, never a queued one; the task keeps its status and result. Runs
    after the tests that read this stack's jobs."""
    import asyncio

    from tracker_core.service.queue import REMOVE_OLD_JOBS, build_app, remove_old_jobs
    from tracker_core.service.settings import ServiceSettings, psycopg_url

    settings = ServiceSettings(database_url=stack.database, keep_jobs_hours=0)
    app = build_app(settings, psycopg_url(stack.database), max_pool=2)
    periodic = [p.task.name for p in app.periodic_registry.periodic_tasks.values()]
    assert REMOVE_OLD_JOBS in periodic
    ended = "('succeeded', 'failed', 'cancelled', 'aborted')"

    async def clean() -> int:
        async with app.open_async():
            parked = await app.configure_task("tests.parked", queue="tests-nobody").defer_async()
            await remove_old_jobs(app, 0)
            return int(parked)

    assert len(stack.jobs_of(done_task["id"])) == 5
    assert stack.sql(f"SELECT count(*) FROM procrastinate_jobs WHERE status IN {ended}")[0][0]
    parked = asyncio.run(clean())
    try:
        assert stack.jobs_of(done_task["id"]) == []
        assert stack.sql(
            "SELECT count(*) FROM procrastinate_events e LEFT JOIN procrastinate_jobs j "
            "ON j.id = e.job_id WHERE j.id IS NULL"
        ) == [(0,)]
        assert stack.sql("SELECT status::text FROM procrastinate_jobs WHERE id = %s", parked) == [
            ("todo",)
        ]
        task = stack.client.get(done_task["id"])
        assert task["status"] == "done" and task["result"] == done_task["result"]
        assert done_task["id"] in {t["id"] for t in stack.client.list(status="done")["tasks"]}
    finally:
        stack.sql("DELETE FROM procrastinate_jobs WHERE id = %s RETURNING id", parked)


# ---------------------------------------------------------------------- workers that die
@pytest.fixture(scope="module")
def fleet(pg: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A database of its own, an API, and two workers (one slot each) started by tests."""
    database = create_database(pg, "fleet")
    with stack_on(database, tmp_path_factory.mktemp("fleet")) as s:
        workers = [s.start_worker(), s.start_worker()]
        s.start_api()
        for w in workers:
            s.wait_worker_ready(w)
        yield s


def _worker_proc(stack: Stack, task: dict[str, Any]) -> Any:
    pid = int(task["worker"].rsplit(":", 1)[1])
    (proc,) = [p for p in stack.procs if p.pid == pid]
    return proc


@pytest.mark.parametrize("parallel", [1, None], ids=["one-job", "a-job-per-run"])
def test_a_task_that_outlives_the_stall_threshold_on_a_live_worker_is_not_duplicated(
    fleet: Stack, parallel: int | None
) -> None:
    # each of its two runs trains for 4 s; a worker silent for 3 s counts as dead
    before = len(fleet.trained("svc-long"))
    task = fleet.client.create("svc-long", batch_id=f"long-{parallel}", max_parallel_runs=parallel)
    done = fleet.wait_status(task["id"], "done")
    assert done["attempts"] == 1
    jobs = [(s, a) for _, s, a in fleet.jobs_of(task["id"])]
    assert jobs == [("succeeded", 1)] * (1 if parallel == 1 else 4)  # + 2 runs, completion
    starts = [(p, pid) for event, p, pid in fleet.trained("svc-long")[before:] if event == "start"]
    assert len(starts) == 2 and len({p for p, _ in starts}) == 2  # each run trained once
    # in one training process, or in one per run
    assert len({pid for _, pid in starts}) == (1 if parallel == 1 else 2)


def test_kill_9_of_a_worker_mid_task_another_worker_finishes_it(fleet: Stack) -> None:
    # one job trains every run (a job per run: test_parallel)
    task = fleet.client.create("svc-kill", batch_id="kill-1", max_parallel_runs=1)
    running = fleet.wait_status(task["id"], "processing")
    victim = _worker_proc(fleet, running)
    wait_for(
        lambda: (fleet.client.get(task["id"])["progress"] or {}).get("finished", 0) >= 1,
        120,
        "the first run to finish",
    )
    children = descendants(victim.pid)
    assert children, "the worker runs its task in a child process"
    finished_before = {p for event, p, _ in fleet.trained("svc-kill") if event == "end"}
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    # its training process notices and exits by itself
    wait_for(lambda: not alive(children), 30, "the dead worker's children to exit")
    done = fleet.wait_status(task["id"], "done", timeout=240)
    assert done["attempts"] == 2 and done["worker"] != running["worker"]
    assert done["result"]["resumed"] is True
    events = fleet.trained("svc-kill")
    ends = Counter(p for event, p, _ in events if event == "end")
    assert len(ends) == 3 and set(ends.values()) == {1}  # no run finished twice
    starts = Counter(p for event, p, _ in events if event == "start")
    assert all(starts[p] == 1 for p in finished_before)  # finished runs not trained again
    with mlflow_manager(fleet, "svc-kill") as manager:
        runs = manager.get_runs(done["result"]["experiment_id"])
        assert sorted(r.status.value for r in runs) == ["FINISHED"] * 3


def test_store_failures_are_retried_then_the_task_ends_in_error(fleet: Stack) -> None:
    for proc in fleet.procs:  # only a worker whose model store is broken is left
        if "worker" in proc.args:  # type: ignore[operator]
            fleet.stop(proc)
    broken = fleet.start_worker(
        "--artifact-uri", "/dev/null/models", "--max-attempts", "2", "--retry-wait-seconds", "1"
    )
    fleet.wait_worker_ready(broken)
    task = fleet.client.create("svc-fast", batch_id="broken-1")
    ended = fleet.wait_status(task["id"], "error")
    assert ended["attempts"] == 2
    assert "ArtifactStoreError" in ended["error"] and "gave up after 2 attempts" in ended["error"]
    assert [(s, a) for _, s, a in fleet.jobs_of(task["id"])] == [("succeeded", 2)]


# ---------------------------------------------------------------------- tracker-core serve
@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data folder outside pytest's tree: as root, the embedded PostgreSQL runs as another
    account that must reach it, and pytest resets its own folders to mode 0700."""
    path = Path(tempfile.mkdtemp(prefix="tracker-core-serve-"))
    try:
        yield path / "data"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_serve_embedded_end_to_end_restart_keeps_tasks_and_leaves_no_process(
    tmp_path: Path, data_dir: Path
) -> None:
    from _service_methods import method_options

    stack = Stack(database="", work=tmp_path, tracking_uri="", artifact_uri="")
    data = data_dir
    premigrate(f"sqlite:///{data / 'mlflow.db'}", str(data / "models"))
    port = servers.free_port()
    stack.url = f"http://127.0.0.1:{port}"
    args = ["serve", "--data-dir", str(data), "--port", str(port), "--allow-root"]
    args += [*method_options(), "--poll-seconds", "0.5", "--shutdown-grace-seconds", "5"]

    def start() -> Any:
        proc = stack.spawn(args, "serve")
        stack.wait_healthy(proc)
        return proc

    def stop(proc: Any) -> None:
        pg_pid = int((data / "postgres" / "postmaster.pid").read_text().split()[0])
        family = [*descendants(proc.pid), psutil.Process(pg_pid)]
        assert stack.stop(proc) == 0, tail(proc)
        wait_for(lambda: not alive(family), 60, "every process of serve to end")

    try:
        first = start()
        url = ["--url", stack.url]
        code, out, _ = run_cli("--json", "task", "create", "svc-fast", "--batch-id", "e2e", *url)
        assert code == 0, out
        task = json.loads(out)
        code, out, _ = run_cli("--json", "task", "status", task["id"], "--wait", *url)
        assert code == 0 and json.loads(out)["status"] == "done"
        # a task interrupted by a stop goes back to the queue and resumes after the restart
        slow = stack.client.create("svc-restart", batch_id="e2e-slow", max_parallel_runs=1)
        wait_for(
            lambda: (stack.client.get(slow["id"])["progress"] or {}).get("finished", 0) >= 1,
            120,
            "the first run of the slow task",
        )
        stop(first)
        assert (data / "mlflow.db").exists() and any((data / "models").iterdir())

        second = start()
        assert stack.client.get(task["id"])["status"] == "done"
        listed = {t["id"] for t in stack.client.list()["tasks"]}
        assert {task["id"], slow["id"]} <= listed
        resumed = stack.wait_status(slow["id"], "done")
        assert resumed["attempts"] == 2 and resumed["result"]["resumed"] is True
        ends = Counter(p for event, p, _ in stack.trained("svc-restart") if event == "end")
        assert len(ends) == 3 and set(ends.values()) == {1}
        stop(second)
    finally:
        stack.stop_all()
    assert not os.path.exists(data / "postgres" / "postmaster.pid")
