"""The reconcile suite: what ``tracker-core gc`` and ``verify`` repair, on every backend.

Crashes and outside hands leave three kinds of debris; each test here makes one of them for
real and checks that reconcile repairs it and touches nothing a live worker still needs:

- model folders no run marks, of runs whose worker died (its lease expired);
- incomplete uploads a killed writer left open (S3 multipart; capability ``"multipart"``);
- runs still marked as holding a model whose files are gone;
- empty folders left by deleting a model (only on stores with real folders).

Import the tests into a test module that defines the ``backend`` fixture (see
:mod:`tracker_core.testing.harness`)::

    from tracker_core.testing.suite_reconcile import *  # noqa: F403

Capabilities: ``"processes"`` (the stores are shared by separate processes) and
``"multipart"`` (interrupted uploads leave parts that
:meth:`~tracker_core.stores.ArtifactStore.list_incomplete_uploads` lists).
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import pytest

from tracker_core import tags as T
from tracker_core.clock import SYSTEM_CLOCK
from tracker_core.leases import claim_params, lease_state
from tracker_core.manager import ExperimentsManager
from tracker_core.stores import RunQuery
from tracker_core.testing.clock import SteppedClock
from tracker_core.testing.harness import BackendUnderTest
from tracker_core.testing.support import (
    Params,
    clock,
    iteration,
    kill_mid_upload,
    mgr,
    run_with_quality,
    tiny_model,
)
from tracker_core.values import MetricValue, RunRecord

__all__ = [name for name in dir() if name.startswith("test_")]  # filled at the end


def _new_run(mgr: ExperimentsManager, name: str) -> RunRecord:
    """A RUNNING run of the current iteration created straight in the tracking store: no
    worker holds it (no lease claimed), as if its worker died before claiming one."""
    return mgr.tracking.create_run(mgr.current_experiment_id or "", name, {})


def set_lease(mgr: ExperimentsManager, run_id: str, *, expires_in_ms: int) -> None:
    """Claim the next lease epoch of a run for a made-up worker, expiring at now + delta
    (negative: a worker that died that long ago; what waiting out a dead worker's lease
    comes to, without the wait)."""
    run = mgr.tracking.get_run(run_id)
    assert run is not None
    epoch = lease_state(run, 60_000).epoch + 1
    params, tags = claim_params(
        epoch, f"test-host:1:{uuid.uuid4().hex[:8]}", SYSTEM_CLOCK.now_ms() + expires_in_ms
    )
    mgr.tracking.log_batch(run_id, (), params, tags)


def _plant_model(mgr: ExperimentsManager, run: RunRecord) -> str:
    """Model files under the run's model folder, never marked: what a crash leaves."""
    uri = f"{run.artifact_uri.rstrip('/')}/{T.MODEL_DIR}"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "weights.bin").write_bytes(b"\0" * 256)
        mgr.artifacts.upload_dir(Path(tmp), uri)
    assert mgr.artifacts.exists(uri)
    return uri


def _run_folder(run: RunRecord) -> str:
    """``<experiment folder>/<run id>``: the parent of the run's ``artifacts`` folder."""
    return run.artifact_uri.rstrip("/").rsplit("/", 1)[0]


# --------------------------------------------------------------------------- orphaned folders
def test_gc_collects_orphans_of_dead_workers_and_skips_live_ones(
    mgr: ExperimentsManager,
) -> None:
    """A RUNNING run is collectable once its lease has expired; a live one is left alone."""
    mgr.set_iteration(iteration(mgr))
    dead, live, fresh = (_new_run(mgr, n) for n in ("dead", "live", "fresh"))
    set_lease(mgr, dead.run_id, expires_in_ms=-5_000)  # its worker died 5 s ago
    set_lease(mgr, live.run_id, expires_in_ms=600_000)  # its worker is beating
    # `fresh` claimed nothing yet: a run being set up counts as held for one lease TTL
    uris = {r.run_id: _plant_model(mgr, r) for r in (dead, live, fresh)}

    scan = mgr.find_orphaned_models()
    assert {o.uri for o in scan.orphans} == {uris[dead.run_id]}
    assert scan.orphans[0].run_id == dead.run_id and "lease expired" in scan.orphans[0].reason
    assert {s.uri for s in scan.skipped} == {uris[live.run_id], uris[fresh.run_id]}
    assert all("live worker" in s.reason for s in scan.skipped)

    everything = mgr.find_orphaned_models(include_running=True)
    assert {o.uri for o in everything.orphans} == set(uris.values())
    assert mgr.delete_orphaned_model(scan.orphans[0]) is True
    assert not mgr.artifacts.exists(uris[dead.run_id])
    assert mgr.artifacts.exists(uris[live.run_id]) and mgr.artifacts.exists(uris[fresh.run_id])


