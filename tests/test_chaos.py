"""The chaos soak's machinery, kept alive in CI: its fault proxy, and one short trial.

The full soak is ``make chaos`` (``python -m chaos``, see ``chaos/README.md``); here one short
trial (3 workers, a few kills, 20% faults at the proxies) runs end to end and must hold every
invariant, so a change that breaks the soak, or the invariants, fails ``make test``.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import attrs
import pytest
from _s3gcs_fixtures import *  # noqa: F403 - the fixtures
from _s3gcs_fixtures import artifact_leg

import tracker_core
from chaos import workload as W
from chaos.journal import Journal
from chaos.kills import Killer, arm
from chaos.proxy import FaultPlan, FaultProxy, ProxySet
from chaos.report import load_results, table
from chaos.settings import Sizes
from chaos.soak import run_soak
from chaos.worker import S3_PART_SIZE
from tracker_core import (
    ExperimentsManager,
    FineTuningIteration,
    FineTuningParams,
    MetricValue,
)
from tracker_core.errors import ArtifactStoreError
from tracker_core.fsspec_store import FsspecArtifactStore
from tracker_core.methods import FineTuningMethod
from tracker_core.testing import servers
from tracker_core.testing.faults import FaultyProxy
from tracker_core.testing.harness import fresh_sqlite_uri


class _Echo(BaseHTTPRequestHandler):
    """Answers every request with its own body; counts what it served."""

    protocol_version = "HTTP/1.1"
    served: list[bytes] = []

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.served.append(body)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def echo() -> Iterator[str]:
    _Echo.served = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _proxy(proxies: ProxySet, upstream: str, kind: str | None, rate: float = 1.0) -> FaultProxy:
    weights = {kind: 1.0} if kind else {}
    plan = FaultPlan(rate=rate if kind else 0.0, weights=weights, hang_seconds=5)
    return proxies.add(FaultProxy(kind or "pass", upstream, flavor="s3", seed=1, plan=plan))


def _put(port: int, body: bytes, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("PUT", "/x", body=body, headers={"Expect": "100-continue"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_proxy_passes_requests_through_on_one_keep_alive_connection(echo: str) -> None:
    with ProxySet() as proxies:
        proxy = _proxy(proxies, echo, None)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        for body in (b"one", b"two" * 100_000):
            conn.request("PUT", "/x", body=body)
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, body)
        conn.close()
        assert proxy.snapshot()["pass"] == 2
    assert _Echo.served == [b"one", b"two" * 100_000]


@pytest.mark.parametrize(
    ("kind", "applied"),
    [("reset", False), ("reset_after", True), ("timeout", False), ("timeout_after", True)],
)
def test_proxy_breaks_connections_before_or_after_the_server_applied_the_request(
    echo: str, kind: str, applied: bool
) -> None:
    with ProxySet() as proxies:
        proxy = _proxy(proxies, echo, kind)
        with pytest.raises(
            (ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException)
        ):
            _put(proxy.port, b"payload", timeout=1.0)
        assert proxy.snapshot()[kind] == 1
    assert _Echo.served == ([b"payload"] if applied else [])


@pytest.mark.parametrize(
    ("kind", "status", "applied"), [("http_500", 500, True), ("http_503", 503, False)]
)
def test_proxy_answers_server_errors(echo: str, kind: str, status: int, applied: bool) -> None:
    with ProxySet() as proxies:
        proxy = _proxy(proxies, echo, kind)
        code, body = _put(proxy.port, b"payload")
    assert code == status
    assert b"<Code>" in body  # the S3 flavour of an error
    assert _Echo.served == ([b"payload"] if applied else [])


def test_proxy_fault_rate_is_seeded(echo: str) -> None:
    counts = []
    for _ in range(2):
        with ProxySet() as proxies:
            proxy = _proxy(proxies, echo, "http_503", rate=0.2)
            codes = [_put(proxy.port, b"x")[0] for _ in range(60)]
            counts.append(codes)
    assert counts[0] == counts[1]
    assert 3 <= counts[0].count(503) <= 25


@pytest.mark.timeout(900)
def test_short_chaos_trial_holds_every_invariant(tmp_path: Path) -> None:
    if not servers.postgres_installed():
        pytest.skip("PostgreSQL's server binaries (initdb, postgres) are not installed here")
    results, seconds = run_soak([1], tmp_path / "chaos", Sizes.quick())
    text = table(results, seconds)
    print(text)
    (result,) = results
    assert sum(result.kills.values()) >= 1
    assert sum(sum(v.values()) - v["requests"] - v["pass"] for v in result.faults.values()) > 0
    failed = {k: c.problems for k, c in result.checks.items() if c.held is False}
    assert not failed, f"seed 1 failed (data in {result.kept_at}):\n{text}\n{failed}"
    # a passing trial leaves only its result, from which --report rebuilds the same table
    assert [p.name for p in (tmp_path / "chaos" / "trial-1").iterdir()] == ["result.json"]
    (reported,) = load_results(tmp_path / "chaos")
    assert reported.kept_at is None
    for name in ("seed", "storage", "keep", "shape", "runs", "kills", "armed", "faults", "retried"):
        assert getattr(reported, name) == getattr(result, name), name
    assert {k: c.held for k, c in reported.checks.items()} == {
        k: c.held for k, c in result.checks.items()
    }


# ---------------------------------------------------------------------- the soak's kill points
class _Killed(Exception):
    """Raised where the armed worker would ``kill -9`` itself."""


@pytest.mark.parametrize(
    ("storage", "large"), [("local", False), ("s3", False), ("s3", True), ("gcs", False)]
)
def test_the_upload_kill_point_fires_with_the_upload_in_flight(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    storage: str,
    large: bool,
) -> None:
    """Two 20-seed runs' tables showed ``save_model.upload`` armed and never hit: on S3 and
    GCS the store awaits the filesystem's ``_put_file``, which the worker did not wrap, and
    the large model (~9.8 MiB) went up as one ``PutObject`` (8 MiB parts). The soak now
    wraps ``_put_file`` and gives S3 5 MiB parts, as the soak's workers are configured."""
    uri, options = artifact_leg(request, storage, tmp_path, "m")
    if storage == "s3":
        assert options is not None
        options = {**options, "default_block_size": S3_PART_SIZE}
    if large:  # its weights file is at least two parts: a multipart upload
        assert W.LARGE_DIM**2 * 4 >= 2 * S3_PART_SIZE
    manager = tracker_core.connect(
        uri,
        tracking_uri=fresh_sqlite_uri(tmp_path),
        storage_options=options,
        main_metric=W.MAIN_METRIC,
        plugin_name="soak-kill-points",
        model_format="state_dict",
    )
    journal = Journal(tmp_path / "journal.jsonl")
    killer = Killer(journal, "save_model.upload")
    died: list[str] = []

    def die(point: str) -> None:
        died.append(point)
        raise _Killed(point)

    monkeypatch.setattr(killer, "die", die)
    arm(manager, killer, journal, "delete_previous_iteration")
    manager.set_iteration(FineTuningIteration(plugin_name="soak-kill-points", batch_id="b1"))
    params = W.SoakParams(worker=0, index=0, lr=0.1)
    manager.set_run(params)
    manager.save_metric(MetricValue(W.MAIN_METRIC, 0.5))
    with pytest.raises(ArtifactStoreError, match=r"_Killed: save_model\.upload"):
        manager.save_model(W.make_model(1, "b1", params, large))
    assert died and set(died) == {"save_model.upload"}
    manager.close()


