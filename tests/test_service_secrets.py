"""No credential in any output of the task service: a full run with secrets everywhere.

One PostgreSQL holds the task database (role ``svc``, its password given as ``?password=`` in
a URL read from ``--database-file`` or ``$TRACKER_CORE_DATABASE_URL``) and MLflow's tracking
database (role ``ml``, its password in ``$MLFLOW_TRACKING_URI``'s userinfo); both roles log in
with scram passwords. An API (with an admin token) and a worker run a task to ``done`` (its
models in the pickle format); while that worker trains a second task, a worker with the wrong
tracking password fails a third at once (a refused login is not retried), and the second is
canceled. Every log line, every answer of the API and of the
``task`` commands, and every process's command line is searched for the secrets. Real
processes, nothing mocked.
"""

from __future__ import annotations

import io
import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import psutil
import psycopg
import pytest
from _service_harness import FAST_TIMINGS, Stack, descendants, premigrate, wait_for
from _service_methods import method_options
from _service_methods_extra import OPTIONS as EXTRA_METHODS
from psycopg import sql

from tracker_core.cli import main
from tracker_core.service.settings import psycopg_url
from tracker_core.testing import servers

pytestmark = pytest.mark.skipif(
    not servers.postgres_installed(),
    reason="PostgreSQL's server binaries (initdb, postgres) are not installed here",
)

API = "/api/v1/fine-tuning"
SECRET_DB = f"Sekret-db-{secrets.token_hex(6)}"
SECRET_TRACKING = f"Sekret-tracking-{secrets.token_hex(6)}"
SECRET_WRONG = f"Sekret-wrong-{secrets.token_hex(6)}"
_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@attrs.define
class FullRun:
    stack: Stack
    token: str
    tasks: dict[str, dict[str, Any]]
    #: every answer of the API and of the task commands, as text
    answers: list[str]
    #: the command lines of every process of the service, seen while it trained
    listings: list[str]

    def logs(self) -> dict[str, str]:
        """The log of every process the run started (its standard output and error)."""
        paths = [Path(p.log_path) for p in self.stack.procs]  # type: ignore[attr-defined]
        return {p.name: p.read_text(errors="replace") for p in paths}


def _password_roles(admin_url: str) -> str:
    """Roles ``svc`` and ``ml`` that log in over TCP with scram passwords (the harness's
    superuser keeps trust), their databases; the ``host:port`` of the server."""
    with psycopg.connect(psycopg_url(admin_url), autocommit=True) as conn:
        for role, password, database in (
            ("svc", SECRET_DB, "tasks"),
            ("ml", SECRET_TRACKING, "ml"),
        ):
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password)
                )
            )
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(database), sql.Identifier(role)
                )
            )
        row = conn.execute("SHOW hba_file").fetchone()
        assert row is not None
        rules = [
            "local all all trust",
            "host all tracker 127.0.0.1/32 trust",
            "host all all 127.0.0.1/32 scram-sha-256",
        ]
        conn.execute(
            sql.SQL("COPY (SELECT unnest({}::text[])) TO {}").format(
                sql.Literal(rules), sql.Literal(row[0])
            )
        )
        conn.execute("SELECT pg_reload_conf()")
    return admin_url.split("@", 1)[1].split("/", 1)[0]


def _listing(procs: list[Any]) -> str:
    """The command lines of these processes and all their descendants."""
    out = []
    for proc in procs:
        if proc.poll() is not None:
            continue
        for p in [psutil.Process(proc.pid), *descendants(proc.pid)]:
            try:
                out.append(" ".join(p.cmdline()))
            except psutil.Error:
                continue
    return "\n".join(out)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullRun]:
    work = tmp_path_factory.mktemp("secrets")
    with servers.postgres(work / "pg") as admin_url:
        where = _password_roles(admin_url)
        tasks_db = f"postgresql://svc@{where}/tasks?password={SECRET_DB}"
        tracking = f"postgresql+psycopg://ml:{SECRET_TRACKING}@{where}/ml"
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(f"postgresql://ml:{SECRET_WRONG}@{where}/ml").close()
        models = str(work / "models")
        premigrate(tracking, models)
        db_file = work / "tasks-db.url"
        db_file.write_text(tasks_db + "\n")
        db_file.chmod(0o600)
        stack = Stack(
            database=tasks_db,
            work=work,
            tracking_uri=tracking,
            artifact_uri=models,
            extra_env={"MLFLOW_TRACKING_URI": tracking, "TRACKER_CORE_DATABASE_URL": tasks_db},
        )
        common = ["--artifact-uri", models, *method_options(), *EXTRA_METHODS]
        answers: list[str] = []
        listings: list[str] = []
        try:
            code, out, err = run_cli(
                "--json", "token", "create", "--name", "ops", "--scope", "admin",
                "--database-file", str(db_file),
            )  # fmt: skip
            assert code == 0, err
            stack.token = json.loads(out)["token"]
            port = servers.free_port()
            stack.url = f"http://127.0.0.1:{port}"
            api = stack.spawn(
                ["serve", "--no-worker", "--database-file", str(db_file), "--port", str(port),
                 *common],
                "api",
            )  # fmt: skip
            stack.wait_healthy(api)
            # one slot; a new training process for every job (no warm child), so the notice
            # below comes from several processes
            worker = stack.spawn(
                ["worker", *FAST_TIMINGS, "--warm-child-seconds", "0", *common], "worker"
            )
            stack.wait_worker_ready(worker)
            client = stack.client

            # a task done, its three runs in three training processes (pickle format)
            created = client.create("svc-pickle", batch_id="s-done")
            tasks = {"done": stack.wait_status(created["id"], "done")}
            answers += [json.dumps(created), json.dumps(tasks["done"])]
            # a task that trains on (the only slot of that worker) ...
            slow = client.create("svc-stall", batch_id="s-cancel", max_parallel_runs=1)
            wait_for(
                lambda: (client.get(slow["id"])["progress"] or {}).get("running"),
                120,
                "the slow task to train",
            )
            # ... while a worker with the wrong tracking password fails another
            stack.extra_env["MLFLOW_TRACKING_URI"] = tracking.replace(SECRET_TRACKING, SECRET_WRONG)
            bad = stack.spawn(
                ["worker", *FAST_TIMINGS, "--max-attempts", "1", *common], "worker-wrong"
            )
            stack.wait_worker_ready(bad)
            listings.append(_listing(stack.procs))
            doomed = client.create("svc-fast", batch_id="s-fail")
            tasks["error"] = stack.wait_status(doomed["id"], "error", timeout=300)
            listings.append(_listing(stack.procs))
            # then the slow one is canceled while it trains
            answers.append(json.dumps(client.cancel(slow["id"])))
            tasks["canceled"] = stack.wait_status(slow["id"], "canceled")

            # everything the API and the task commands answer
            answers += [json.dumps(t) for t in tasks.values()]
            answers += [
                json.dumps(client.list(limit=500)),
                json.dumps(client.methods()),
                json.dumps(client.health()),
                json.dumps(client.request("GET", "/openapi.json")[1]),
                json.dumps(client.request("GET", "/api/v1/tokens")[1]),
            ]
            token_file = work / "ops.token"
            token_file.write_text(stack.token)
            cli = ["--url", stack.url, "--token-file", str(token_file)]
            for task in tasks.values():
                for json_flag in ([], ["--json"]):
                    answers.append(run_cli(*json_flag, "task", "status", task["id"], *cli)[1])
            answers.append(run_cli("task", "list", *cli)[1])
            answers.append(run_cli("task", "status", "nope", *cli)[2])  # a 404
            answers.append(run_cli("task", "list", "--url", stack.url)[2])  # a 401
            answers.append(run_cli("token", "list", "--database-file", str(db_file))[1])
            yield FullRun(stack, stack.token, tasks, answers, listings)
        finally:
            stack.stop_all()