def test_gc_deletes_orphans_without_leaving_empty_folders(mgr: ExperimentsManager) -> None:
    mgr.set_iteration(iteration(mgr))
    kept = run_with_quality(mgr, Params(lr=0.1), 0.5)
    crashed = _new_run(mgr, "crashed")
    set_lease(mgr, crashed.run_id, expires_in_ms=-5_000)
    uri = _plant_model(mgr, crashed)
    (orphan,) = mgr.find_orphaned_models().orphans
    assert orphan.uri == uri and mgr.delete_orphaned_model(orphan)
    # neither <run>/artifacts nor <run> is left behind, and nothing else was touched
    assert not mgr.artifacts.exists(crashed.artifact_uri)
    assert not mgr.artifacts.exists(_run_folder(crashed))
    assert mgr.get_best_current_run_id() == (kept, False)
    assert mgr.download_model_by_run_id(kept) is not None


# --------------------------------------------------------------------------- empty folders
def test_pruning_leaves_no_empty_folders(mgr: ExperimentsManager) -> None:
    """Deleting a model removes the folders it leaves empty, up to the experiment's."""
    mgr.set_iteration(iteration(mgr))
    worse = run_with_quality(mgr, Params(lr=0.1), 0.2)
    better = run_with_quality(mgr, Params(lr=0.2), 0.9)  # keep=1: `worse` is pruned
    runs = {r.run_id: r for r in mgr.get_runs(mgr.current_experiment_id or "")}
    assert mgr.get_best_current_run_id() == (better, False)
    assert not mgr.artifacts.exists(runs[worse].artifact_uri)
    assert not mgr.artifacts.exists(_run_folder(runs[worse]))
    experiment_folder = _run_folder(runs[better]).rsplit("/", 1)[0]

    assert mgr.delete_model(better) is True  # the experiment's last model
    assert not mgr.artifacts.exists(_run_folder(runs[better]))
    if mgr.artifacts.has_directories:  # the experiment's own folder stays
        assert mgr.artifacts.exists(experiment_folder)


# --------------------------------------------------------------------------- missing files
def test_marked_models_without_files_are_found_and_unmarked(mgr: ExperimentsManager) -> None:
    """The bucket emptied under a live project: every marked model is reported; unmarking
    them stops serving them, and lets the initial model be uploaded again."""
    mgr.upload_initial_model(tiny_model(1))
    mgr.set_iteration(iteration(mgr))
    best = run_with_quality(mgr, Params(lr=0.1), 0.5)
    initial = mgr.get_initial_model_run_id()
    assert initial is not None
    assert mgr.find_models_missing_files().missing == ()

    for run_id in (best, initial):  # the files go, the marks stay
        run = mgr.get_run_by_id(run_id)
        assert run is not None
        assert mgr.artifacts.delete_tree(run.tags[T.TAG_MODEL_URI])
    scan = mgr.find_models_missing_files()
    assert {m.run_id for m in scan.missing} == {best, initial}
    assert scan.checked >= 2 and not any(m.live for m in scan.missing)
    assert {m.run_id for m in mgr.find_orphaned_models().missing} == {best, initial}

    assert all(mgr.unmark_model_missing_files(m) for m in scan.missing)
    assert mgr.find_models_missing_files().missing == ()
    assert mgr.get_best_current_run_id() == (None, False)  # no longer served
    history = mgr.tracking.get_metric_history(best, T.METRIC_MODEL_DELETED)
    assert [m.value for m in history] == [1.0]  # marked deleted, as a deletion does
    assert not mgr.has_initial_model()
    assert mgr.upload_initial_model(tiny_model(2)) is True
    assert mgr.download_initial_model() is not None


def test_missing_files_of_a_live_run_are_reported_not_unmarked(mgr: ExperimentsManager) -> None:
    """A live worker may be rewriting its model (old files removed, new ones not yet
    written): its run is reported as live and never unmarked."""
    mgr.set_iteration(iteration(mgr))
    run = _new_run(mgr, "rewriting")
    set_lease(mgr, run.run_id, expires_in_ms=600_000)
    uri = f"{run.artifact_uri.rstrip('/')}/{T.MODEL_DIR}"
    marks = {T.TAG_MODEL_URI: uri, T.TAG_MODEL_UPLOADED: T.TRUE}
    mgr.tracking.log_batch(run.run_id, [MetricValue(T.METRIC_MODEL_UPLOADED, 1.0)], None, marks)
    (found,) = mgr.find_models_missing_files().missing
    assert found.run_id == run.run_id and found.live
    assert mgr.unmark_model_missing_files(found) is False
    fresh = mgr.get_run_by_id(run.run_id)
    assert fresh is not None and fresh.tags[T.TAG_MODEL_UPLOADED] == T.TRUE

    set_lease(mgr, run.run_id, expires_in_ms=-5_000)  # the worker died
    (found,) = mgr.find_models_missing_files().missing
    assert not found.live and mgr.unmark_model_missing_files(found) is True
    query = RunQuery((mgr.current_experiment_id or "",), tags={T.TAG_MODEL_UPLOADED: T.TRUE})
    assert mgr.tracking.search_runs(query) == []