# ---------------------------------------------------------------------- regressions the soak found
@attrs.frozen
class _Params(FineTuningParams):
    lr: float


def _tiny() -> Any:
    import torch

    return torch.nn.Linear(2, 2)


def _manager(tmp_path: Path) -> ExperimentsManager:
    return tracker_core.connect(
        str(tmp_path / "models"),
        tracking_uri=fresh_sqlite_uri(tmp_path),
        main_metric="score",
        plugin_name="soak-regression",
        model_format="state_dict",
        model_factory=_tiny,
        lease_seconds=2,  # a run nobody claimed yet counts as being created for this long
    )


def _iteration_with_a_model(manager: ExperimentsManager, batch: str, lr: float) -> None:
    manager.set_iteration(FineTuningIteration(plugin_name="soak-regression", batch_id=batch))
    with manager.run(_Params(lr=lr)):
        manager.save_metric(MetricValue("score", lr))
        assert manager.save_model(_tiny())


def test_workers_deleting_the_previous_iteration_at_once_all_succeed(tmp_path: Path) -> None:
    """Seed 1 (gcs, keep=1): every worker ends with delete_previous_iteration(); one that had
    listed the previous iteration's models when another deleted the iteration failed with
    "run ... must be in the 'active' state" instead of finding the work done."""
    first, second = _manager(tmp_path), _manager(tmp_path)
    _iteration_with_a_model(first, "b0", 0.1)
    _iteration_with_a_model(first, "b1", 0.2)
    second.set_iteration(FineTuningIteration(plugin_name="soak-regression", batch_id="b1"))
    previous = second.get_previous_iteration_id()
    assert previous is not None
    store = second.tracking.inner
    raced = []

    class OtherWorkerFirst:
        """The second worker's store: the first worker deletes the iteration just before the
        second one unmarks a model of it."""

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def log_batch(
            self, run_id: str, metrics: Any = (), params: Any = None, tags: Any = None
        ) -> None:
            if (tags or {}).get("tracker.model_deleted") == "true" and not raced:
                raced.append(run_id)
                first.delete_previous_iteration()
            store.log_batch(run_id, metrics, params, tags)

    second.tracking.wrap(lambda _: OtherWorkerFirst())
    second.delete_previous_iteration()
    assert raced
    gone = second.get_experiment(previous)
    assert gone is not None and gone.lifecycle_stage == "deleted"
    assert second.get_best_current_run_id()[0] is not None


