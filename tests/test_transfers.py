"""Moving a model's files on S3 (moto) and GCS (emulator): requests per file, streaming.

Requests are counted on the real filesystems (never timed): a file moves in as few requests
as its size allows, and a big object read in ranges is never mixed from two versions. What
every artifact store does with folders, manifests and progress is the artifact contract
(:mod:`tracker_core.testing.contract_artifacts`, on every store); a manifest too long for a
tag is the manager's, tested here once.
"""

from __future__ import annotations

import math
import random
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from _s3gcs_fixtures import *  # noqa: F403 - the fixtures
from _s3gcs_fixtures import SmallParams
from fsspec.callbacks import Callback

import tracker_core
from tracker_core import ExperimentsManager, FineTuningIteration, MetricValue
from tracker_core import tags as T
from tracker_core.errors import TransientError
from tracker_core.fsspec_store import FsspecArtifactStore
from tracker_core.testing.contract_artifacts import (  # noqa: F401 - folder_codec: a fixture
    FOLDER,
    FolderCodec,
    files_of,
    folder_codec,
    tokenizer,
)


def _save(manager: ExperimentsManager, model: dict[str, bytes]) -> str:
    manager.set_iteration(FineTuningIteration(plugin_name="transfers", batch_id="b"))
    manager.set_run(SmallParams())
    manager.save_metric(MetricValue("quality", 0.5))
    assert manager.save_model(model) is True
    run_id = manager.current_run_id
    assert run_id is not None
    return run_id


@pytest.mark.usefixtures("folder_codec", "_base_env")
def test_a_manifest_too_long_for_a_tag_is_left_out_and_the_model_still_round_trips(
    tmp_path: Path, sqlite_tracking_uri: str
) -> None:
    manager = tracker_core.connect(
        str(tmp_path / "models"),
        tracking_uri=sqlite_tracking_uri,
        main_metric="quality",
        plugin_name="transfers",
        model_format=FOLDER,
    )
    model = {f"shards/shard-{i:05d}-of-00300.bin": b"x" * (i + 1) for i in range(300)}
    run_id = _save(manager, model)
    run = manager.get_run_by_id(run_id)
    assert run is not None and T.TAG_MODEL_FILES not in run.tags
    assert files_of(manager.download_model_files(run_id, tmp_path / "down")) == model
    manager.close()


# ------------------------------------------------------------------ S3: requests per file
MiB = 2**20


class S3Calls:
    """Counts the S3 API calls of a filesystem, by name (``kwargs``: their arguments)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fs: Any) -> None:
        self.calls: list[str] = []
        self.kwargs: list[dict[str, Any]] = []
        call_s3 = fs._call_s3

        async def counted(method: str, *args: Any, **kwargs: Any) -> Any:
            self.calls.append(method)
            self.kwargs.append(kwargs)
            return await call_s3(method, *args, **kwargs)

        monkeypatch.setattr(fs, "_call_s3", counted)


@pytest.fixture
def s3fs_tuned(s3_bucket: str, moto_endpoint: str) -> Any:
    from tracker_core_s3 import s3_filesystem

    return s3_filesystem({"endpoint_url": moto_endpoint, "skip_instance_cache": True})


def test_s3_a_file_up_to_a_download_part_is_one_get(
    s3fs_tuned: Any, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s3fs asks for the whole object, drops the response and starts again in ranges."""
    data = random.Random(5).randbytes(20 * MiB + 3)
    (tmp_path / "w.bin").write_bytes(data)
    s3fs_tuned.put_file(str(tmp_path / "w.bin"), f"{s3_bucket}/w.bin")
    calls = S3Calls(monkeypatch, s3fs_tuned)
    s3fs_tuned.get_file(f"{s3_bucket}/w.bin", str(tmp_path / "back.bin"))
    assert calls.calls == ["get_object"]
    assert (tmp_path / "back.bin").read_bytes() == data


