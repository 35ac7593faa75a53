"""Champion and challenger through the driver and the command line, end to end on real stores.

The slow tests run on a reference leg and a remote one (local-sqlite, s3-server): the driver
promotes at completion and starts from the champion; 50 iterations with deletion keep a
lineage back to the initial model, drawn from that real history; ``champion``, ``promote``,
``rollback`` and ``lineage`` on the command line; the signed webhook is sent once per
promotion.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.artifacts
import pytest
import torch
from test_finetune import ToyMethod, ToyParams

from tracker_core.cli import main
from tracker_core.finetune import run_iteration
from tracker_core.manager import ExperimentsManager
from tracker_core.methods import connect_kwargs
from tracker_core.promotion import Outcome, PromotionConfig
from tracker_core.testing.harness import BackendUnderTest, fresh_sqlite_uri
from tracker_core.webhook import Webhook, signature

TWO_LEGS = pytest.mark.parametrize("backend", ["local-sqlite", "s3-server"], indirect=True)


class HoldoutToy(ToyMethod):
    """:class:`ToyMethod` with a fixed holdout: the mean bias of the model (training adds
    ``lr``). On a batch in ``overfit`` training *subtracts* ``lr``: the batch metric is as
    good as ever, the holdout gets worse."""

    def __init__(self, sets: list[ToyParams], overfit: set[str] | None = None) -> None:
        super().__init__(sets)
        self.overfit = overfit or set()

    def train(self, model: Any, params: ToyParams, manager: ExperimentsManager) -> Any:
        iteration = manager.current_iteration
        if iteration is not None and iteration.batch_id in self.overfit:
            params = ToyParams(lr=-params.lr, quality=params.quality)
        return super().train(model, params, manager)

    def evaluate_holdout(self, model: Any) -> float:
        return round(float(model.state_dict()["bias"].mean()), 6)


def _connect(backend: BackendUnderTest, method: ToyMethod, **kwargs: Any) -> ExperimentsManager:
    return backend.connect(**connect_kwargs(method), **kwargs)


def cli(backend: BackendUnderTest, method: ToyMethod, *argv: str) -> tuple[int, str, str]:
    options = ["--tracking-uri", backend.tracking_uri, "--artifact-uri", backend.artifact_root]
    options += ["--plugin", method.name, "--metric", method.main_metric]
    out, err = io.StringIO(), io.StringIO()
    with backend.mlflow_env():
        status = main([*options, *argv], stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def cli_json(backend: BackendUnderTest, method: ToyMethod, *argv: str) -> Any:
    status, out, err = cli(backend, method, "--json", *argv)
    assert status == 0, err
    return json.loads(out)


@TWO_LEGS
def test_the_driver_promotes_at_completion_and_starts_from_the_champion(
    backend: BackendUnderTest,
) -> None:
    sets = [ToyParams(lr=0.1, quality=0.5), ToyParams(lr=0.2, quality=0.9)]
    method = HoldoutToy(sets, overfit={"batch-2"})
    manager = _connect(backend, method, n_top_runs=2)

    first = run_iteration(method, manager, "batch-1")
    assert first.promotion is not None and first.promotion.outcome == Outcome.PROMOTED
    assert first.promotion.run_id == first.best_run_id

    second = run_iteration(method, manager, "batch-2")  # overfits: rejected
    assert second.start_run_id == first.best_run_id
    assert second.promotion is not None and second.promotion.outcome == Outcome.REJECTED
    assert second.promotion.champion_run_id == first.best_run_id
    assert second.promotion.holdout < second.promotion.champion_holdout  # type: ignore[operator]
    assert second.deleted_iteration_id is None  # batch-1 holds the champion: kept
    assert manager.promotion.champion().run_id == first.best_run_id  # type: ignore[union-attr]

    third = run_iteration(method, manager, "batch-3")
    # from the champion, with the last iteration's (the rejected one's) top params
    assert third.start_run_id == first.best_run_id
    assert [r.params for r in third.runs] == [
        next(r.params for r in second.runs if r.run_id == second.best_run_id),
        next(r.params for r in second.runs if r.run_id != second.best_run_id),
    ]
    assert third.promotion is not None and third.promotion.outcome == Outcome.PROMOTED
    assert third.deleted_iteration_id == second.experiment_id  # no alias on it
    left = {e.experiment_id for e in manager.get_experiments()}
    assert left == {first.experiment_id, third.experiment_id}  # batch-1: the rollback model

    again = run_iteration(method, manager, "batch-3")  # a repeated completion
    assert again.resumed and again.promotion == third.promotion
    task_result = second.to_json()  # what the task service stores as the task's result
    assert task_result["promotion"]["outcome"] == "rejected"
    assert task_result["promotion"]["holdout"] == second.promotion.holdout

    record = manager.lineage.record_of(second.experiment_id)
    assert record is not None and record.decision == "rejected"
    assert record.start_run_id == first.best_run_id and len(record.runs) == 2


# fifty iterations cost ~4x on the remote leg; `make test` runs them on the reference leg, the
# remote one runs under `make test-all` (the store contracts cover S3 and the server in full)
@pytest.mark.parametrize(
    "backend",
    ["local-sqlite", pytest.param("s3-server", marks=pytest.mark.all_legs)],
    indirect=True,
)
def test_fifty_iterations_with_deletion_then_lineage_back_to_the_initial_model(
    backend: BackendUnderTest, tmp_path: Path
) -> None:
    overfit = {f"batch-{n:02d}" for n in range(1, 51) if n % 4 == 0}
    method = HoldoutToy([ToyParams(lr=0.01, quality=0.5)], overfit=overfit)
    manager = _connect(backend, method, n_top_runs=1)
    results = [run_iteration(method, manager, f"batch-{n:02d}") for n in range(1, 51)]
    outcomes = [r.promotion.outcome for r in results]  # type: ignore[union-attr]
    assert outcomes.count(Outcome.REJECTED) == len(overfit)
    # every old iteration is gone but the champion's and the rollback model's
    left = {e.experiment_id for e in manager.get_experiments()}
    assert left == {results[-1].experiment_id, results[-2].experiment_id}
    assert len(manager.lineage.records()) == 50

    found = cli_json(backend, method, "lineage")  # @champion
    chain = found["chain"]
    assert found["run_id"] == results[-1].best_run_id and found["reaches_initial"]
    promoted = [r for r in results if r.promotion.outcome == Outcome.PROMOTED]  # type: ignore[union-attr]
    assert [c["best_run_id"] for c in chain] == [r.best_run_id for r in reversed(promoted)]
    assert chain[-1]["batch_id"] == "batch-01"
    assert chain[-1]["start_run_id"] == manager.get_initial_model_run_id()
    assert all("state_dict.pt" in c["model_files"] for c in chain)
    # the champion's files, downloaded through the registry, are those its record hashed
    with backend.mlflow_env():
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{method.name}@champion"))
    hashed = {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }
    assert hashed == chain[0]["model_files"]

    rejected = results[3]  # batch-04: its chain runs through the champion it started from
    found = cli_json(backend, method, "lineage", rejected.best_run_id or "")
    assert [c["batch_id"] for c in found["chain"]] == [
        "batch-04",
        "batch-03",
        "batch-02",
        "batch-01",
    ]

    status, out, err = cli(backend, method, "lineage", "--plot", str(tmp_path / "quality.png"))
    assert status == 0, err
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot of 50 iteration(s)" in out
    cli_json(backend, method, "lineage", "--plot", str(tmp_path / "quality.html"))
    page = (tmp_path / "quality.html").read_text()
    assert "<svg" in page
    assert all(f"<td>batch-{n:02d}</td>" in page for n in range(1, 51))
    assert page.count("<td>rejected</td>") == len(overfit)


def test_a_person_promotes_and_rolls_back_on_the_command_line(tmp_path: Path) -> None:
    leg = BackendUnderTest("local", str(tmp_path / "models"), fresh_sqlite_uri(tmp_path, "m.db"))
    sets = [ToyParams(lr=0.1, quality=0.5)]
    method = HoldoutToy(sets, overfit={"batch-2"})
    try:
        manager = _connect(leg, method)
        first = run_iteration(method, manager, "batch-1")
        second = run_iteration(method, manager, "batch-2")
        assert second.promotion.outcome == Outcome.REJECTED  # type: ignore[union-attr]

        shown = cli_json(leg, method, "champion")
        assert shown["model_uri"] == f"models:/{method.name}@champion"
        assert shown["champion"]["run_id"] == first.best_run_id
        assert shown["previous-champion"] is None
        status, out, _ = cli(leg, method, "champion")
        assert status == 0 and f"models:/{method.name}@champion: version 1" in out

        decided = cli_json(leg, method, "promote", second.best_run_id or "", "--by", "alice")
        assert decided["outcome"] == "promoted" and decided["decided_by"] == "alice"
        shown = cli_json(leg, method, "champion")
        assert shown["champion"]["run_id"] == second.best_run_id
        assert shown["champion"]["promoted_by"] == "alice"
        assert shown["previous-champion"]["run_id"] == first.best_run_id

        back = cli_json(leg, method, "rollback", "--by", "bob", "--reason", "regression")
        assert back["outcome"] == "rolled_back" and back["run_id"] == first.best_run_id
        shown = cli_json(leg, method, "champion")
        assert shown["champion"]["run_id"] == first.best_run_id
        assert shown["champion"]["promoted_by"] == "bob"
        assert shown["champion"]["reason"] == "regression"

        status, out, _ = cli(leg, method, "lineage", "@previous-champion")
        assert status == 0 and "batch-2" in out and "rejected" in out
        status, _, err = cli(leg, method, "lineage", "no-such-run")
        assert status == 1 and "no lineage record knows run no-such-run" in err
    finally:
        leg.close_all()


# --------------------------------------------------------------------------- the webhook
class _Receiver(http.server.BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]]
    refuse_first: list[int]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((dict(self.headers), body))
        status = 503 if self.refuse_first and self.refuse_first.pop() else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[_Receiver]]]:
    handler = type("Handler", (_Receiver,), {"received": [], "refuse_first": [1]})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook?token=url-secret", handler
    server.shutdown()
    server.server_close()
    thread.join()


def test_the_webhook_is_signed_and_sent_once_per_promotion(
    tmp_path: Path, receiver: tuple[str, type[_Receiver]], caplog: pytest.LogCaptureFixture
) -> None:
    url, handler = receiver
    secret = "s3cret-hmac-key"
    leg = BackendUnderTest("local", str(tmp_path / "models"), fresh_sqlite_uri(tmp_path, "m.db"))
    method = HoldoutToy([ToyParams(lr=0.1, quality=0.5)], overfit={"batch-2"})
    promotion = PromotionConfig(webhook=Webhook(secret, url=url))
    caplog.set_level(logging.DEBUG)
    try:
        manager = _connect(leg, method, promotion=promotion)
        first = run_iteration(method, manager, "batch-1")
        assert len(handler.received) == 2  # a 503, retried: the same body and key
        (h1, b1), (h2, b2) = handler.received
        assert b1 == b2 and h1["X-Tracker-Idempotency-Key"] == h2["X-Tracker-Idempotency-Key"]
        assert h2["X-Tracker-Signature"] == signature(secret, b2)
        body = json.loads(b2)
        assert body["event"] == "promoted" and body["run_id"] == first.best_run_id
        assert body["model_uri"] == f"models:/{method.name}@champion"
        assert body["idempotency_key"] == h2["X-Tracker-Idempotency-Key"]

        run_iteration(method, manager, "batch-1")  # a repeated completion: nothing sent
        run_iteration(method, manager, "batch-2")  # rejected: nothing sent
        assert len(handler.received) == 2
        third = run_iteration(method, manager, "batch-3")
        assert len(handler.received) == 3
        body = json.loads(handler.received[-1][1])
        assert body["run_id"] == third.best_run_id and body["version"] == "2"
        assert body["idempotency_key"] != json.loads(b2)["idempotency_key"]
    finally:
        leg.close_all()
    assert secret not in caplog.text and "url-secret" not in caplog.text


def test_the_champion_run_loads_with_torch(tmp_path: Path) -> None:
    """What ``mgr.download_champion_model()`` gives is the champion's weights."""
    leg = BackendUnderTest("local", str(tmp_path / "models"), fresh_sqlite_uri(tmp_path, "m.db"))
    method = HoldoutToy([ToyParams(lr=0.25, quality=0.5)], overfit={"batch-2"})
    try:
        manager = _connect(leg, method)
        run_iteration(method, manager, "batch-1")
        run_iteration(method, manager, "batch-2")  # rejected: the champion is batch-1's
        model = manager.download_champion_model()
        champion = model.state_dict() if hasattr(model, "state_dict") else model
        start = method.initial_model().state_dict()
        assert all(torch.equal(champion[k], v + 0.25) for k, v in start.items())
    finally:
        leg.close_all()


