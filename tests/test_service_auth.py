"""Who may call the task API: bearer tokens and their scopes on every route, who created and
canceled each task, allowed hosts, cross-site posts, and when ``serve`` refuses to start.

Real processes as in ``test_service``: ``tracker-core serve --no-worker`` on a loopback port
and a private PostgreSQL; tokens made with ``tracker-core token create``. No worker runs here
(tasks stay pending; cancelling a pending one is immediate), except for the embedded layout.
"""

from __future__ import annotations

import io
import json
import re
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from _service_harness import Stack, alive, create_database, descendants, stack_on, tail, wait_for

from tracker_core.cli import main
from tracker_core.service.settings import ServiceSettings
from tracker_core.testing import servers

pytestmark = pytest.mark.skipif(
    not servers.postgres_installed(),
    reason="PostgreSQL's server binaries (initdb, postgres) are not installed here",
)

API = "/api/v1/fine-tuning"
#: every operation of the OpenAPI document, and the scope it needs (None: public)
ROUTES: dict[tuple[str, str], str | None] = {
    ("post", f"{API}/task"): "tasks:write",
    ("get", f"{API}/task"): "tasks:read",
    ("get", f"{API}/task/{{task_id}}"): "tasks:read",
    ("post", f"{API}/task/{{task_id}}/cancel"): "tasks:write",
    ("get", f"{API}/methods"): "tasks:read",
    ("get", "/api/v1/tokens"): "admin",
    ("get", "/health"): None,
}
SCOPES = ("tasks:read", "tasks:write", "admin")
NAMES = {"tasks:read": "reader", "tasks:write": "writer", "admin": "root"}
#: the ``secured`` API's tokens by scope, and ``bob`` (tasks:write), ``revoked``, ``expired``
TOKENS: dict[str, str] = {}
GRANTS = {"tasks:read": {"tasks:read"}, "tasks:write": {"tasks:read", "tasks:write"}}
GRANTS["admin"] = set(SCOPES)


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def call(
    url: str,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: Any = None,
    headers: dict[str, str | None] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """One request: ``(status, decoded JSON, headers)``; JSON content type unless told (a
    header given as None is not sent)."""
    given: dict[str, str | None] = {"Content-Type": "application/json", **(headers or {})}
    sent = {k: v for k, v in given.items() if v is not None}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method.upper(), headers=sent)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"null"), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null"), dict(exc.headers)


def make_token(database: str, name: str, scope: str) -> str:
    code, out, err = run_cli(
        "--json", "token", "create", "--name", name, "--scope", scope, "--database", database
    )
    assert code == 0, err
    return str(json.loads(out)["token"])


