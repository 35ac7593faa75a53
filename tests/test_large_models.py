"""A 100 MB+ model round trip on local disk, S3 (moto) and GCS (emulator).

Checks that weights survive, that progress reports end at ``done == total``, and that
transfers stream: the Python-level memory peak of an artifact-store upload or download stays
well below the model's size (tracemalloc sees the transfer buffers of s3fs/gcsfs, which are
Python bytes objects). Timings are logged (``--log-cli-level=INFO``), never asserted.
"""

from __future__ import annotations

import gc
import logging
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _s3gcs_fixtures import *  # noqa: F403 - the fixtures
from _s3gcs_fixtures import SmallParams, artifact_leg, same_weights

import tracker_core
from tracker_core import FineTuningIteration, MetricValue
from tracker_core import tags as T
from tracker_core.testing.harness import FAST_RETRY

log = logging.getLogger(__name__)

#: 5120 x 5120 float32 weights + bias: 26.2 M parameters, 105 MB
WIDTH = 5120
MIN_BYTES = 100 * 10**6
#: a streaming transfer holds a bounded number of parts in Python memory, independent of the
#: model's size (S3: ~2 x 8 MiB x 4 parts, ~70 MB; GCS: ~50 MB): less than this fraction of
#: a 105 MB model, where a buffering transfer would hold all of it, or twice
MAX_PEAK_FRACTION = 0.8


def _big_model() -> Any:
    import torch

    torch.manual_seed(1)
    with torch.no_grad():
        model = torch.nn.Linear(WIDTH, WIDTH)
        model.weight.uniform_(-1, 1)
    return model


def _factory() -> Any:
    import torch

    return torch.nn.Linear(WIDTH, WIDTH)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))


def _measure(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """Run ``fn``; its result, seconds taken and Python memory peak in bytes."""
    gc.collect()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = fn()
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, elapsed, peak


@pytest.mark.parametrize("backend_name", ["local", "s3", "gcs"])
def test_100mb_model_round_trip(
    backend_name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    sqlite_tracking_uri: str,
    _base_env: None,
) -> None:
    artifact_uri, options = artifact_leg(request, backend_name, tmp_path, "big")
    manager = tracker_core.connect(
        artifact_uri,
        tracking_uri=sqlite_tracking_uri,
        main_metric="quality",
        plugin_name="big",
        storage_options=options,
        retry=FAST_RETRY,
        model_format="state_dict",
        model_factory=_factory,
    )
    model = _big_model()
    manager.set_iteration(FineTuningIteration(plugin_name="big", batch_id="b"))
    manager.set_run(SmallParams())
    manager.save_metric(MetricValue("quality", 0.9))

    started = time.perf_counter()
    assert manager.save_model(model) is True
    save_s = time.perf_counter() - started
    experiment_id, run_id = manager.current_experiment_id, manager.current_run_id
    assert experiment_id is not None and run_id is not None
    manager.finish_run()

    started = time.perf_counter()
    loaded = manager.download_best_model(experiment_id)
    load_s = time.perf_counter() - started
    assert same_weights(loaded, model)
    del loaded

    run = manager.get_run_by_id(run_id, models_only=True)
    assert run is not None
    store = manager.artifacts
    model_uri = run.tags[T.TAG_MODEL_URI]

    # store level, with progress and memory measured
    down = Recorder()
    local = tmp_path / "downloaded"
    _, down_s, down_peak = _measure(lambda: store.download_dir(model_uri, local, down))
    total = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
    assert total >= MIN_BYTES
    assert down.calls and down.calls[-1] == (total, total)
    assert all(done <= t == total for done, t in down.calls)

    up = Recorder()
    copy_uri = store.join("copy-of-big-model")
    _, up_s, up_peak = _measure(lambda: store.upload_dir(local, copy_uri, up))
    assert up.calls and up.calls[-1] == (total, total)
    assert [d for d, _ in up.calls] == sorted(d for d, _ in up.calls)  # monotonic

    log.info(
        "%s: %.0f MB model: save_model %.2fs, download_best_model %.2fs; store upload %.2fs "
        "(peak %.1f MB), download %.2fs (peak %.1f MB)",
        backend_name, total / 1e6, save_s, load_s, up_s, up_peak / 1e6, down_s, down_peak / 1e6,
    )  # fmt: skip
    assert up_peak < MAX_PEAK_FRACTION * total, f"upload held {up_peak / 1e6:.0f} MB"
    assert down_peak < MAX_PEAK_FRACTION * total, f"download held {down_peak / 1e6:.0f} MB"
    assert store.delete_tree(copy_uri) is True
