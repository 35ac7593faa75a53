"""The ``tracker-core`` command line against a tracked store, on every leg of the matrix."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
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
from tracker_core.testing.harness import BackendUnderTest


@attrs.frozen
class Tracked:
    backend: BackendUnderTest
    method: ToyMethod
    manager: ExperimentsManager
    result: IterationResult

    def cli(self, *argv: str, plugin: bool = True, metric: bool = True) -> tuple[int, str, str]:
        """Run the CLI in-process on this store: (exit status, stdout, stderr)."""
        options = ["--tracking-uri", self.backend.tracking_uri]
        options += ["--artifact-uri", self.backend.artifact_root]
        if plugin:
            options += ["--plugin", self.method.name]
        if metric:
            options += ["--metric", self.method.main_metric]
        out, err = io.StringIO(), io.StringIO()
        with self.backend.mlflow_env():
            status = main([*options, *argv], stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def json(self, *argv: str, **kwargs: bool) -> Any:
        status, out, err = self.cli("--json", *argv, **kwargs)
        assert status == 0, err
        return json.loads(out)


@pytest.fixture
def tracked(backend: BackendUnderTest) -> Iterator[Tracked]:
    method = ToyMethod(SETS[:3])
    manager = backend.connect(**connect_kwargs(method))
    result = run_iteration(method, manager, "batch-1")
    yield Tracked(backend, method, manager, result)
    manager.close()


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
    for command in ("iterations", "runs", "best", "download", "run", "gc"):
        assert command in done.stdout
