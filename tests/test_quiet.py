"""Quiet, and no global side effects (issue 11 items 13-14, issue 10 section 4).

A newcomer's script prints only what it logs: no MLflow pickle WARNING per save, no migration
INFO lines when a SQLite database is created, no "View run" lines; the user's root logger is
as they left it after any tracker-core call; MLflow's telemetry deleting an environment
variable while ``requests`` reads ``os.environ`` does not fail a tracker-core call. Scenarios
that depend on what a process has imported run in fresh subprocesses (bounded by timeouts).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("torch")

import torch

from tracker_core_mlflow import MlflowPytorchCodec, MlflowTrackingStore
from tracker_core_mlflow.codec import PICKLE_WARNING
from tracker_core_mlflow.quiet import quiet

pytestmark = pytest.mark.timeout(600)


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: none of the suite's MLflow HTTP settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return {**env, **extra}


def run_script(script: str, cwd: Path, *args: str, timeout: float = 420) -> tuple[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=cwd,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout, done.stderr


class Records(logging.Handler):
    """Collects the records one logger lets through (after its own filters)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


RecordsOn = Callable[[str], Records]


@pytest.fixture
def records() -> Iterator[RecordsOn]:
    """``records(name)`` collects what logger ``name``'s filters let through, for the test.
    The logger's level is DEBUG meanwhile: an earlier test in this process may have left
    MLflow's loggers at another level (the CLI, run in-process, quiets them), and the level is
    not what these tests are about."""
    attached: list[tuple[logging.Logger, Records, int]] = []

    def on(name: str) -> Records:
        handler, logger = Records(), logging.getLogger(name)
        attached.append((logger, handler, logger.level))
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
        return handler

    yield on
    for logger, handler, level in reversed(attached):
        logger.removeHandler(handler)
        logger.setLevel(level)


# -- item 13: the user's root logger ---------------------------------------------------------

ROOT_LOGGING = """
import json, logging, sys
import torch
import tracker_core

mode = sys.argv[1]
root = logging.getLogger()
if mode == "configured-before":  # INFO, the user's own handler on root
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="USER %(message)s")
elif mode == "app-logger":  # root at INFO, the user's handler on their own logger
    root.setLevel(logging.INFO)
    app_handler = logging.StreamHandler(sys.stdout)
    app_handler.setFormatter(logging.Formatter("USER %(message)s"))
    logging.getLogger("app").addHandler(app_handler)
before = (root.level, list(root.handlers))

mgr = tracker_core.connect(
    "./models", tracking_uri="sqlite:///mlflow.db", main_metric="q", plugin_name="p"
)
assert mgr.model_format == "mlflow.pytorch"
mgr.upload_initial_model(torch.nn.Linear(3, 2))  # the first save in the default format
mgr.download_initial_model()
after = (root.level, list(root.handlers))

if mode == "configured-after":  # the user configures logging after tracker-core ran
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="USER %(message)s")
logging.getLogger("app").info("hello")
print(json.dumps({"unchanged": after == before, "before": repr(before), "after": repr(after)}))
"""


@pytest.mark.parametrize("mode", ["configured-before", "app-logger", "configured-after"])
def test_user_root_logging_untouched(tmp_path: Path, mode: str) -> None:
    out, _ = run_script(ROOT_LOGGING, tmp_path, mode)
    lines = out.splitlines()
    result = json.loads(lines[-1])
    assert result["unchanged"], result
    assert "USER hello" in lines  # the user's INFO line is shown


# -- item 14 / issue 10 section 4: a newcomer's quick start prints nothing -------------------

README = Path(__file__).resolve().parent.parent / "README.md"

# what the README's quick start leaves to the reader; every run is better than the last, so
# every model is saved (MLflow's pickle WARNING came once per save)
PRELUDE = """
import itertools
import torch

initial_model = torch.nn.Linear(4, 2)
_quality = itertools.count(1)


def train(start, params, on_metric):
    for step in range(3):
        on_metric(1.0 / (step + 1))
    return torch.nn.Linear(4, 2)


def evaluate(model):
    return next(_quality) / 10
"""


def readme_quick_start(tracking_uri: str) -> str:
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    default = '"sqlite:///mlflow.db"'
    assert default in code.group(1), "the quick start no longer passes tracking_uri: update this"
    return PRELUDE + code.group(1).replace(default, repr(tracking_uri))