def test_upload_over_a_folder_that_vanished_meanwhile_succeeds(tmp_path: Path) -> None:
    """Seed 1 (gcs, keep=1): a retried upload found the model folder (an earlier attempt had
    written part of it), and gcsfs's recursive delete raised FileNotFoundError because the
    earlier attempt's delete had landed meanwhile; the upload failed for good."""
    import fsspec

    fs = FaultyProxy(fsspec.filesystem("file", auto_mkdir=True))
    store = FsspecArtifactStore(fs, f"file://{tmp_path / 'root'}")
    target = tmp_path / "root" / "run" / "model"
    target.mkdir(parents=True)
    (target / "old.bin").write_bytes(b"old")
    fs.fail("rm", error=FileNotFoundError(str(target)))  # as gcsfs: "nothing got deleted"
    source = tmp_path / "staging"
    source.mkdir()
    (source / "state_dict.pt").write_bytes(b"new")
    store.upload_dir(source, f"file://{target}")
    assert (target / "state_dict.pt").read_bytes() == b"new"
    assert fs.calls["rm"] == 1


def test_a_lost_create_run_answer_leaves_no_run_without_its_params(tmp_path: Path) -> None:
    """Seed 1 (gcs, keep=1): the answer to create_run was lost (the run was created), the
    retry created a twin, the twin was deleted as the younger one, and the older run - the
    one kept - never got its params: get_top_params could not rebuild them."""
    from tracker_core.errors import TransientError

    manager = _manager(tmp_path)
    manager.set_iteration(FineTuningIteration(plugin_name="soak-regression", batch_id="b1"))
    faulty = manager.tracking.wrap(FaultyProxy)
    faulty.fail("create_run", error=TransientError("answer lost"), after_call=True)
    params = _Params(lr=0.3)
    with manager.run(params, wait=30):
        manager.save_metric(MetricValue("score", 0.3))
    assert faulty.calls["create_run"] == 2
    (run,) = manager.get_runs(manager.current_experiment_id or "")
    assert _Params.from_mlflow(run.params) == params


