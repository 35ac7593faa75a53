"""The artifact-store contract: what :class:`~tracker_core.stores.ArtifactStore` promises and
the six invariants (DESIGN.md) rely on, checked on every artifact backend.

- a folder uploaded is downloaded whole; ``exists`` sees a folder, its subfolders and files,
  never a sibling whose name starts alike (a model is written, then marked: invariant 1);
- an upload replaces whatever was there (a retried or repeated save, invariant 5);
- a download given the model's manifest copies exactly its files, with no listing; a file of
  the manifest gone, or nothing there, is ModelNotFoundError (nothing half-written is served,
  invariant 2); a manager round-trips a folder model with and without its manifest;
- ``delete_tree`` removes its tree and nothing beside it; ``find_dirs`` finds model folders at
  the depth asked (gc, invariants 2-3); empty folders go up to the stop, never above;
- an upload a killed writer left open is listed and aborted (capability ``"multipart"``);
  other stores list none (invariant 2);
- progress rises to the total.

Each test takes the ``artifact_store`` fixture (defined here, from an ``artifact_backend``
fixture that yields a :class:`~tracker_core.testing.harness.BackendUnderTest` whose artifact
root is fresh for the test; its tracking side only serves the manager-level tests)::

    from tracker_core.testing.contract_artifacts import *  # noqa: F403
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tracker_core import codecs as codec_registry
from tracker_core import tags as T
from tracker_core.codecs import ModelCodec
from tracker_core.errors import ArtifactStoreError, ModelFilesMissingError, ModelNotFoundError
from tracker_core.manager import ExperimentsManager
from tracker_core.models import ModelKeeper, manifest_of
from tracker_core.stores import ArtifactStore, IncompleteUpload
from tracker_core.testing.harness import BackendUnderTest
from tracker_core.testing.support import Params, iteration, kill_mid_upload
from tracker_core.values import MetricValue

__all__ = [
    "FOLDER",
    "FolderCodec",
    "artifact_store",
    "files_of",
    "folder_codec",
    "tokenizer",
]  # + the tests, at the end

FOLDER = "test-folder"


class FolderCodec(ModelCodec):
    """A model that is a folder of files (a tokenizer): ``{relative path: bytes}``."""

    name = FOLDER

    def save(self, model: Any, directory: Path, requirements: Sequence[str] | None = None) -> None:
        for rel, data in model.items():
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            (directory / rel).write_bytes(data)

    def load(self, directory: Path, model_factory: Any = None) -> Any:
        return {
            p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*"))
            if p.is_file()
        }


def tokenizer(files: int = 20, seed: int = 0) -> dict[str, bytes]:
    """A tokenizer-like folder: a few named files, the rest in a subfolder, 1-60 KB each."""
    rng = random.Random(seed)
    names = ["tokenizer.json", "vocab.txt", "merges.txt", "special_tokens_map.json"]
    names += [f"assets/part-{i:02d}.bin" for i in range(files - len(names))]
    return {name: rng.randbytes(rng.randint(1_000, 60_000)) for name in names}


@pytest.fixture
def folder_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    """:class:`FolderCodec` registered as model format :data:`FOLDER` for this test."""
    monkeypatch.setitem(codec_registry._codecs, FOLDER, FolderCodec())


@pytest.fixture
def artifact_store(artifact_backend: BackendUnderTest) -> Iterator[ArtifactStore]:
    """The artifact store of ``artifact_backend``, as its backend makes it (no retries)."""
    with artifact_backend.stores() as (_, store):
        yield store


def _watch_listings(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The listings (``find``) a store over an fsspec filesystem asks for from now on."""
    listings: list[str] = []
    fs = getattr(store, "fs", None)
    for name in ("find", "_find"):
        real = getattr(fs, name, None)
        if real is not None:

            def counted(*args: Any, _name: str = name, _real: Any = real, **kwargs: Any) -> Any:
                listings.append(_name)
                return _real(*args, **kwargs)

            monkeypatch.setattr(fs, name, counted)
    return listings


def files_of(folder: Path) -> dict[str, bytes]:
    """The files under ``folder``, as :class:`FolderCodec` loads them."""
    files: dict[str, bytes] = FolderCodec().load(folder)
    return files


def _upload(store: ArtifactStore, tmp_path: Path, model: dict[str, bytes], *where: str) -> str:
    source = tmp_path / f"source-{random.getrandbits(32)}"
    FolderCodec().save(model, source)
    uri = store.join(*where)
    store.upload_dir(source, uri)
    return uri