# --------------------------------------------------------------------------- incomplete uploads
def test_gc_aborts_incomplete_uploads_of_dead_workers(
    backend: BackendUnderTest, mgr: ExperimentsManager
) -> None:
    """kill -9 during a big upload leaves an incomplete upload; gc aborts it once the run's
    worker is known dead, and leaves nothing under the run."""
    if "multipart" not in backend.capabilities or "processes" not in backend.capabilities:
        pytest.skip("interrupted uploads leave nothing behind on this backend")
    mgr.set_iteration(iteration(mgr))
    run = _new_run(mgr, "killed")
    uri = f"{run.artifact_uri.rstrip('/')}/{T.MODEL_DIR}"
    kill_mid_upload(backend, mgr.artifacts, uri)
    (pending,) = mgr.artifacts.list_incomplete_uploads(mgr.artifacts.root)
    assert pending.uri == f"{uri}/weights.bin" and pending.initiated_ms is not None

    scan = mgr.find_orphaned_models()  # the run was just created: maybe still set up
    assert scan.uploads == () and [u.run_id for u in scan.skipped_uploads] == [run.run_id]
    set_lease(mgr, run.run_id, expires_in_ms=-5_000)  # its worker is gone
    scan = mgr.find_orphaned_models()
    (upload,) = scan.uploads
    assert upload.run_id == run.run_id and upload.upload_id == pending.upload_id
    mgr.abort_orphaned_upload(upload)
    for orphan in scan.orphans:
        mgr.delete_orphaned_model(orphan)
    assert mgr.artifacts.list_incomplete_uploads(mgr.artifacts.root) == []
    assert not mgr.artifacts.exists(_run_folder(run))
    mgr.abort_orphaned_upload(upload)  # already gone: no error


# --------------------------------------------------------------------------- abandoned twins
def test_gc_deletes_twins_their_creators_left(
    backend: BackendUnderTest, clock: SteppedClock
) -> None:
    """A run created and never claimed beside another run of its name (its creator was
    killed after a lost ``create_run`` answer made it create a twin) is deleted by gc once
    past its creation's grace. Left alone: the run of that name that was trained, a lone
    unclaimed run (``set_run`` resumes it), the oldest of twins all left, runs of other
    tools, and a twin a worker claims between the scan and the deletion."""
    grace = 60.0  # on the stepped clock: a real worker's lease time costs nothing
    mgr = backend.connect(
        model_format="state_dict", model_factory=tiny_model, params_type=Params,
        lease_seconds=grace, clock=clock,
    )  # fmt: skip
    mgr.set_iteration(iteration(mgr))
    experiment = mgr.current_experiment_id or ""
    trained = run_with_quality(mgr, Params(lr=0.1), 0.5)
    trained_run = mgr.tracking.get_run(trained)
    assert trained_run is not None
    ours = {T.TAG_PLUGIN: mgr.plugin_name}
    twin = mgr.tracking.create_run(experiment, trained_run.run_name, ours)
    lone = mgr.tracking.create_run(experiment, "lone", ours)
    pair = [mgr.tracking.create_run(experiment, "pair", ours) for _ in range(2)]
    claimed_later = mgr.tracking.create_run(experiment, trained_run.run_name, ours)
    foreign = [mgr.tracking.create_run(experiment, "other-tool", {}) for _ in range(2)]
    assert mgr.find_orphaned_models().twins == ()  # within their grace: maybe being set up

    clock.advance(grace + 5)
    twins = {t.run_id: t for t in mgr.find_orphaned_models().twins}
    oldest, younger = sorted(pair, key=lambda r: (r.start_time_ms, r.run_id))
    assert set(twins) == {twin.run_id, claimed_later.run_id, younger.run_id}
    assert twins[twin.run_id].kept_run_id == trained
    assert twins[twin.run_id].run_name == trained_run.run_name
    assert twins[younger.run_id].kept_run_id == oldest.run_id

    set_lease(mgr, claimed_later.run_id, expires_in_ms=60_000)  # a worker took it meanwhile
    assert mgr.delete_abandoned_twin(twins[claimed_later.run_id]) is False
    assert mgr.delete_abandoned_twin(twins[twin.run_id]) is True
    assert mgr.delete_abandoned_twin(twins[younger.run_id]) is True
    assert mgr.delete_abandoned_twin(twins[twin.run_id]) is False  # already gone
    gone = {twin.run_id, younger.run_id}
    for run in [trained_run, twin, lone, *pair, claimed_later, *foreign]:
        assert (mgr.tracking.get_run(run.run_id) is None) == (run.run_id in gone), run.run_name
    assert mgr.find_orphaned_models().twins == ()
    assert mgr.get_best_current_run_id() == (trained, False)


__all__ = [*sorted(name for name in globals() if name.startswith("test_")), "clock", "mgr"]