def test_a_run_whose_creator_died_before_logging_params_gets_them_on_resume(tmp_path: Path) -> None:
    """Seed 1: a worker killed between create_run and logging the params (kill point
    set_run.after_create) left a run that resumed, finished, and never had its params."""
    manager = _manager(tmp_path)
    manager.set_iteration(FineTuningIteration(plugin_name="soak-regression", batch_id="b1"))
    experiment_id = manager.current_experiment_id or ""
    params = _Params(lr=0.4)
    manager.tracking.create_run(experiment_id, params.id, {"tracker.plugin": "soak-regression"})
    with manager.run(params, wait=30):  # the dead creator's run, resumed
        manager.save_metric(MetricValue("score", 0.4))
    (run,) = manager.get_runs(experiment_id)
    assert _Params.from_mlflow(run.params) == params


def test_a_lease_claimed_slowly_is_renewed_before_it_expires() -> None:
    """Seed 4 (s3, keep=1, sequence): the claim of a lease took most of its TTL (its request
    was retried after timeouts), and the heartbeat's first renewal came a full interval after
    the claim returned - past the lease's expiry, when a waiting worker had taken the run
    over. The holder failed with LeaseLostError."""
    import time

    from tracker_core.clock import SYSTEM_CLOCK
    from tracker_core.lease import Heartbeat

    now_ms = SYSTEM_CLOCK.now_ms
    ttl = 1.5
    expires = now_ms() + 200  # the claim's retries used all but 0.2 s of the lease
    renewals: list[bool] = []

    def renew(new_expiry: int) -> bool:
        in_time = now_ms() < expires or bool(renewals)  # once expired, another worker takes it
        renewals.append(in_time)
        return in_time

    heartbeat = Heartbeat(renew, ttl, expires)
    try:
        time.sleep(1.0)
        assert renewals and renewals[0] is True
        assert not heartbeat.lost
    finally:
        heartbeat.stop()


class _Method(FineTuningMethod[_Params]):
    name = "soak-regression"
    params_type = _Params
    main_metric = "score"
    model_format = "state_dict"
    model_factory = staticmethod(_tiny)
    interrupt_at: float | None = None

    def initial_model(self) -> Any:
        return _tiny()

    def initial_params(self, seed: int | None = None) -> list[_Params]:
        return [_Params(lr=0.1), _Params(lr=0.2)]

    def train(self, model: Any, params: _Params, manager: ExperimentsManager) -> Any:
        if params.lr == self.interrupt_at:
            raise KeyboardInterrupt  # the worker dies in this run
        return _tiny()

    def evaluate(self, model: Any, params: _Params, manager: ExperimentsManager) -> float:
        return params.lr


def test_the_driver_resumes_an_iteration_holding_a_run_without_params(tmp_path: Path) -> None:
    """Seed 4 (s3, keep=1, sequence): a worker killed between creating a run and logging its
    params (kill point set_run.after_create) left a run the resuming driver could not read
    (InvalidParamsError), so every restart of that worker failed at once."""
    from tracker_core.finetune import run_iteration

    manager = _manager(tmp_path)
    dying = _Method()
    dying.interrupt_at = 0.1
    with pytest.raises(KeyboardInterrupt):
        run_iteration(dying, manager, "b1")
    experiment_id = manager.get_experiments()[0].experiment_id
    second = _Params(lr=0.2)
    manager.tracking.create_run(experiment_id, second.id, {"tracker.plugin": "soak-regression"})

    result = run_iteration(_Method(), manager, "b1")

    assert result.resumed
    assert sorted(r.status.value for r in result.runs) == ["FINISHED", "FINISHED"]
    runs = manager.get_runs(experiment_id)
    assert sorted(_Params.from_mlflow(r.params).lr for r in runs) == [0.1, 0.2]