# -- the store ------------------------------------------------------------------------------
def test_a_folder_round_trips_and_exists(artifact_store: ArtifactStore, tmp_path: Path) -> None:
    store = artifact_store
    store.check_root()  # the fixture's root can hold models
    model = {"a/b.bin": b"1", "c.bin": b"2", "a/deeper/d.bin": b"3" * 5000}
    _upload(store, tmp_path, {"model.bin": b"s", "modelz": b"s"}, "run")  # siblings alike
    uri = _upload(store, tmp_path, model, "run", "model")
    _upload(store, tmp_path, {"x.bin": b"s"}, "run", "model-old")
    store.download_dir(uri, tmp_path / "down")
    assert files_of(tmp_path / "down") == model
    assert store.exists(uri) and store.exists(store.join("run", "model", "a"))
    assert store.exists(store.join("run", "model", "c.bin"))
    assert not store.exists(store.join("run", "mode"))
    assert not store.exists(store.join("run", "other"))
    assert store.owns(uri) and not store.owns(store.root + "-elsewhere/x")


def test_an_upload_replaces_whatever_was_there(
    artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    store = artifact_store
    uri = _upload(store, tmp_path, tokenizer(files=12, seed=1), "resaved")
    assert _upload(store, tmp_path, {"only.bin": b"new"}, "resaved") == uri
    store.download_dir(uri, tmp_path / "down")  # listed: sees whatever is there
    assert files_of(tmp_path / "down") == {"only.bin": b"new"}


def test_a_download_with_a_manifest_copies_exactly_its_files(
    artifact_store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exactly the manifest's files are copied, with no listing (a store over an fsspec
    filesystem is watched); a file of the manifest gone is ModelNotFoundError."""
    store = artifact_store
    model = tokenizer(files=8)
    uri = _upload(store, tmp_path, model, "manifest")
    _upload(store, tmp_path, {"stray.bin": b"x"}, "manifest", "assets-extra")
    manifest = {rel: len(data) for rel, data in model.items()}
    listings = _watch_listings(store, monkeypatch)
    store.download_dir(uri, tmp_path / "down", files=manifest)
    monkeypatch.undo()
    assert files_of(tmp_path / "down") == model and listings == []

    assert store.delete_tree(store.join("manifest", "assets", "part-02.bin"))
    with pytest.raises(ModelNotFoundError):
        store.download_dir(uri, tmp_path / "again", files=manifest)


def test_nothing_to_download_is_model_not_found(
    artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    with pytest.raises(ModelNotFoundError):
        artifact_store.download_dir(artifact_store.join("never", "written"), tmp_path / "down")


def test_delete_tree_removes_its_tree_and_nothing_beside_it(
    artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    store = artifact_store
    uri = _upload(store, tmp_path, {"a/b.bin": b"1", "c.bin": b"2"}, "exp", "run", "model")
    beside = _upload(store, tmp_path, {"w.bin": b"3"}, "exp", "run", "model-old")
    assert store.delete_tree(uri) is True
    assert not store.exists(uri) and store.exists(beside)
    assert store.delete_tree(uri) is True  # nothing there: nothing left
    store.remove_empty_folders(store.join("exp", "run", "model"), store.join("exp"))
    assert store.exists(beside)  # not empty: kept
    assert store.delete_tree(beside) is True
    store.remove_empty_folders(store.join("exp", "run", "model-old"), store.join("exp"))
    assert not store.exists(store.join("exp", "run"))
    if store.has_directories:  # the stop itself stays
        assert store.exists(store.join("exp"))


def test_find_dirs_finds_model_folders_at_the_depth_asked(
    artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    store = artifact_store
    for where in (("e1", "r1", "artifacts", "model"), ("e1", "r2", "artifacts", "model")):
        _upload(store, tmp_path, {"w.bin": b"1"}, *where)
    _upload(store, tmp_path, {"model": b"a file, not a folder"}, "e1", "r3", "artifacts")
    _upload(store, tmp_path, {"w.bin": b"1"}, "e1", "deep", "x", "y", "model")
    base = store.join("e1")
    found = store.find_dirs(base, T.MODEL_DIR, max_depth=3)
    assert found == sorted(store.join("e1", r, "artifacts", "model") for r in ("r1", "r2")), found
    assert store.join("e1", "deep", "x", "y", "model") in store.find_dirs(base, "model", 4)
    assert store.find_dirs(store.join("nothing-here"), T.MODEL_DIR, 3) == []


def test_progress_over_a_folder_of_many_files_rises_to_its_total(
    artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    store = artifact_store
    model = tokenizer(files=24, seed=3)
    total = sum(len(v) for v in model.values())
    source = tmp_path / "source"
    FolderCodec().save(model, source)
    uri = store.join("progress-folder")

    def recorder() -> tuple[list[tuple[int, int]], Any]:
        calls: list[tuple[int, int]] = []
        return calls, lambda done, total: calls.append((done, total))

    up, up_progress = recorder()
    store.upload_dir(source, uri, up_progress)
    down, down_progress = recorder()
    manifest = {rel: len(data) for rel, data in model.items()}
    store.download_dir(uri, tmp_path / "down", down_progress, files=manifest)
    listed, listed_progress = recorder()
    store.download_dir(uri, tmp_path / "listed", listed_progress)

    for calls in (up, down, listed):
        assert calls and calls[-1] == (total, total)
        assert all(t == total for _, t in calls)
        assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert files_of(tmp_path / "down") == model == files_of(tmp_path / "listed")


def test_an_upload_a_killed_writer_left_open_is_listed_and_aborted(
    artifact_backend: BackendUnderTest, artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    """Stores whose interrupted writes leave hidden parts (capability ``"multipart"``) list
    the upload and abort it; the others list none and refuse to abort."""
    store = artifact_store
    _upload(store, tmp_path, {"done.bin": b"1"}, "finished")
    if "multipart" not in artifact_backend.capabilities:
        assert store.list_incomplete_uploads(store.root) == []
        with pytest.raises(ArtifactStoreError):
            store.abort_upload(IncompleteUpload(store.join("finished", "done.bin"), "id"))
        return
    uri = store.join("killed", "model")
    kill_mid_upload(artifact_backend, store, uri)
    (pending,) = store.list_incomplete_uploads(store.root)
    assert pending.uri == f"{uri}/weights.bin" and pending.initiated_ms is not None
    store.abort_upload(pending)
    assert store.list_incomplete_uploads(store.root) == []
    store.abort_upload(pending)  # already gone: no error
    assert not store.exists(uri)


# -- a manager over the store: models of many files, with and without their manifest --------
@pytest.fixture
def folder_mgr(artifact_backend: BackendUnderTest, folder_codec: None) -> ExperimentsManager:
    """A manager on ``artifact_backend`` whose models are folders (:class:`FolderCodec`)."""
    return artifact_backend.connect(model_format=FOLDER, params_type=Params)


def _save(manager: ExperimentsManager, model: dict[str, bytes]) -> str:
    manager.set_iteration(iteration(manager))
    manager.set_run(Params(lr=0.1))
    manager.save_metric(MetricValue(manager.main_metric, 0.5))
    assert manager.save_model(model) is True
    run_id = manager.current_run_id
    assert run_id is not None
    return run_id


def test_a_folder_model_round_trips_with_its_manifest(
    folder_mgr: ExperimentsManager, tmp_path: Path
) -> None:
    model = tokenizer()
    run_id = _save(folder_mgr, model)
    run = folder_mgr.get_run_by_id(run_id)
    assert run is not None
    assert manifest_of(run) == {rel: len(data) for rel, data in model.items()}
    folder = folder_mgr.download_model_files(run_id, tmp_path / "down")
    assert files_of(folder) == model
    assert folder_mgr.download_model_by_run_id(run_id) == model


def test_a_model_without_a_manifest_is_listed_and_round_trips(
    folder_mgr: ExperimentsManager, tmp_path: Path
) -> None:
    """Models saved before manifests were recorded (or whose manifest does not fit a tag)."""
    model = tokenizer()
    run_id = _save(folder_mgr, model)
    folder_mgr.tracking.delete_tag(run_id, T.TAG_MODEL_FILES)
    run = folder_mgr.get_run_by_id(run_id)
    assert run is not None and manifest_of(run) is None
    assert files_of(folder_mgr.download_model_files(run_id, tmp_path / "down")) == model
    assert folder_mgr.download_model_by_run_id(run_id) == model


def test_a_file_of_the_manifest_gone_from_the_store_is_missing_model_files(
    folder_mgr: ExperimentsManager, tmp_path: Path
) -> None:
    run_id = _save(folder_mgr, tokenizer())
    run = folder_mgr.get_run_by_id(run_id)
    assert run is not None
    assert folder_mgr.artifacts.delete_tree(f"{ModelKeeper.uri_of(run)}/assets/part-07.bin")
    with pytest.raises(ModelFilesMissingError, match="verify"):
        folder_mgr.download_model_files(run_id, tmp_path / "down")
    with pytest.raises(ModelFilesMissingError):
        folder_mgr.download_model_by_run_id(run_id)


__all__ += [*sorted(name for name in globals() if name.startswith("test_")), "folder_mgr"]