@pytest.fixture(scope="module")
def secured(pg: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API on loopback whose database holds tokens (so every request needs one); no worker.
    ``stack.tokens``: a token per scope, plus ``bob`` (tasks:write), a revoked and an expired
    one."""
    database = create_database(pg, "secured")
    with stack_on(database, tmp_path_factory.mktemp("secured")) as s:
        tokens = {scope: make_token(database, NAMES[scope], scope) for scope in SCOPES}
        tokens["bob"] = make_token(database, "bob", "tasks:write")
        tokens["revoked"] = make_token(database, "gone", "admin")
        assert run_cli("token", "revoke", "gone", "--database", database)[0] == 0
        tokens["expired"] = make_token(database, "old", "admin")
        s.sql(
            "UPDATE tracker_core_tokens SET expires_at = now() - interval '1 s' "
            "WHERE name = 'old' RETURNING name"
        )
        s.start_api()
        s.token = tokens["admin"]
        TOKENS.update(tokens)
        yield s


def _new_task(stack: Stack, token: str) -> str:
    status, task, _ = call(
        stack.url, "post", f"{API}/task", token=token, body={"fine_tuning_method": "svc-fail"}
    )
    assert status == 201, task
    return str(task["id"])


def _request(stack: Stack, method: str, path: str, token: str | None) -> tuple[int, Any, Any]:
    """The route's request, with a task to read or cancel where the path names one."""
    body = {"fine_tuning_method": "svc-fail"} if path == f"{API}/task" else None
    if "{task_id}" in path:
        path = path.replace("{task_id}", _new_task(stack, TOKENS["admin"]))
    return call(stack.url, method, path, token=token, body=body)


# ---------------------------------------------------------------------- every route
def test_every_route_needs_a_token_with_its_scope(secured: Stack) -> None:
    tokens = TOKENS
    status, spec, _ = call(secured.url, "get", "/openapi.json")
    assert status == 200
    operations = {(m, p): op for p, ops in spec["paths"].items() for m, op in ops.items()}
    assert set(operations) == set(ROUTES), "a route was added: give it a scope here"
    refused = 0
    for (method, path), scope in ROUTES.items():
        what = f"{method.upper()} {path}"
        if scope is None:  # /health
            assert _request(secured, method, path, None)[0] == 200, what
            continue
        # the scope is in the document (Swagger UI's "Authorize" button takes the token)
        assert operations[(method, path)]["security"] == [{"HTTPBearer": [scope]}], what
        for bad in (None, "tct_not-a-token", tokens["revoked"], tokens["expired"]):
            status, answer, headers = _request(secured, method, path, bad)
            assert status == 401, (what, bad, status, answer)
            assert headers["www-authenticate"].startswith("Bearer"), what
            assert "token" in answer["detail"], answer
        for held in SCOPES:
            status, answer, headers = _request(secured, method, path, tokens[held])
            if scope in GRANTS[held]:
                assert 200 <= status < 300, (what, held, status, answer)
            else:
                refused += 1
                assert status == 403, (what, held, status, answer)
                assert scope in answer["detail"] and held in answer["detail"], answer
                assert 'error="insufficient_scope"' in headers["www-authenticate"]
    # a tasks:read route is granted to every scope; every other route refuses a lower one
    assert refused == 1 + 1 + 2  # POST task, POST cancel (tasks:read), tokens (read, write)


def test_a_malformed_or_non_bearer_authorization_is_401(secured: Stack) -> None:
    for header in ("Basic dXNlcjpwdw==", "Bearer", "Bearer  ", "tct_x"):
        status, _, headers = call(
            secured.url, "get", f"{API}/task", headers={"Authorization": header}
        )
        assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"], header


def test_tasks_record_who_created_and_canceled_them_shown_by_the_cli(
    secured: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = TOKENS
    url = ["--url", secured.url]
    # the task commands take the token from $TRACKER_CORE_TOKEN ...
    monkeypatch.setenv("TRACKER_CORE_TOKEN", tokens["tasks:write"])
    code, out, err = run_cli("--json", "task", "create", "svc-fail", "--batch-id", "who-1", *url)
    assert code == 0, err
    task = json.loads(out)
    assert task["created_by"] == "writer" and task["canceled_by"] is None
    # ... or from --token-file (it wins); there is no option that takes the token itself
    token_file = tmp_path / "bob.token"
    token_file.write_text(tokens["bob"] + "\n")
    code, out, _ = run_cli("task", "cancel", task["id"], "--token-file", str(token_file), *url)
    assert code == 0 and "canceled by: bob" in out
    code, out, _ = run_cli("task", "status", task["id"], *url)
    assert code == 0 and "by writer" in out and "canceled by: bob" in out
    shown = secured.client.get(task["id"])
    assert (shown["created_by"], shown["canceled_by"]) == ("writer", "bob")
    # a second cancel does not change who canceled it
    status, _, _ = call(
        secured.url, "post", f"{API}/task/{task['id']}/cancel", token=tokens["admin"]
    )
    assert status == 409 and secured.client.get(task["id"])["canceled_by"] == "bob"
    # without a token: the API's answer says how to give one
    monkeypatch.delenv("TRACKER_CORE_TOKEN")
    code, _, err = run_cli("task", "status", task["id"], *url)
    assert code == 1 and "HTTP 401" in err and "TRACKER_CORE_TOKEN" in err
    code, _, err = run_cli("task", "status", task["id"], "--token", tokens["admin"], *url)
    assert code == 2, "a token must not be a command-line value (ps shows those)"
    code, _, err = run_cli("task", "list", "--token-file", str(tmp_path / "missing"), *url)
    assert code == 2 and "--token-file" in err


def test_token_list_and_revoke_take_effect_on_the_next_request_and_show_no_secret(
    secured: Stack,
) -> None:
    database = secured.database
    token = make_token(database, "carol", "tasks:read")
    assert call(secured.url, "get", f"{API}/task", token=token)[0] == 200
    code, out, _ = run_cli("token", "list", "--database", database)
    assert code == 0 and "carol" in out and "tasks:read" in out and "gone" not in out
    code, out, _ = run_cli("--json", "token", "list", "--all", "--database", database)
    listed = {t["name"]: t for t in json.loads(out)}
    assert listed["gone"]["active"] is False and listed["gone"]["revoked_at"]
    assert listed["old"]["active"] is False and listed["carol"]["active"] is True
    status, over_http, _ = call(secured.url, "get", "/api/v1/tokens", token=secured.token)
    assert status == 200 and {t["name"] for t in over_http} == set(listed)
    every_token = [*TOKENS.values(), token]
    for shown in (out, json.dumps(over_http)):
        assert not any(t in shown or t[4:] in shown for t in every_token)
    # only a SHA-256 is stored
    stored = {bytes(h) for (h,) in secured.sql("SELECT hash FROM tracker_core_tokens")}
    import hashlib

    assert hashlib.sha256(token.encode()).digest() in stored and len(token) == 47
    code, out, _ = run_cli("token", "revoke", "carol", "--database", database)
    assert code == 0 and "carol revoked" in out
    assert call(secured.url, "get", f"{API}/task", token=token)[0] == 401
    code, _, err = run_cli("token", "revoke", "carol", "--database", database)
    assert code == 1 and "no token named 'carol'" in err
    # a name is one active token; bad names and durations are usage errors that say the rule
    code, _, err = run_cli("token", "create", "--name", "bob", "--database", database)
    assert code == 1 and "exists already" in err
    code, _, err = run_cli("token", "create", "--name", "a b", "--database", database)
    assert code == 1 and "invalid token name" in err
    code, _, err = run_cli(
        "token", "create", "--name", "x", "--expires", "soon", "--database", database
    )
    assert code == 1 and "invalid duration" in err
    code, out, _ = run_cli(
        "--json", "token", "create", "--name", "dave", "--expires", "90d", "--database", database
    )
    assert code == 0 and json.loads(out)["expires_at"] > json.loads(out)["created_at"]


# ---------------------------------------------------------------------- where from
def test_a_host_header_that_is_not_allowed_is_400(secured: Stack) -> None:
    port = secured.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io"):
        status, answer, _ = call(
            secured.url, "get", f"{API}/task", token=secured.token, headers={"Host": host}
        )
        assert status == 400 and "not an allowed host" in answer["detail"], host
    status, _, _ = call(secured.url, "get", "/health", headers={"Host": "evil.example"})
    assert status == 400  # a DNS-rebound page cannot even probe it
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST"):
        status, _, _ = call(
            secured.url, "get", f"{API}/task", token=secured.token, headers={"Host": host}
        )
        assert status == 200, host


@pytest.fixture(scope="module")
def open_api(pg: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API with --insecure-no-auth and --allowed-hosts (loopback, no worker, no token)."""
    database = create_database(pg, "open")
    with stack_on(database, tmp_path_factory.mktemp("open")) as s:
        port = servers.free_port()
        s.url = f"http://127.0.0.1:{port}"
        proc = s.spawn(
            ["serve", "--no-worker", "--database", database, "--port", str(port),
             "--insecure-no-auth", "--allowed-hosts", "127.0.0.1,api.internal", *s.common()],
            "api",
        )  # fmt: skip
        s.wait_healthy(proc)
        yield s


def test_insecure_no_auth_warns_at_start_and_on_health(open_api: Stack) -> None:
    health = open_api.client.health()
    assert health["status"] == "ok" and "authentication is off" in health["warning"]
    log = Path(open_api.procs[0].log_path).read_text()  # type: ignore[attr-defined]
    warned = [line for line in log.splitlines() if "authentication is OFF" in line]
    assert len(warned) == 1 and " WARNING " in warned[0], log
    assert call(open_api.url, "get", f"{API}/task")[0] == 200
    task = open_api.client.create("svc-fail", batch_id="anon-1")
    assert task["created_by"] is None
    # a token given is still checked, and named
    status, _, _ = call(open_api.url, "get", f"{API}/task", token="tct_wrong")
    assert status == 401
    # --allowed-hosts replaces the default
    assert call(open_api.url, "get", "/health", headers={"Host": "api.internal"})[0] == 200
    assert call(open_api.url, "get", "/health", headers={"Host": "localhost"})[0] == 400


def test_a_cross_site_post_without_a_token_does_not_cancel(open_api: Stack) -> None:
    task = open_api.client.create("svc-fail", batch_id="csrf-1")
    cancel = f"{API}/task/{task['id']}/cancel"
    port = open_api.url.rsplit(":", 1)[1]
    # what a page on another site can send without a CORS preflight: a "simple" request
    refused = [
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Content-Type": None}, 415),  # no body, no type: what a bare fetch/form POST sends
        ({"Origin": "http://evil.example"}, 403),
        ({"Origin": f"http://localhost:{port}"}, 403),  # another origin, even on this host
        ({"Origin": "null"}, 403),
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Sec-Fetch-Site": "same-site"}, 403),
    ]
    for headers, expected in refused:
        status, answer, _ = call(open_api.url, "post", cancel, headers=headers)
        assert status == expected, (headers, status, answer)
        assert "cross-site" in answer["detail"] or "Content-Type" in answer["detail"]
    assert open_api.client.get(task["id"])["status"] == "pending"
    # the same origin (Swagger UI at /docs) and non-browser clients (JSON) go through
    status, answer, _ = call(
        open_api.url,
        "post",
        cancel,
        headers={"Origin": open_api.url, "Sec-Fetch-Site": "same-origin"},
    )
    assert status == 200 and answer["status"] == "canceled", answer


# ---------------------------------------------------------------------- when serve starts
def test_off_loopback_serve_refuses_to_start_without_a_token(pg: str, tmp_path: Path) -> None:
    database = create_database(pg, "refuse")
    with stack_on(database, tmp_path) as s:
        # 192.0.2.1 is not an address of this machine: were it not refused, binding would
        # fail with another message (nothing ever listens off loopback here)
        proc = s.spawn(
            ["serve", "--no-worker", "--host", "192.0.2.1", "--database", database,
             "--port", str(servers.free_port()), *s.common()],
            "refused",
        )  # fmt: skip
        assert proc.wait(timeout=120) == 1, tail(proc)
        assert "not a loopback address and no API token exists" in tail(proc)
        assert "--insecure-no-auth" in tail(proc)


def test_auth_modes_by_address() -> None:
    from tracker_core.service.auth import AccessPolicy, AuthMode, is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.org"))

    def policy(**kw: Any) -> Any:
        return AccessPolicy.for_settings(ServiceSettings(**kw))

    assert policy(host="127.0.0.1").mode is AuthMode.LOOPBACK
    assert policy(host="0.0.0.0").mode is AuthMode.TOKENS
    assert policy(host="0.0.0.0", insecure_no_auth=True).mode is AuthMode.OFF
    assert policy(host="127.0.0.1").allowed_hosts == {"127.0.0.1", "localhost", "::1"}
    everywhere = policy(host="0.0.0.0").allowed_hosts
    assert {"localhost", "127.0.0.1", socket.gethostname().lower()} <= everywhere
    assert policy(host="10.1.2.3").allowed_hosts == {"10.1.2.3", "127.0.0.1", "localhost", "::1"}
    assert policy(allowed_hosts=("API.example.",)).allowed_hosts == {"api.example"}


# ---------------------------------------------------------------------- the embedded layout
@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data folder outside pytest's tree (as root, the embedded PostgreSQL's account must
    reach it)."""
    import shutil

    path = Path(tempfile.mkdtemp(prefix="tracker-core-auth-"))
    try:
        yield path / "data"
    finally:
        shutil.rmtree(path, ignore_errors=True)


_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def test_embedded_loopback_needs_no_token_until_one_is_created(
    tmp_path: Path, data_dir: Path
) -> None:
    from _service_methods import method_options

    stack = Stack(database="", work=tmp_path, tracking_uri="", artifact_uri="")
    port = servers.free_port()
    stack.url = f"http://127.0.0.1:{port}"
    proc = stack.spawn(
        ["serve", "--no-worker", "--data-dir", str(data_dir), "--port", str(port),
         "--allow-root", *method_options()],
        "serve",
    )  # fmt: skip
    try:
        stack.wait_healthy(proc)
        # no token yet: it works as before, and said so once
        assert call(stack.url, "get", f"{API}/task")[0] == 200
        anonymous = call(stack.url, "post", f"{API}/task", body={"fine_tuning_method": "svc-fail"})
        assert anonymous[0] == 201 and anonymous[1]["created_by"] is None
        # the docs work offline: Swagger UI's files come from the installed package
        with urllib.request.urlopen(stack.url + "/docs", timeout=60) as resp:
            page = resp.read().decode()
        assets = re.findall(r"""(?:src|href)=["']?([^"' >]+)""", page)
        assert assets and all(a.startswith("/static-offline-docs/") for a in assets), assets
        for asset in assets:
            with urllib.request.urlopen(stack.url + asset, timeout=60) as resp:
                assert resp.status == 200 and resp.read()
        # a token made for the data folder (its running database) switches auth on at once
        code, out, err = run_cli(
            "--json", "token", "create", "--name", "eve", "--data-dir", str(data_dir),
            "--allow-root",
        )  # fmt: skip
        assert code == 0, err
        token = json.loads(out)["token"]
        assert call(stack.url, "get", f"{API}/task")[0] == 401
        status, page, _ = call(stack.url, "get", f"{API}/task", token=token)
        assert status == 200 and page["total"] == 1
        # a request uvicorn itself refuses: its warning is a log line like every other
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"NOT HTTP\r\n\r\n")
            sock.recv(1024)
        family = [*descendants(proc.pid)]
        family.append(
            psutil.Process(int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0]))
        )
        assert stack.stop(proc) == 0, tail(proc)
        wait_for(lambda: not alive(family), 60, "every process of serve to end")
    finally:
        stack.stop_all()
    log = Path(proc.log_path).read_text()  # type: ignore[attr-defined]
    lines = log.splitlines()
    said = [line for line in lines if "no API token exists" in line]
    assert len(said) == 1 and " INFO " in said[0], log
    start = [line for line in lines if "tracker-core service: API on" in line]
    assert len(start) == 1 and " INFO " in start[0], log
    assert any("uvicorn" in line and "Invalid HTTP request" in line for line in lines), log
    assert [line for line in lines if not _LINE.match(line) and not line.startswith(" ")] == []