def test_download_last_model_while_another_worker_deletes_that_iteration(tmp_path: Path) -> None:
    """Seed 2 (s3, keep=3): a restarted worker picked the previous iteration's best model
    while another worker was deleting that iteration; the model was unmarked before it was
    read and download_last_model raised ModelNotFoundError instead of picking again."""
    import torch

    first, second = _manager(tmp_path), _manager(tmp_path)
    initial = _tiny()
    first.upload_initial_model(initial)
    _iteration_with_a_model(first, "b0", 0.1)
    _iteration_with_a_model(first, "b1", 0.2)
    previous = first.get_previous_iteration_id()
    assert previous is not None
    second.set_iteration(FineTuningIteration(plugin_name="soak-regression", batch_id="b1"))
    store = second.artifacts.inner

    class CleanedUpMeanwhile:
        """The second worker's artifact store: the first worker deletes the previous
        iteration right after the second one picked its best model, before it is read."""

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def download_dir(self, *args: Any, **kwargs: Any) -> Any:
            if first.get_experiment(previous).lifecycle_stage == "active":  # type: ignore[union-attr]
                first.delete_iteration(previous)
            return store.download_dir(*args, **kwargs)

    second.artifacts.wrap(lambda _: CleanedUpMeanwhile())
    model = second.download_last_model()
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in initial.state_dict().items())


def test_a_twin_run_left_by_a_killed_creator_is_deleted_on_resume(tmp_path: Path) -> None:
    """Seed 3 (gcs, keep=3): a lost create_run answer made the retry create a twin, and the
    worker was killed before deleting it (kill point set_run.after_create); the twin stayed a
    RUNNING run without params forever, so the iteration never counted as finished."""
    import time

    manager = _manager(tmp_path)
    manager.set_iteration(FineTuningIteration(plugin_name="soak-regression", batch_id="b1"))
    experiment_id = manager.current_experiment_id or ""
    params = _Params(lr=0.5)
    tags = {"tracker.plugin": "soak-regression"}
    older = manager.tracking.create_run(experiment_id, params.id, tags)  # the lost answer
    manager.tracking.create_run(experiment_id, params.id, tags)  # the retry's twin
    time.sleep(2.2)  # both past their creation grace (lease_seconds=2): the creator is dead
    with manager.run(params, wait=30) as run:
        manager.save_metric(MetricValue("score", 0.5))
    assert run.run_id == older.run_id
    assert [r.run_id for r in manager.get_runs(experiment_id)] == [older.run_id]
    assert not manager.has_unfinished_runs(experiment_id)


def test_two_workers_logging_the_same_missing_params_at_once_both_go_on(tmp_path: Path) -> None:
    """Seed 4 (s3, keep=1, sequence, full trial): two driver workers resumed a run its creator
    left without params and logged them at the same moment; MLflow on PostgreSQL refused the
    slower insert (UniqueViolation on param_pk, answered as BAD_REQUEST) and that worker failed,
    though the params it wanted were there."""
    from tracker_core.errors import TrackingStoreError

    manager = _manager(tmp_path)
    manager.set_iteration(FineTuningIteration(plugin_name="soak-regression", batch_id="b1"))
    experiment_id = manager.current_experiment_id or ""
    params = _Params(lr=0.6)
    manager.tracking.create_run(experiment_id, params.id, {"tracker.plugin": "soak-regression"})
    faulty = manager.tracking.wrap(FaultyProxy)
    duplicate = TrackingStoreError('BAD_REQUEST: duplicate key value violates "param_pk"')
    faulty.fail("log_batch", error=duplicate, after_call=True)  # the other worker's insert won
    with manager.run(params, wait=30):
        manager.save_metric(MetricValue("score", 0.6))
    (run,) = manager.get_runs(experiment_id)
    assert _Params.from_mlflow(run.params) == params
    assert run.status.value == "FINISHED"