def test_s3_a_bigger_file_reads_its_first_part_from_the_first_get(
    s3fs_tuned: Any, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3fs_tuned.download_part_size = 6 * MiB
    data = random.Random(6).randbytes(17 * MiB + 11)
    (tmp_path / "w.bin").write_bytes(data)
    s3fs_tuned.put_file(str(tmp_path / "w.bin"), f"{s3_bucket}/w.bin")
    calls = S3Calls(monkeypatch, s3fs_tuned)
    s3fs_tuned.get_file(f"{s3_bucket}/w.bin", str(tmp_path / "back.bin"))
    assert calls.calls == ["get_object"] * 3  # ceil(17 / 6) parts, none fetched twice
    # three parts of (nearly) equal length: the first from the first (whole-object) GET
    part = math.ceil(len(data) / 3)
    assert "Range" not in calls.kwargs[0]
    assert [kw["Range"] for kw in calls.kwargs[1:]] == [
        f"bytes={part}-{2 * part - 1}",
        f"bytes={2 * part}-{len(data) - 1}",
    ]
    assert (tmp_path / "back.bin").read_bytes() == data


def test_s3_an_object_rewritten_during_a_ranged_download_is_not_mixed(
    s3fs_tuned: Any, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ranges are pinned to the first response's ETag: a rewrite in between fails the
    download (transient: a retry reads the new version whole) and leaves no file."""
    s3fs_tuned.download_part_size = 5 * MiB
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(random.Random(7).randbytes(12 * MiB))
    new.write_bytes(random.Random(8).randbytes(12 * MiB))
    s3fs_tuned.put_file(str(old), f"{s3_bucket}/w.bin")
    call_s3 = s3fs_tuned._call_s3
    rewritten: list[bool] = []

    async def rewrite_after_first_get(method: str, *args: Any, **kwargs: Any) -> Any:
        out = await call_s3(method, *args, **kwargs)
        if method == "get_object" and not rewritten:
            rewritten.append(True)
            await s3fs_tuned._put_file(str(new), f"{s3_bucket}/w.bin")
        return out

    monkeypatch.setattr(s3fs_tuned, "_call_s3", rewrite_after_first_get)
    with pytest.raises(TransientError, match="rewritten"):
        s3fs_tuned.get_file(f"{s3_bucket}/w.bin", str(tmp_path / "back.bin"))
    assert not (tmp_path / "back.bin").exists()


def test_s3_uploads_are_one_put_under_two_parts_and_multipart_with_part_checksums_above(
    s3fs_tuned: Any, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts carry CRC32 checksums that S3 checks, and the object a composite of them."""
    from tracker_core_s3.backend import DEFAULT_BLOCK_SIZE

    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    small.write_bytes(random.Random(9).randbytes(2 * DEFAULT_BLOCK_SIZE - 1))
    big.write_bytes(random.Random(10).randbytes(2 * DEFAULT_BLOCK_SIZE + 5))
    calls = S3Calls(monkeypatch, s3fs_tuned)
    s3fs_tuned.put_file(str(small), f"{s3_bucket}/small.bin")
    assert calls.calls == ["put_object"]
    calls.calls.clear()
    calls.kwargs.clear()
    s3fs_tuned.put_file(str(big), f"{s3_bucket}/big.bin")
    assert calls.calls == [
        "create_multipart_upload",
        *["upload_part"] * 3,
        "complete_multipart_upload",
    ]
    assert calls.kwargs[0]["ChecksumAlgorithm"] == "CRC32"
    parts = calls.kwargs[-1]["MultipartUpload"]["Parts"]
    assert [p["PartNumber"] for p in parts] == [1, 2, 3] and all(p["ChecksumCRC32"] for p in parts)
    for path in (small, big):
        assert s3fs_tuned.cat_file(f"{s3_bucket}/{path.name}") == path.read_bytes()


# ------------------------------------------------------------------ GCS: requests per file
def test_gcs_a_download_asks_no_metadata_first(
    gcs_bucket: str, gcs_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gcsfs asks for the object's metadata before every download, a round trip of its own."""
    from tracker_core_gcs import gcs_filesystem

    fs = gcs_filesystem(
        {
            "endpoint_url": gcs_endpoint,
            "token": "anon",
            "project": "test",
            "skip_instance_cache": True,
        }
    )
    data = random.Random(11).randbytes(3 * MiB + 1)
    (tmp_path / "w.bin").write_bytes(data)
    fs.put_file(str(tmp_path / "w.bin"), f"{gcs_bucket}/w.bin")
    infos: list[str] = []
    info = fs._info

    async def counted(path: str, **kwargs: Any) -> Any:
        infos.append(path)
        return await info(path, **kwargs)

    monkeypatch.setattr(fs, "_info", counted)
    fs.get_file(f"{gcs_bucket}/w.bin", str(tmp_path / "back.bin"))
    assert infos == []
    assert (tmp_path / "back.bin").read_bytes() == data

    fs.download_part_size = MiB  # in ranges too
    fs.get_file(f"{gcs_bucket}/w.bin", str(tmp_path / "ranged.bin"))
    assert infos == []
    assert (tmp_path / "ranged.bin").read_bytes() == data


# ------------------------------------------------ streamed in bounded memory, failure paths
BIG = 40 * MiB


def _big_file(tmp_path: Path, seed: int = 12) -> Path:
    path = tmp_path / "big.bin"
    path.write_bytes(random.Random(seed).randbytes(BIG + 7))
    return path


def _warm(fs: Any, bucket: str, tmp_path: Path) -> None:
    """One small round trip first, so the client's one-time setup (botocore loads its
    service model, ~10 MB) is not counted as the transfer's."""
    (tmp_path / "warm.bin").write_bytes(b"warm")
    fs.put_file(str(tmp_path / "warm.bin"), f"{bucket}/warm.bin")
    fs.get_file(f"{bucket}/warm.bin", str(tmp_path / "warm-back.bin"))


def _peak(fn: Any, *args: Any) -> int:
    """Bytes of Python memory ``fn(*args)`` held at most at once (tracemalloc's peak)."""
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _gcs_fs(gcs_endpoint: str) -> Any:
    from tracker_core_gcs import gcs_filesystem

    options = {"endpoint_url": gcs_endpoint, "token": "anon", "project": "test"}
    return gcs_filesystem({**options, "skip_instance_cache": True})


def test_s3_a_file_moves_through_a_few_buffers_whatever_its_size(
    s3fs_tuned: Any, s3_bucket: str, tmp_path: Path
) -> None:
    """A multipart upload and a ranged download of a 40 MiB file hold under a quarter of it
    (s3fs reads a whole file under two parts into memory, a part per upload in flight and a
    whole range per ranged GET)."""
    big = _big_file(tmp_path)
    remote = f"{s3_bucket}/big.bin"
    _warm(s3fs_tuned, s3_bucket, tmp_path)
    assert _peak(s3fs_tuned.put_file, str(big), remote) < BIG / 4
    for part_size in (BIG * 2, 12 * MiB):  # one GET, then four ranges
        s3fs_tuned.download_part_size = part_size
        back = tmp_path / f"back-{part_size}.bin"
        assert _peak(s3fs_tuned.get_file, remote, str(back)) < BIG / 4
        assert back.read_bytes() == big.read_bytes()


def test_gcs_a_file_moves_through_a_few_buffers_whatever_its_size(
    gcs_bucket: str, gcs_endpoint: str, tmp_path: Path
) -> None:
    """gcsfs reads each 16 MiB upload chunk into memory (and the next before the last is
    freed), and a ranged download's ranges too."""
    fs = _gcs_fs(gcs_endpoint)
    big = _big_file(tmp_path)
    remote = f"{gcs_bucket}/big.bin"
    _warm(fs, gcs_bucket, tmp_path)
    assert _peak(fs.put_file, str(big), remote) < BIG / 4
    for part_size in (BIG * 2, 12 * MiB):
        fs.download_part_size = part_size
        back = tmp_path / f"back-{part_size}.bin"
        assert _peak(fs.get_file, remote, str(back)) < BIG / 4
        assert back.read_bytes() == big.read_bytes()


class Bytes(Callback):  # type: ignore[misc]
    """fsspec's per-file callback, keeping every (value, size) it was told."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def call(self, *args: Any, **kwargs: Any) -> None:
        self.seen.append((self.value, self.size))


@pytest.mark.parametrize("leg", ["s3", "gcs"])
def test_progress_of_one_big_file_rises_to_its_size_in_steps(
    leg: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Bytes done / total while one file moves in parts (up) and in ranges (down)."""
    if leg == "s3":
        fs, bucket = request.getfixturevalue("s3fs_tuned"), request.getfixturevalue("s3_bucket")
    else:
        fs = _gcs_fs(request.getfixturevalue("gcs_endpoint"))
        bucket = request.getfixturevalue("gcs_bucket")
    big = _big_file(tmp_path)
    size = big.stat().st_size
    fs.download_part_size = 12 * MiB
    up, down = Bytes(), Bytes()
    fs.put_file(str(big), f"{bucket}/big.bin", callback=up)
    fs.get_file(f"{bucket}/big.bin", str(tmp_path / "back.bin"), callback=down)
    for seen in (up.seen, down.seen):
        assert len(seen) >= 3 and seen[-1] == (size, size)
        assert all(total == size for _, total in seen)
        assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_s3_a_range_failing_mid_download_leaves_no_file(
    s3fs_tuned: Any, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other ranges are cancelled and the partial file removed: a reader never finds a
    file of the right name with holes (s3fs leaves what it wrote)."""
    big = _big_file(tmp_path)
    s3fs_tuned.put_file(str(big), f"{s3_bucket}/big.bin")
    s3fs_tuned.download_part_size = 12 * MiB
    call_s3 = s3fs_tuned._call_s3
    ranges: list[str] = []

    async def second_range_fails(method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "get_object" and "Range" in kwargs:
            ranges.append(kwargs["Range"])
            if len(ranges) == 2:
                raise ConnectionResetError("injected: connection reset by peer")
        return await call_s3(method, *args, **kwargs)

    monkeypatch.setattr(s3fs_tuned, "_call_s3", second_range_fails)
    back = tmp_path / "back.bin"
    with pytest.raises(OSError, match="injected"):
        s3fs_tuned.get_file(f"{s3_bucket}/big.bin", str(back))
    assert not back.exists()


def test_gcs_a_range_failing_mid_download_leaves_no_file(
    gcs_bucket: str, gcs_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = _gcs_fs(gcs_endpoint)
    big = _big_file(tmp_path)
    fs.put_file(str(big), f"{gcs_bucket}/big.bin")
    fs.download_part_size = 12 * MiB
    fs.download_concurrency = 2  # one range at a time beside the first GET
    opened: list[dict[str, str]] = []
    open_download = fs._open_download

    async def second_range_fails(url: str, rpath: str, headers: dict[str, str]) -> Any:
        opened.append(headers)
        if len(opened) == 3:
            raise ConnectionResetError("injected: connection reset by peer")
        return await open_download(url, rpath, headers)

    monkeypatch.setattr(fs, "_open_download", second_range_fails)
    back = tmp_path / "back.bin"
    with pytest.raises(OSError, match="injected"):
        fs.get_file(f"{gcs_bucket}/big.bin", str(back))
    assert not back.exists()


def test_s3_a_part_failing_mid_upload_aborts_the_multipart_upload(
    s3fs_tuned: Any, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is left: no object, no open upload holding the parts that landed."""
    big = _big_file(tmp_path)
    call_s3 = s3fs_tuned._call_s3
    calls: list[str] = []

    async def third_part_fails(method: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(method)
        if method == "upload_part" and kwargs["PartNumber"] == 3:
            raise ConnectionResetError("injected: connection reset by peer")
        return await call_s3(method, *args, **kwargs)

    monkeypatch.setattr(s3fs_tuned, "_call_s3", third_part_fails)
    with pytest.raises(OSError, match="injected"):
        s3fs_tuned.put_file(str(big), f"{s3_bucket}/big.bin")
    assert "abort_multipart_upload" in calls and "complete_multipart_upload" not in calls
    assert not s3fs_tuned.call_s3("list_multipart_uploads", Bucket=s3_bucket).get("Uploads")
    assert not s3fs_tuned.exists(f"{s3_bucket}/big.bin")


# ------------------------------------------------------------- a folder over an old one
def test_s3_a_folder_saved_over_an_old_one_costs_its_puts_one_listing_and_one_delete(
    s3fs_tuned: Any, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old folder is listed while the new files are written (no ``exists`` first: two
    requests on S3), then what the new save did not overwrite is deleted in one request."""
    from tracker_core_s3.errors import classify_s3_error
    from tracker_core_s3.store import S3ArtifactStore

    store = S3ArtifactStore(s3fs_tuned, f"s3://{s3_bucket}/m", classifier=classify_s3_error)
    uri = store.join("model")
    first, second = tmp_path / "first", tmp_path / "second"
    FolderCodec().save(tokenizer(files=20, seed=1), first)
    new = tokenizer(files=20, seed=2)
    new = {**{k: v for k, v in new.items() if not k.startswith("assets/")}, "extra.bin": b"x"}
    FolderCodec().save(new, second)
    store.upload_dir(first, uri)

    calls = S3Calls(monkeypatch, s3fs_tuned)
    store.upload_dir(second, uri)
    assert sorted(calls.calls) == sorted(
        ["put_object"] * len(new) + ["list_objects_v2", "delete_objects"]
    )
    store.download_dir(uri, tmp_path / "down")
    assert files_of(tmp_path / "down") == new


def test_gcs_a_folder_saved_over_an_old_one_whose_files_vanish_meanwhile_is_saved(
    gcs_bucket: str, gcs_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retried save whose earlier attempt's delete landed though its answer was lost:
    the old files it listed are gone when it deletes them; gcsfs then raises
    FileNotFoundError ('nothing got deleted'), which means done."""
    from tracker_core_gcs.errors import classify_gcs_error

    fs = _gcs_fs(gcs_endpoint)
    store = FsspecArtifactStore(
        fs, f"gs://{gcs_bucket}/m", classifier=classify_gcs_error, buckets=True
    )
    uri = store.join("model")
    first, second = tmp_path / "first", tmp_path / "second"
    FolderCodec().save(tokenizer(files=6, seed=1), first)
    FolderCodec().save({"only.bin": b"new"}, second)
    store.upload_dir(first, uri)
    find = fs._find

    async def listed_then_deleted_by_the_earlier_attempt(path: str, **kwargs: Any) -> Any:
        found = await find(path, **kwargs)
        await fs._rm(list(found))
        return found

    monkeypatch.setattr(fs, "_find", listed_then_deleted_by_the_earlier_attempt)
    store.upload_dir(second, uri)
    monkeypatch.undo()
    store.download_dir(uri, tmp_path / "down")
    assert files_of(tmp_path / "down") == {"only.bin": b"new"}


def test_gcs_a_chunk_failing_mid_upload_cancels_the_resumable_upload(
    gcs_bucket: str, gcs_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunk's error is the one raised, not the cancel's (the emulator answers the
    cancelling DELETE with 501, which gcsfs raised instead), and no object is left."""
    fs = _gcs_fs(gcs_endpoint)
    big = _big_file(tmp_path)
    call = fs._call
    methods: list[str] = []

    async def second_chunk_fails(method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        methods.append(method)
        if (kwargs.get("headers") or {}).get("Content-Range", "").startswith("bytes 16777216-"):
            raise ConnectionResetError("injected: connection reset by peer")
        return await call(method, path, *args, **kwargs)

    monkeypatch.setattr(fs, "_call", second_chunk_fails)
    with pytest.raises(OSError, match="injected"):
        fs.put_file(str(big), f"{gcs_bucket}/big.bin")
    assert methods[-1] == "DELETE"
    monkeypatch.undo()
    assert not fs.exists(f"{gcs_bucket}/big.bin")


def test_s3_whether_a_model_folder_exists_is_one_request(
    s3fs_tuned: Any, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s3fs asks ``HeadObject`` of the folder's name (no such key) then lists: two round
    trips on every save and every served-model check. A sibling whose name starts alike
    (``model-old``, ``model.bin``) is not the folder."""
    from tracker_core_s3.errors import classify_s3_error
    from tracker_core_s3.store import S3ArtifactStore

    store = S3ArtifactStore(s3fs_tuned, f"s3://{s3_bucket}/m", classifier=classify_s3_error)
    FolderCodec().save({"a/b.bin": b"1", "c.bin": b"2"}, tmp_path / "model")
    store.upload_dir(tmp_path / "model", store.join("run", "model"))
    (tmp_path / "f.bin").write_bytes(b"3")
    for sibling in ("run/model-old/x.bin", "run/model.bin", "run/modelz"):
        s3fs_tuned.put_file(str(tmp_path / "f.bin"), f"{s3_bucket}/m/{sibling}")

    calls = S3Calls(monkeypatch, s3fs_tuned)
    assert store.exists(store.join("run", "model")) is True
    assert store.exists(store.join("run", "model", "a")) is True
    assert store.exists(store.join("run", "model", "c.bin")) is True
    assert store.exists(store.join("run", "mode")) is False
    assert store.exists(store.join("run", "other")) is False
    assert calls.calls == ["list_objects_v2"] * 5
