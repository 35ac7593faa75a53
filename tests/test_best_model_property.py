"""Property: after every save_model, exactly the best ``keep`` models exist in the store.

Runs on the embedded default (in-process SQLite + a local folder) with random sequences of
qualities, both directions and several ``keep`` values.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tracker_core
from tracker_core import FineTuningIteration, MetricValue
from tracker_core.testing.harness import FAST_RETRY, fresh_sqlite_uri
from tracker_core.testing.support import Params, marked_models, stored_models, tiny_model

qualities = st.lists(
    st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, -3.0, 42.0]), min_size=1, max_size=6
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=qualities, is_loss=st.booleans(), keep=st.integers(1, 3))
def test_exactly_the_best_keep_models_exist(
    tmp_path: Path, values: list[float], is_loss: bool, keep: int
) -> None:
    mgr = tracker_core.connect(
        str(tmp_path / "artifacts"),
        tracking_uri=fresh_sqlite_uri(tmp_path),
        main_metric="q",
        plugin_name=f"p-{uuid.uuid4().hex[:8]}",
        is_loss=is_loss,
        keep=keep,
        model_format="state_dict",
        retry=FAST_RETRY,
    )
    mgr.set_iteration(FineTuningIteration(plugin_name=mgr.plugin_name, batch_id="b"))
    eid = mgr.current_experiment_id or ""
    finished = []
    for i, value in enumerate(values):
        mgr.set_run(Params(lr=float(i)))
        mgr.save_metric(MetricValue("q", value))
        mgr.save_model(tiny_model(i))
        finished.append(mgr.tracker.runs.get_existing(mgr.current_run_id or ""))
        mgr.finish_run()
        expected = {r.run_id for r in sorted(finished, key=mgr.ranking.key)[:keep]}
        assert stored_models(mgr, eid) == expected
        assert marked_models(mgr, eid) == expected
        # and the values really are the best ones in the requested direction
        kept = sorted(values[: i + 1], reverse=not is_loss)[:keep]
        assert sorted(r.metrics["q"] for r in finished if r.run_id in expected) == sorted(kept)
    mgr.close()