def test_the_webhook_can_be_a_command_given_the_signed_body(tmp_path: Path) -> None:
    """A command gets the body on its standard input, the signature and the idempotency key in
    its environment; a failing first attempt is retried."""
    import sys

    out = tmp_path / "received"
    script = (
        "import os, pathlib, sys\n"
        f"out = pathlib.Path({str(out)!r})\n"
        "tries = out.with_suffix('.tries')\n"
        "n = int(tries.read_text()) if tries.exists() else 0\n"
        "tries.write_text(str(n + 1))\n"
        "if n == 0: sys.exit(7)\n"
        "out.write_bytes(sys.stdin.buffer.read())\n"
        "out.with_suffix('.sig').write_text(os.environ['TRACKER_SIGNATURE'])\n"
    )
    secret = "command-secret"
    leg = BackendUnderTest("local", str(tmp_path / "models"), fresh_sqlite_uri(tmp_path, "m.db"))
    method = HoldoutToy([ToyParams(lr=0.1, quality=0.5)])
    hook = Webhook(secret, command=[sys.executable, "-c", script])
    try:
        manager = _connect(leg, method, promotion=PromotionConfig(webhook=hook))
        first = run_iteration(method, manager, "batch-1")
    finally:
        leg.close_all()
    body = out.read_bytes()
    assert json.loads(body)["run_id"] == first.best_run_id
    assert out.with_suffix(".sig").read_text() == signature(secret, body)
    assert out.with_suffix(".tries").read_text() == "2"