SECRETS = (SECRET_DB, SECRET_TRACKING, SECRET_WRONG)


def test_no_secret_in_any_log_line_answer_or_process_listing(full_run: FullRun) -> None:
    logs = full_run.logs()
    assert {"api-0.log", "worker-1.log", "worker-wrong-2.log"} <= set(logs)
    assert any("forkserver" in listing for listing in full_run.listings)  # training processes
    for secret in (*SECRETS, full_run.token):
        for name, text in logs.items():
            assert secret not in text, f"{secret} in {name}"
        for answer in full_run.answers:
            assert secret not in answer, answer
        for listing in full_run.listings:
            assert secret not in listing, listing
    # the URIs were shown, redacted: the start lines name the databases
    assert "/tasks?password=***" in logs["api-0.log"]
    assert "tracking: postgresql+psycopg://ml:***@" in logs["api-0.log"]
    assert "tracking: postgresql+psycopg://ml:***@" in logs["worker-wrong-2.log"]


def test_a_task_failed_on_wrong_tracking_credentials_says_why(full_run: FullRun) -> None:
    failed = full_run.tasks["error"]
    assert "the database refused the login" in failed["error"], failed["error"]
    assert "password authentication failed" in failed["error"], failed["error"]
    assert 'for user "ml"' in failed["error"] and failed["worker"].endswith(
        str(full_run.stack.procs[2].pid)
    )


def test_every_log_line_has_time_and_level_and_the_pickle_notice_is_said_once(
    full_run: FullRun,
) -> None:
    logs = full_run.logs()
    for name, text in logs.items():
        lines = text.splitlines()
        stray = [line for line in lines if not _LINE.match(line) and not line.startswith(" ")]
        assert stray == [], f"{name}: {stray}"
    starts = {pid for event, _, pid in full_run.stack.trained("svc-pickle") if event == "start"}
    assert len(starts) == 3  # three training processes saved a pickled model ...
    notices = [line for line in logs["worker-1.log"].splitlines() if "pickles the whole" in line]
    assert len(notices) == 1 and " INFO " in notices[0], notices  # ... it is said once
    assert [line for line in logs["api-0.log"].splitlines() if " WARNING " in line] == []


def test_a_canceled_tasks_progress_shows_no_run_queued_or_running(full_run: FullRun) -> None:
    progress = full_run.tasks["canceled"]["progress"]
    assert progress["queued"] == 0 and progress["running"] == 0, progress
    assert progress["canceled"] >= 1, progress
    assert progress["planned"] == progress["finished"] + progress["failed"] + progress["canceled"]


def test_credentials_in_a_storage_uri_are_refused_and_never_echoed() -> None:
    secret = "Sekret/with+slash"
    database = "postgresql://svc@127.0.0.1:1/tasks"
    for command in ("serve", "worker"):
        for uri in (f"s3://AKIAEXAMPLE:{secret}@bucket/models", f"gs://bucket/m?token={secret}"):
            code, out, err = run_cli(command, "--artifact-uri", uri, "--database", database)
            assert code == 1 and "carries credentials" in err, err
            assert secret not in out + err
    code, _, err = run_cli("serve", "--database", f"mysql://u:{secret}@db/x")
    assert code == 1 and "postgresql://" in err and secret not in err
    code, _, err = run_cli("serve", "--database", f"u:{secret}@db/x")
    assert code == 1 and secret not in err