# the quick start ran as written (silently: the test wants an empty output)
RAN = """
runs = mgr.get_runs(mgr.get_experiments()[0].experiment_id)
assert len(runs) == 2 and all(r.status.value == "FINISHED" for r in runs), runs
assert mgr.has_initial_model()
"""


@pytest.mark.parametrize("tracking", ["sqlite", "server"])
def test_quick_start_prints_nothing(
    tmp_path: Path, tracking: str, request: pytest.FixtureRequest
) -> None:
    """The README's quick start, as written, with Python's default logging (the last-resort
    handler shows WARNING and above on stderr): it runs, and nothing from MLflow or
    tracker-core is on stdout or stderr. (It is the README's first-run check too:
    test_readme.py tests the quick start across batches.)"""
    if tracking == "server":  # a server other tests share: their experiments are there too
        script = readme_quick_start(request.getfixturevalue("server_tracking"))
    else:
        script = readme_quick_start("sqlite:///mlflow.db") + RAN
    out, err = run_script(script, tmp_path)
    assert out == ""
    assert err.splitlines() == []


# -- the scoped filters: our calls only, nobody else's -----------------------------------------


def test_pickle_warning_dropped_for_our_saves_only(tmp_path: Path, records: RecordsOn) -> None:
    import mlflow.pytorch

    seen = records("mlflow.pytorch")
    logger = logging.getLogger("mlflow.pytorch")
    filters = list(logger.filters)
    ours = tmp_path / "ours"
    ours.mkdir()
    MlflowPytorchCodec().save(torch.nn.Linear(2, 2), ours)
    assert not [m for m in seen.messages() if m.startswith(PICKLE_WARNING)]
    assert logger.filters == filters  # nothing left behind

    mlflow.pytorch.save_model(  # a plain MLflow user in the same process
        torch.nn.Linear(2, 2), str(tmp_path / "theirs"), serialization_format="pickle"
    )
    assert [m for m in seen.messages() if m.startswith(PICKLE_WARNING)]


def test_quiet_scope_is_per_thread(records: RecordsOn) -> None:
    seen = records("tracker_core_test.quiet")
    logger = logging.getLogger("tracker_core_test.quiet")

    def other_thread() -> None:
        logger.warning("theirs")

    with quiet(logger.name, lambda r: True):
        logger.warning("ours")
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    logger.warning("after")
    assert seen.messages() == ["theirs", "after"]
    assert logger.filters == []


def test_migration_lines_dropped_for_our_store_only(tmp_path: Path, records: RecordsOn) -> None:
    from mlflow import MlflowClient

    seen = records("mlflow.store.db.utils")
    MlflowTrackingStore(f"sqlite:///{tmp_path / 'ours.db'}")
    assert [r for r in seen.records if r.levelno < logging.WARNING] == []
    MlflowClient(f"sqlite:///{tmp_path / 'theirs.db'}").search_experiments()
    assert "Creating initial MLflow database tables..." in seen.messages()
    assert logging.getLogger("mlflow.store.db.utils").filters == []


# -- item 13: os.environ edited by MLflow's telemetry while requests reads it ------------------

ENVIRON_RACE = """
import json, os, sys, threading, time
from tracker_core.retry import Retrier, RetryConfig, RetryParams
from tracker_core_mlflow import MlflowTrackingStore
from tracker_core_mlflow.errors import environ_changed_while_read

# What MLflow's telemetry does once per process (mlflow/telemetry/client.py): `import mlflow`
# sets _MLFLOW_TELEMETRY_SESSION_ID; its config thread, failing to reach the internet, pops it
# while requests iterates os.environ for proxies (urllib.request.getproxies_environment) and
# gets a KeyError. Here the set/pop repeats in bursts (1 ms of it every 10 ms), with a longer
# environment to read, so the race happens on some of the requests instead of once in ~24
# processes (a non-stop loop would fail nearly every request, which no bounded retry outlasts).
for i in range(300):
    os.environ[f"_TRACKER_CORE_PAD_{i}"] = "x" * 20
sys.setswitchinterval(1e-5)
stop = threading.Event()

def telemetry_like():
    while not stop.is_set():
        burst_end = time.monotonic() + 0.001
        while time.monotonic() < burst_end:
            os.environ["_TRACKER_CORE_TELEMETRY_LIKE"] = "session"
            os.environ.pop("_TRACKER_CORE_TELEMETRY_LIKE", None)
        time.sleep(0.009)

store = MlflowTrackingStore(sys.argv[1])
races = 0

def classify(error):
    global races
    exc = error
    while exc is not None:  # the KeyError under MLflow's and tracker-core's wrappers
        races += environ_changed_while_read(exc)
        exc = exc.__cause__ or exc.__context__
    return store.classify_error(error)

retry = RetryConfig(RetryParams(max_attempts=12, wait_time_seconds=0))
retrier = Retrier(retry).with_classifiers(classify)
thread = threading.Thread(target=telemetry_like, daemon=True)
thread.start()
failed = []
for _ in range(200):
    try:
        retrier.call("search", store.get_experiment_by_name, "no such experiment")
    except Exception as exc:
        failed.append(repr(exc)[:300])
stop.set()
thread.join()
print(json.dumps({"races": races, "failed": failed}))
"""


