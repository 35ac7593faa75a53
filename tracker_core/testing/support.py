"""What the behaviour suite's modules share: a params class, a tiny model, run helpers, the
``mgr`` fixture (a manager on the leg under test, ``state_dict`` models), the ``clock``
fixture (a :class:`~tracker_core.testing.clock.SteppedClock` for leases and waits) and the
lease time of tests on it, and a writer killed mid-upload."""

from __future__ import annotations

import enum
import multiprocessing
import pickle
import subprocess
import sys
import time
from multiprocessing.context import BaseContext
from typing import Any

import attrs
import pytest

from tracker_core import tags as T
from tracker_core.manager import ExperimentsManager
from tracker_core.params import FineTuningParams
from tracker_core.stores import ArtifactStore, RunQuery
from tracker_core.testing.clock import SteppedClock
from tracker_core.testing.harness import BackendUnderTest
from tracker_core.values import FineTuningIteration, MetricValue, RunStatus

__all__ = [
    "BIG_FILE_BYTES",
    "LEASE",
    "PRELOADED",
    "Optimizer",
    "Params",
    "clock",
    "connect",
    "iteration",
    "kill_mid_upload",
    "marked_models",
    "mgr",
    "processes",
    "run_script",
    "run_with_quality",
    "status_of",
    "stored_models",
    "tiny_model",
    "weights",
]


class Optimizer(enum.Enum):
    ADAM = "adam"
    SGD = "sgd"


@attrs.frozen
class Params(FineTuningParams):
    lr: float
    epochs: int = 1
    optimizer: Optimizer = Optimizer.ADAM
    layers: list[int] = attrs.field(factory=lambda: [8, 4])
    freeze: bool = False
    note: str = ""
    warmup: float | None = None


def tiny_model(seed: int = 0) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2)


def weights(model: Any) -> list[float]:
    """A model's weights as plain floats (accepts a module or a state dict)."""
    state = model.state_dict() if hasattr(model, "state_dict") else model
    return [float(x) for tensor in state.values() for x in tensor.flatten().tolist()]


def run_with_quality(
    mgr: ExperimentsManager, params: Params, quality: float, *, save: bool = True, seed: int = 0
) -> str:
    """One run: log the main metric, save the model (best only), finish. Returns the run id."""
    mgr.set_run(params)
    run_id = mgr.current_run_id
    assert run_id is not None
    mgr.save_metric(MetricValue(mgr.main_metric, quality))
    if save:
        mgr.save_model(tiny_model(seed))
    mgr.finish_run()
    return run_id


def marked_models(mgr: ExperimentsManager, experiment_id: str) -> set[str]:
    runs = mgr.tracking.search_runs(RunQuery((experiment_id,), tags={T.TAG_MODEL_UPLOADED: T.TRUE}))
    return {r.run_id for r in runs}


def stored_models(mgr: ExperimentsManager, experiment_id: str) -> set[str]:
    """Run ids whose model files exist in the artifact store (whatever the marks say)."""
    out = set()
    for run in mgr.tracking.search_runs(RunQuery((experiment_id,))):
        if mgr.artifacts.exists(f"{run.artifact_uri}/{T.MODEL_DIR}"):
            out.add(run.run_id)
    return out


def iteration(mgr: ExperimentsManager, batch: str = "b1") -> FineTuningIteration:
    return FineTuningIteration(plugin_name=mgr.plugin_name, batch_id=batch)


#: the lease time of tests on the stepped ``clock``: a real worker's (time costs nothing there,
#: and a slow store call under load is still well within it)
LEASE = 60.0


def connect(backend: BackendUnderTest, plugin: str, **kwargs: Any) -> ExperimentsManager:
    """A manager of ``plugin`` on ``backend`` (``state_dict`` models of :func:`tiny_model`,
    :class:`Params`), for tests that need several managers of one plugin."""
    kwargs.setdefault("model_format", "state_dict")
    kwargs.setdefault("model_factory", tiny_model)
    kwargs.setdefault("params_type", Params)
    return backend.connect(plugin_name=plugin, **kwargs)


def status_of(mgr: ExperimentsManager, run_id: str) -> RunStatus:
    run = mgr.get_run_by_id(run_id)
    assert run is not None
    return run.status


@pytest.fixture
def clock() -> SteppedClock:
    """A clock for the managers of one test: leases expire and heartbeats beat as it is
    stepped (``clock.advance(seconds)``, or a manager's own waits), not in real time."""
    return SteppedClock()


@pytest.fixture
def mgr(backend: BackendUnderTest) -> Any:
    manager = backend.connect(
        model_format="state_dict", model_factory=tiny_model, params_type=Params
    )
    yield manager
    manager.close()


#: what worker processes of the suite import once, in the fork server, instead of each child
PRELOADED = ["tracker_core", "tracker_core_mlflow", "mlflow", "torch"]


def processes() -> BaseContext:
    """A multiprocessing context for real worker processes sharing nothing but the stores.

    Children fork from a server process that imported tracker-core, MLflow and torch once
    (a spawned child would import them again: seconds each); each child is still a fresh
    process of its own, with its own managers, threads and connections.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED)
    return context


def run_script(
    backend: BackendUnderTest, script: str, plugin: str, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a new interpreter, given the pickled ``backend`` (hex) and ``plugin``
    as its arguments; ``kwargs`` as :func:`subprocess.run`'s. Skips the test on a backend
    whose stores are not shared by processes."""
    if "processes" not in backend.capabilities:
        pytest.skip("the backend's stores are not shared across processes")
    argv = [sys.executable, "-c", script, pickle.dumps(backend).hex(), plugin]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)


#: a big enough file for a multipart upload on every shipped backend (S3 parts are 8 MiB)
BIG_FILE_BYTES = 30 * 2**20

_UPLOAD_SCRIPT = """
import pickle, sys, tempfile, threading
from pathlib import Path
backend = pickle.loads(bytes.fromhex(sys.argv[1]))
uri, size = sys.argv[2], int(sys.argv[3])
mgr = backend.connect()
folder = Path(tempfile.mkdtemp())
with open(folder / "weights.bin", "wb") as f:
    f.truncate(size)
stall = threading.Event()

def progress(done, total):
    if 0 < done < total:  # a first part is stored: hang here, the upload left open
        print("uploading", flush=True)
        stall.wait()

mgr.artifacts.upload_dir(folder, uri, progress)
print("completed", flush=True)
"""


def kill_mid_upload(backend: BackendUnderTest, store: ArtifactStore, uri: str) -> None:
    """A child process starts a big upload to ``uri`` on ``backend`` and is killed (SIGKILL)
    once ``store`` lists the upload as incomplete (stores with capability ``"multipart"``)."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _UPLOAD_SCRIPT,
            pickle.dumps(backend).hex(),
            uri,
            str(BIG_FILE_BYTES),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert line == "uploading", (line, child.stderr.read() if child.stderr else "")
        deadline = time.monotonic() + 120
        while not store.list_incomplete_uploads(uri):
            assert time.monotonic() < deadline, "the upload never showed as incomplete"
            time.sleep(0.1)
    finally:
        child.kill()
        child.wait(timeout=60)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
