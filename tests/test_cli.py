"""The ``tracker-core`` command line against a tracked store, on every leg of the matrix."""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from test_finetune import SETS, ToyMethod, tiny_model

from tracker_core.cli import main
from tracker_core.finetune import IterationResult, run_iteration
from tracker_core.manager import ExperimentsManager
from tracker_core.methods import connect_kwargs
from tracker_core.testing.harness import BackendUnderTest, fresh_sqlite_uri


@attrs.frozen
class Tracked:
    backend: BackendUnderTest
    method: ToyMethod
    manager: ExperimentsManager
    result: IterationResult

    def cli(
        self,
        *argv: str,
        plugin: bool = True,
        metric: bool = True,
        artifact_uri: str | None = None,
        tracking_uri: str | None = None,
    ) -> tuple[int, str, str]:
        """Run the CLI in-process on this store: (exit status, stdout, stderr)."""
        options = ["--tracking-uri", tracking_uri or self.backend.tracking_uri]
        options += ["--artifact-uri", artifact_uri or self.backend.artifact_root]
        if plugin:
            options += ["--plugin", self.method.name]
        if metric:
            options += ["--metric", self.method.main_metric]
        out, err = io.StringIO(), io.StringIO()
        with self.backend.mlflow_env():
            status = main([*options, *argv], stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def json(self, *argv: str, **kwargs: Any) -> Any:
        status, out, err = self.cli("--json", *argv, **kwargs)
        assert status == 0, err
        return json.loads(out)

    def argv(self) -> list[str]:
        """Options that point a CLI subprocess at this store."""
        return [
            *("--tracking-uri", self.backend.tracking_uri),
            *("--artifact-uri", self.backend.artifact_root),
            *("--plugin", self.method.name, "--metric", self.method.main_metric),
        ]


def _track(backend: BackendUnderTest) -> Tracked:
    method = ToyMethod(SETS[:3])
    manager = backend.connect(**connect_kwargs(method))
    result = run_iteration(method, manager, "batch-1")
    return Tracked(backend, method, manager, result)


@pytest.fixture
def tracked(backend: BackendUnderTest) -> Iterator[Tracked]:
    store = _track(backend)
    yield store
    store.manager.close()


@pytest.fixture
def local_tracked(tmp_path: Path) -> Iterator[Tracked]:
    """A store of this test's own: SQLite and a folder, for tests that change its files or
    run the CLI as a real process."""
    folder = tmp_path / "project"
    folder.mkdir()
    leg = BackendUnderTest("local", str(folder / "models"), fresh_sqlite_uri(folder))
    store = _track(leg)
    yield store
    store.manager.close()


CLI = str(Path(sys.executable).parent / "tracker-core")


def test_iterations_runs_best(tracked: Tracked) -> None:
    result = tracked.result
    assert result.best_run_id is not None
    status, out, err = tracked.cli("iterations")
    assert status == 0 and err == ""
    assert result.iteration_name in out and "batch-1" in out

    listed = tracked.json("iterations")
    assert [i["experiment_id"] for i in listed] == [result.experiment_id]
    assert listed[0]["batch_id"] == "batch-1" and listed[0]["start_run_id"] == result.start_run_id

    runs = tracked.json("runs", result.experiment_id)
    assert runs["name"] == result.iteration_name
    by_id = {r["run_id"]: r for r in runs["runs"]}
    assert set(by_id) == {r.run_id for r in result.runs}
    for run in result.runs:
        row = by_id[run.run_id]
        assert row["status"] == "FINISHED"
        assert row["params"] == run.params.to_dict()  # typed back: floats, not strings
        assert row["metrics"]["quality"] == pytest.approx(run.metric)
        assert row["has_model"] == run.has_model
    assert runs["runs"][0]["run_id"] == result.best_run_id  # best first
    # an iteration is also found by its name, and (with --plugin) by its batch id
    assert tracked.json("runs", result.iteration_name)["experiment_id"] == result.experiment_id
    assert tracked.json("runs", "batch-1")["experiment_id"] == result.experiment_id
    status, out, _ = tracked.cli("runs", "batch-1")
    assert status == 0 and result.best_run_id in out and "quality" in out

    best = tracked.json("best", "batch-1")
    assert best["run_id"] == result.best_run_id
    assert best["value"] == pytest.approx(result.best_metric)
    assert best["model_uri"] == result.best_model_uri
    status, out, _ = tracked.cli("best", result.experiment_id)
    assert status == 0 and result.best_run_id in out and str(result.best_model_uri) in out


def test_download(tracked: Tracked, tmp_path: Path) -> None:
    import torch

    result = tracked.result
    assert result.best_run_id is not None
    data = tracked.json("download", "batch-1", str(tmp_path / "best"))
    assert data["run_id"] == result.best_run_id and data["files"]
    state = torch.load(tmp_path / "best" / "state_dict.pt", weights_only=True)
    model = tiny_model()
    model.load_state_dict(state)  # the files are a loadable model

    status, out, err = tracked.cli("download", result.best_run_id, str(tmp_path / "by-run"))
    assert status == 0 and err == "" and result.best_run_id in out
    assert (tmp_path / "by-run" / "state_dict.pt").is_file()

    # a run without a model: a clear failure, exit status 1
    other = next(r for r in result.runs if not r.has_model)
    status, out, err = tracked.cli("download", other.run_id, str(tmp_path / "none"))
    assert status == 1 and out == ""
    assert err.startswith("tracker-core: error:") and err.count("\n") == 1


def test_errors_and_exit_status(tracked: Tracked) -> None:
    status, out, err = tracked.cli("runs", "no-such-iteration")
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and "no-such-iteration" in err and "Traceback" not in err
    status, _, err = tracked.cli("--json", "best", "999999999")
    assert status == 1 and "999999999" in err and err.count("\n") == 1
    status, _, err = tracked.cli("--debug", "runs", "no-such-iteration")
    assert status == 1 and "Traceback" in err
    # usage errors: exit status 2
    assert tracked.cli()[0] == 2  # no command
    assert tracked.cli("frobnicate")[0] == 2
    assert tracked.cli("runs")[0] == 2  # missing argument
    status, _, err = tracked.cli("best", "batch-1", metric=False)
    assert status == 2 and "--metric is required" in err
    status, _, err = tracked.cli("iterations", plugin=False)
    assert status == 2 and "--plugin is required" in err


def _plant(tracked: Tracked, uri: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "weights.bin").write_bytes(b"\0" * 128)
        tracked.manager.artifacts.upload_dir(Path(tmp), uri)
    assert tracked.manager.artifacts.exists(uri)


def test_gc_removes_orphans_and_keeps_marked_models(tracked: Tracked) -> None:
    manager, result = tracked.manager, tracked.result
    store = manager.artifacts
    # a finished run whose model was written but never marked (a crash between the two steps)
    unmarked = next(r for r in result.runs if not r.has_model)
    run = manager.get_run_by_id(unmarked.run_id)
    assert run is not None
    unmarked_uri = f"{run.artifact_uri.rstrip('/')}/model"
    # a model folder no run references at all
    stray_uri = store.join("stray-experiment", "0" * 32, "artifacts", "model")
    _plant(tracked, unmarked_uri)
    _plant(tracked, stray_uri)
    kept = [result.best_model_uri]
    initial = manager.get_run_by_id(manager.get_initial_model_run_id() or "")
    assert initial is not None
    kept.append(initial.tags["tracker.model_uri"])

    dry = tracked.json("gc", plugin=False, metric=False)
    assert dry["dry_run"] is True
    assert sorted(o["uri"] for o in dry["orphans"]) == sorted([unmarked_uri, stray_uri])
    assert store.exists(unmarked_uri) and store.exists(stray_uri)  # nothing deleted
    status, out, _ = tracked.cli("gc", plugin=False, metric=False)
    assert status == 0 and "would delete" in out and stray_uri in out

    deleted = tracked.json("gc", "--delete", plugin=False, metric=False)
    assert deleted["dry_run"] is False
    assert all(o["deleted"] for o in deleted["orphans"]) and len(deleted["orphans"]) == 2
    assert not store.exists(unmarked_uri) and not store.exists(stray_uri)
    # and no empty folder is left behind: neither <run>/artifacts nor <run>
    assert not store.exists(run.artifact_uri) and not store.exists(unmarked_uri.rsplit("/", 2)[0])
    for uri in kept:  # every marked model is still there, and still downloadable
        assert uri and store.exists(uri)
    assert result.best_run_id is not None
    assert manager.download_model_by_run_id(result.best_run_id) is not None
    assert manager.download_initial_model() is not None
    assert tracked.json("gc", plugin=False, metric=False)["orphans"] == []


# the method the `run` command loads by module:attr path; its name is set per test
RUN_METHOD_NAME = "unset"


def make_run_method() -> ToyMethod:
    return ToyMethod(SETS[:2], name=RUN_METHOD_NAME)


def test_run_command(
    backend: BackendUnderTest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    probe = ToyMethod(SETS[:2])
    monkeypatch.setattr(sys.modules[__name__], "RUN_METHOD_NAME", probe.name)
    argv = ["--tracking-uri", backend.tracking_uri, "--artifact-uri", backend.artifact_root]
    spec = f"{__name__}:make_run_method"
    out, err = io.StringIO(), io.StringIO()
    with backend.mlflow_env():
        status = main([*argv, "--json", "run", spec, "--batch-id", "b1"], stdout=out, stderr=err)
    assert status == 0, err.getvalue()
    data = json.loads(out.getvalue())
    assert data["plugin"] == probe.name and len(data["runs"]) == 2
    assert data["started_from_initial"] and data["best_model_uri"]
    assert {r["status"] for r in data["runs"]} == {"FINISHED"}

    out, err = io.StringIO(), io.StringIO()
    status = main([*argv, "run", "no-such-method", "--batch-id", "b1"], stdout=out, stderr=err)
    assert status == 1 and "no fine-tuning method named 'no-such-method'" in err.getvalue()


def test_python_m_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tracker_core", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for command in ("iterations", "runs", "best", "download", "run", "gc", "verify"):
        assert command in done.stdout


# ---------------------------------------------------------------------- reads create nothing
READ_COMMANDS = {
    "iterations": ["--plugin", "p", "iterations"],
    "runs": ["runs", "batch-1"],
    "best": ["--metric", "m", "best", "1"],
    "download": ["download", "0" * 32, "dest"],
    "gc": ["gc"],
    "gc --delete": ["gc", "--delete"],
    "verify": ["verify"],
    "verify --unmark": ["verify", "--unmark"],
}


@pytest.mark.parametrize("command", list(READ_COMMANDS))
def test_reads_without_a_database_fail_and_create_nothing(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a folder with no tracking database (the defaults: sqlite:///mlflow.db, ./mlartifacts)
    every command but `run` fails in one line saying so, and creates no file or folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for argv in (["--json", *READ_COMMANDS[command]], READ_COMMANDS[command]):
        out, err = io.StringIO(), io.StringIO()
        status = main(argv, stdout=out, stderr=err)
        assert status == 1 and out.getvalue() == ""
        line = err.getvalue()
        assert line.count("\n") == 1 and line.startswith("tracker-core: error:")
        assert f"no tracking database at {tmp_path / 'mlflow.db'}" in line
        assert "--tracking-uri" in line and "MLFLOW_TRACKING_URI" in line
        assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlartifacts, no dest


def test_reads_refuse_files_that_are_not_tracking_databases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()  # what an interrupted first start may leave
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    before = {p: p.read_bytes() for p in (empty, other)}
    missing_dir = tmp_path / "no-such-dir" / "mlflow.db"
    cases = {empty: "the file is empty", other: "not MLflow's", missing_dir: "no such file"}
    for path, reason in cases.items():
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")  # the default of the CLI
        out, err = io.StringIO(), io.StringIO()
        status = main(["--artifact-uri", str(tmp_path / "models"), "gc"], stdout=out, stderr=err)
        assert status == 1 and f"no tracking database at {path}" in err.getvalue()
        assert reason in err.getvalue() and err.getvalue().count("\n") == 1
    assert {p: p.read_bytes() for p in (empty, other)} == before  # nothing migrated into them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db", "other.db"]


def _file_modes_bind() -> dict[str, Any]:
    """``subprocess`` options under which this process's children obey file modes.

    Not root: nothing to do. Root ignores file modes through three capabilities
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER); the child drops them from its
    bounding set before exec, so it runs as uid 0 without them: a 0444 file owned by root is
    read-only to it. (Running as ``nobody`` would do too, but the interpreter may live where
    ``nobody`` cannot reach it, such as /root/.pyenv.)
    """
    if os.geteuid() != 0:
        return {}

    def drop_capabilities() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_capbset_drop = 24
        for capability in (1, 2, 3):  # DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER
            if libc.prctl(pr_capbset_drop, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    return {"preexec_fn": drop_capabilities}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_only_database_serves_reads_and_refuses_writes(local_tracked: Tracked) -> None:
    tracking = local_tracked.backend.tracking_uri
    db = Path(tracking[len("sqlite:///") :])
    db.chmod(0o444)
    digest = _sha(db)
    options = _file_modes_bind()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("MLFLOW_TRACKING_URI", None)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CLI, *local_tracked.argv(), *argv],
            capture_output=True, text=True, timeout=300, env=env, check=False, **options,
        )  # fmt: skip

    # the test means something only if this process really cannot write the file
    probe = subprocess.run(
        [sys.executable, "-c", f"open({str(db)!r}, 'ab')"],
        capture_output=True, text=True, timeout=120, check=False, **options,
    )  # fmt: skip
    assert probe.returncode != 0 and "PermissionError" in probe.stderr

    result = local_tracked.result
    listed = run("--json", "iterations")
    assert listed.returncode == 0, listed.stderr
    assert [i["experiment_id"] for i in json.loads(listed.stdout)] == [result.experiment_id]
    best = run("--json", "best", "batch-1")
    assert best.returncode == 0, best.stderr
    assert json.loads(best.stdout)["run_id"] == result.best_run_id
    verify = run("verify")
    assert verify.returncode == 0, verify.stderr

    # a write fails at once (no retries) with a typed, one-line error
    write = run("run", "test_cli:make_run_method", "--batch-id", "b2")
    assert write.returncode == 1 and write.stdout == ""
    assert write.stderr.startswith("tracker-core: error:") and write.stderr.count("\n") == 1
    assert "readonly database" in write.stderr and "gave up" not in write.stderr
    assert _sha(db) == digest


# ---------------------------------------------------------------------- missing roots
def _missing_bucket(root: str) -> tuple[str, str]:
    """``(a URI in a bucket that does not exist, that bucket)`` on the store's endpoint."""
    scheme, _ = root.split("://", 1)
    bucket = f"missing-{uuid.uuid4().hex[:12]}"
    return f"{scheme}://{bucket}/models", bucket


def test_gc_and_verify_against_a_missing_root(tracked: Tracked, tmp_path: Path) -> None:
    """A missing bucket is an error naming it; a missing prefix or local folder holds
    nothing to collect (the first write creates it), and gc does not create it."""
    root = tracked.backend.artifact_root
    if "://" in root:  # an object store: s3://bucket/models, gs://bucket/models
        uri, bucket = _missing_bucket(root)
        for argv in (["gc"], ["--json", "gc", "--delete"], ["verify"], ["verify", "--unmark"]):
            status, out, err = tracked.cli(*argv, plugin=False, metric=False, artifact_uri=uri)
            assert status == 1 and out == "", (argv, err)
            assert err.count("\n") == 1 and f"bucket '{bucket}'" in err and "does not exist" in err
        empty = f"{root.rsplit('/', 1)[0]}/no-such-prefix"
    else:
        empty = str(tmp_path / "no-such-folder")
    data = tracked.json("gc", plugin=False, metric=False, artifact_uri=empty)
    assert data["orphans"] == [] and data["uploads"] == [] and data["missing"] == []
    assert tracked.cli("verify", artifact_uri=empty)[0] == 0
    assert not (tmp_path / "no-such-folder").exists()


def test_gc_delete_refuses_a_tracking_store_that_knows_nothing_here(
    tracked: Tracked, tmp_path: Path
) -> None:
    """Pointed at another project's (or a fresh) tracking database, every model folder would
    look orphaned: gc --delete refuses and deletes nothing."""
    other = f"sqlite:///{tmp_path / 'other.db'}"
    ExperimentsManager(other, "m", "p", artifact_uri=str(tmp_path / "x")).close()  # empty DB
    dry = tracked.json("gc", plugin=False, metric=False, tracking_uri=other)
    assert tracked.result.best_model_uri in {o["uri"] for o in dry["orphans"]}
    status, out, err = tracked.cli("gc", "--delete", plugin=False, metric=False, tracking_uri=other)
    assert status == 1 and out == "" and "nothing was deleted" in err and err.count("\n") == 1
    assert tracked.manager.artifacts.exists(tracked.result.best_model_uri or "")


def test_gc_deletes_twins_their_creators_left(
    tracked: Tracked, capsys: pytest.CaptureFixture[str]
) -> None:
    """A never-claimed run beside a trained run of the same name, created over a lease TTL
    ago (a creator killed after a lost ``create_run`` answer made it create a twin), is
    listed by gc and deleted by gc --delete; ``--retries`` and ``--lease-seconds`` (the
    workers' lease: a younger twin may still be claimed) are taken, and checked."""
    from mlflow import MlflowClient

    from tracker_core import tags as T
    from tracker_core.leases import DEFAULT_LEASE_SECONDS

    trained = tracked.result.runs[0]
    record = tracked.manager.get_run_by_id(trained.run_id)
    assert record is not None
    with tracked.backend.mlflow_env():
        twin = MlflowClient(tracked.backend.tracking_uri).create_run(
            record.experiment_id,
            start_time=int((time.time() - 20) * 1000),
            tags={T.TAG_PLUGIN: tracked.method.name},
            run_name=record.run_name,
        )
    assert DEFAULT_LEASE_SECONDS > 20
    assert tracked.json("gc", plugin=False, metric=False)["twins"] == []  # within its grace
    lease = ("--lease-seconds", "15")
    dry = tracked.json("--retries", "1", *lease, "gc", plugin=False, metric=False)
    (found,) = dry["twins"]
    assert (found["run_id"], found["kept_run_id"]) == (twin.info.run_id, trained.run_id)
    status, out, _ = tracked.cli(*lease, "gc", plugin=False, metric=False)
    assert status == 0 and twin.info.run_id in out and "--delete" in out
    deleted = tracked.json("--retries", "5", *lease, "gc", "--delete", plugin=False, metric=False)
    assert deleted["twins"][0]["deleted"] is True
    assert tracked.manager.get_run_by_id(twin.info.run_id) is None
    assert tracked.manager.get_run_by_id(trained.run_id) is not None
    assert tracked.cli("--retries", "0", "gc", plugin=False, metric=False)[0] == 2
    assert "attempts >= 1, got '0'" in capsys.readouterr().err  # argparse's own stream
    assert tracked.cli("--lease-seconds", "inf", "gc", plugin=False, metric=False)[0] == 2
    assert "positive number of seconds, got 'inf'" in capsys.readouterr().err


# ---------------------------------------------------------------------- verify
def test_verify_finds_and_unmarks_models_whose_files_are_gone(tracked: Tracked) -> None:
    manager, result = tracked.manager, tracked.result
    assert result.best_run_id is not None and result.best_model_uri is not None
    assert tracked.json("verify", plugin=False, metric=False)["missing"] == []
    assert manager.artifacts.delete_tree(result.best_model_uri)  # emptied under the project

    status, out, err = tracked.cli("--json", "verify", plugin=False, metric=False)
    assert status == 1, err
    (found,) = json.loads(out)["missing"]
    assert found["run_id"] == result.best_run_id and found["uri"] == result.best_model_uri
    status, out, _ = tracked.cli("verify", plugin=False, metric=False)
    assert status == 1 and result.best_run_id in out and "--unmark" in out
    # gc reports it too, and points at verify
    gc = tracked.json("gc", plugin=False, metric=False)
    assert [m["run_id"] for m in gc["missing"]] == [result.best_run_id]
    status, out, _ = tracked.cli("gc", plugin=False, metric=False)
    assert status == 0 and "tracker-core verify" in out and result.best_run_id in out

    fixed = tracked.json("verify", "--unmark", plugin=False, metric=False)
    assert [m["unmarked"] for m in fixed["missing"]] == [True]
    assert tracked.json("verify", plugin=False, metric=False)["missing"] == []
    status, _, err = tracked.cli("best", "batch-1")  # no longer served
    assert status == 1 and "holds no model" in err
    run = manager.get_run_by_id(result.best_run_id)
    assert run is not None and run.tags["tracker.model_deleted"] == "true"


# ---------------------------------------------------------------------- broken pipe
def test_output_closed_early_is_quiet(local_tracked: Tracked) -> None:
    """`tracker-core --json runs X | head -1`: no traceback, no error text; exit 141."""
    argv = [CLI, *local_tracked.argv(), "--json", "runs", local_tracked.result.experiment_id]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # deterministic: the reader is gone before the first byte is written
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()
    err = child.stderr.read().decode()
    child.stderr.close()
    assert child.wait(timeout=300) == 141
    assert err == ""
    # and as a person types it
    line = " ".join(f"'{a}'" for a in argv) + " | head -1"
    shell = subprocess.run(
        ["bash", "-c", line], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert shell.returncode == 0 and shell.stdout == "{\n" and shell.stderr == ""


def test_only_our_own_output_closing_is_quiet(
    local_tracked: Tracked, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A closed standard output is quiet (141); a broken pipe anywhere else (a store's
    connection) is a failure like any other."""

    class Closed(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    argv = [*local_tracked.argv(), "iterations"]
    err = io.StringIO()
    assert main(argv, stdout=Closed(), stderr=err) == 141 and err.getvalue() == ""

    def broken(*_: Any, **__: Any) -> Any:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(ExperimentsManager, "get_experiments", broken)
    out, err = io.StringIO(), io.StringIO()
    assert main(argv, stdout=out, stderr=err) == 1
    assert err.getvalue().startswith("tracker-core: error:") and "Broken pipe" in err.getvalue()
