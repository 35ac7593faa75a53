"""Serving a picked model reads its run record once: the record that picked the model is the
one its files are read with (no second ``get_run`` per download).

Counts tracking-store calls through a real store wrapped by
:class:`~tracker_core.testing.faults.FaultyProxy` (embedded SQLite and a local folder).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import tracker_core
from tracker_core import ExperimentsManager, FineTuningIteration, MetricValue
from tracker_core.testing.faults import FaultyProxy
from tracker_core.testing.harness import FAST_RETRY, fresh_sqlite_uri
from tracker_core.testing.support import Params, tiny_model


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[ExperimentsManager]:
    mgr = tracker_core.connect(
        str(tmp_path / "artifacts"),
        tracking_uri=fresh_sqlite_uri(tmp_path),
        main_metric="q",
        plugin_name="reads",
        model_format="state_dict",
        model_factory=lambda: tiny_model(0),
        retry=FAST_RETRY,
    )
    mgr.upload_initial_model(tiny_model(0))
    for batch, seed in (("b0", 1), ("b1", 2)):
        mgr.set_iteration(FineTuningIteration(plugin_name="reads", batch_id=batch))
        with mgr.run(Params(lr=0.1)):
            mgr.save_metric(MetricValue("q", 0.5))
            assert mgr.save_model(tiny_model(seed))
    yield mgr
    mgr.close()


def _same(got: torch.nn.Module, want: torch.nn.Module) -> bool:
    mine = got.state_dict()
    return all(torch.equal(mine[k], v) for k, v in want.state_dict().items())


def test_downloads_of_a_picked_model_read_no_run_record_again(
    manager: ExperimentsManager,
) -> None:
    previous = manager.get_previous_iteration_id()
    assert previous is not None
    counted = manager.tracking.wrap(FaultyProxy)

    assert _same(manager.download_best_model(previous), tiny_model(1))
    assert _same(manager.download_last_model(), tiny_model(1))
    assert _same(manager.download_initial_model(), tiny_model(0))

    assert counted.calls["get_run"] == 0, dict(counted.calls)