def test_environ_edited_by_another_thread_does_not_fail_calls(
    tmp_path: Path, server_tracking: str
) -> None:
    out, _ = run_script(ENVIRON_RACE, tmp_path, server_tracking)
    outcome = json.loads(out.splitlines()[-1])
    assert outcome["failed"] == []
    assert outcome["races"] > 0, "the race never happened: the test proves nothing"


# -- issue 17, items 7 and 9: requirements= and an exit against a store that is gone ---------

REQUIREMENTS_MISMATCH = """
import logging, sys, torch, tracker_core

mgr = tracker_core.connect(
    "./models", tracking_uri="sqlite:///mlflow.db", main_metric="q", plugin_name="p",
    requirements=["scikit-learn==0.0.1"],  # not what is installed: MLflow would warn
)
mgr.upload_initial_model(torch.nn.Linear(3, 2))
mgr.download_initial_model()
mgr.download_initial_model()
if sys.argv[1] == "debug":  # the mismatch is told once, at DEBUG, through our logger
    logging.basicConfig(stream=sys.stdout, format="%(name)s %(message)s")
    logging.getLogger("tracker_core_mlflow.codec").setLevel(logging.DEBUG)
    other = tracker_core.connect(
        "./models2", tracking_uri="sqlite:///other.db", main_metric="q", plugin_name="p",
        requirements=["scikit-learn==0.0.2"],
    )
    other.upload_initial_model(torch.nn.Linear(3, 2))
    other.download_initial_model()
"""


@pytest.mark.parametrize("mode", ["quiet", "debug"])
def test_requirements_mismatch_stays_out_of_the_users_output(tmp_path: Path, mode: str) -> None:
    out, err = run_script(REQUIREMENTS_MISMATCH, tmp_path, mode)
    assert err.splitlines() == []
    told = [line for line in out.splitlines() if "Detected one or more mismatches" in line]
    if mode == "quiet":
        assert out == ""
    else:
        assert len(told) == 1 and told[0].startswith("tracker_core_mlflow.codec ")


STORE_GONE_AT_EXIT = """
import shutil, sys, attrs, tracker_core
from tracker_core import FineTuningIteration, FineTuningParams, MetricValue

@attrs.frozen
class P(FineTuningParams):
    lr: float

mgr = tracker_core.connect(
    "./gone/models", tracking_uri="sqlite:///gone/mlflow.db", main_metric="q", plugin_name="p"
)
mgr.set_iteration(FineTuningIteration(plugin_name="p", batch_id="b"))
mgr.set_run(P(lr=0.1))  # held at exit: its lease is released then
if sys.argv[1] == "queued":
    mgr.save_metric(MetricValue("loss", 1.0))  # queued, sent at exit
shutil.rmtree("gone")  # a temporary folder deleted before the interpreter exits
"""


@pytest.mark.parametrize("what", ["lease", "queued"])
def test_an_exit_against_a_store_that_is_gone_is_one_line_at_most(
    tmp_path: Path, what: str
) -> None:
    """Releasing the lease fails quietly (DEBUG); metric values lost are one WARNING line,
    never MLflow's SQLAlchemy traceback."""
    out, err = run_script(STORE_GONE_AT_EXIT, tmp_path, what)
    assert out == ""
    if what == "lease":
        assert err.splitlines() == []
    else:
        (line,) = err.splitlines()
        assert "1 metric value(s) of run" in line and "could not be sent at exit" in line
