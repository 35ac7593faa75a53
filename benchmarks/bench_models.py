"""Saving then downloading models: tracker-core vs MLflow artifacts vs a raw fsspec copy.

Models: ``state_dict`` of one ``torch.nn.Linear`` (float32) of about ``--mb`` MiB each (50 and
100 by default), and a tokenizer-like folder of ``--files`` files (20 by default, tens to
hundreds of KB each, some in a subfolder) written by a small codec registered here. Storages:
a local folder, S3 on moto's server, GCS on the emulator. For each, the ways move the same
bytes:

- ``ours``: ``ExperimentsManager.save_model`` (serialise, upload, mark the run, rank it
  against the iteration's other models) and ``download_model_files`` (files only, no load;
  it reads the run first: the ``get_run`` row shows that share);
- ``mlflow``: serialise to a temporary folder + ``MlflowClient.log_artifacts``, and
  ``MlflowClient.download_artifacts``;
- ``raw``: serialise to a temporary folder + fsspec ``put_file`` / ``get_file`` of the weights
  (for the folder: fsspec's own recursive ``put`` / ``get``), on the plain filesystem with its
  library's defaults (``s3fs.S3FileSystem``, ``gcsfs.GCSFileSystem``; on the GCS emulator with
  ``batch_size=4``, as ours: with fsspec's default, every file at once, the emulator resets
  connections). A second raw row drives the very filesystem tracker-core's store holds, to
  split our bookkeeping from the transfer.

Every repetition runs every way once, one after the other (interleaved), so load from other
processes on the machine falls on all ways alike; the median of ``--repeat`` is reported.
Saving includes serialisation in every row (``serialise only`` shows its share). Tracking is
in-process SQLite; iteration and run creation are not timed.

    .venv/bin/python benchmarks/bench_models.py [--mb 50,100] [--files 20] [--repeat 5]
        [--storages local,s3,gcs] [--json]
"""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # before mlflow is imported
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported

import contextlib
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import AWS_TEST_ENV, Row, base_parser, emit, quiet_logs

import tracker_core
from tracker_core import FineTuningIteration, FineTuningParams, MetricValue
from tracker_core import codecs as codec_registry
from tracker_core.codecs import ModelCodec
from tracker_core.testing.servers import gcs_emulator, moto_server

PLUGIN = "bench-models"
WEIGHTS = "state_dict.pt"
FOLDER_FORMAT = "bench-folder"


@attrs.frozen
class Params(FineTuningParams):
    seed: int


class FolderCodec(ModelCodec):
    """A model that is a folder of files (a tokenizer): ``{relative path: bytes}``."""

    name = FOLDER_FORMAT

    def save(self, model: Any, directory: Path, requirements: Sequence[str] | None = None) -> None:
        for rel, data in model.items():
            path = directory / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def load(self, directory: Path, model_factory: Any = None) -> Any:
        return {
            p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*"))
            if p.is_file()
        }


def tokenizer_folder(files: int) -> dict[str, bytes]:
    """``files`` files of 20-400 KB, as a tokenizer's: a few named ones, the rest in a
    subfolder; random bytes (nothing compresses them), the same every run."""
    rng = random.Random(0)
    named = [
        "tokenizer.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    ]
    names = named[:files] + [f"assets/part-{i:02d}.json" for i in range(max(0, files - 6))]
    return {name: rng.randbytes(rng.randint(20_000, 400_000)) for name in names}


@attrs.frozen
class Kind:
    """One model to move: how tracker-core saves it, and what the other ways serialise."""

    label: str
    model_format: str
    model: Any
    factory: Callable[[], Any] | None
    #: serialise the model into a folder (what MLflow and the raw copy move)
    write: Callable[[Path], None]
    #: the raw copy moves this one file with put_file/get_file; None: the whole folder
    single_file: str | None
    nbytes: int


def state_dict_kind(mb: float) -> Kind:
    import torch

    torch.manual_seed(0)
    features = int(math.sqrt(mb * 2**20 / 4))
    model = torch.nn.Linear(features, features)
    nbytes = sum(p.numel() for p in model.parameters()) * 4
    return Kind(
        label=f"{nbytes / 2**20:.0f} MiB state_dict",
        model_format="state_dict",
        model=model,
        factory=lambda: torch.nn.Linear(features, features),
        write=lambda folder: torch.save(model.state_dict(), folder / WEIGHTS),
        single_file=WEIGHTS,
        nbytes=nbytes,
    )


def folder_kind(files: int) -> Kind:
    model = tokenizer_folder(files)
    nbytes = sum(len(v) for v in model.values())
    return Kind(
        label=f"{files} files, {nbytes / 2**20:.1f} MiB",
        model_format=FOLDER_FORMAT,
        model=model,
        factory=None,
        write=lambda folder: FolderCodec().save(model, folder),
        single_file=None,
        nbytes=nbytes,
    )


@attrs.frozen
class Way:
    name: str
    save: Callable[[], None]
    download: Callable[[], None]
    setup: Callable[[], None] | None = None


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_kind(
    storage: str,
    root_uri: str,
    raw_fs: Any,
    work: Path,
    kind: Kind,
    repeat: int,
) -> list[Row]:
    from mlflow import MlflowClient

    work.mkdir(parents=True)
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    root_uri = f"{root_uri}/{uuid.uuid4().hex[:8]}"
    mgr = tracker_core.connect(
        root_uri,
        tracking_uri=tracking_uri,
        main_metric="quality",
        plugin_name=PLUGIN,
        model_format=kind.model_format,
        model_factory=kind.factory,
        params_type=Params,
    )
    tuned_fs: Any = getattr(mgr.artifacts, "fs", None)
    client = MlflowClient(tracking_uri)
    naive_experiment = client.create_experiment(
        f"naive-{uuid.uuid4().hex[:8]}", artifact_location=f"{root_uri}/naive"
    )
    raw_root = f"{root_uri}/raw"
    state: dict[str, Any] = {}
    counter = iter(range(10**6))
    downloads: list[Path] = []

    def fresh_dir(name: str, create: bool = True) -> Path:
        path = work / "downloads" / f"{name}-{next(counter)}"
        if create:
            path.mkdir(parents=True)
        downloads.append(path)
        return path

    def serialise() -> Path:
        staging = Path(tempfile.mkdtemp(prefix="bench-staging-", dir=work))
        kind.write(staging)
        return staging

    # -- ours
    def ours_setup() -> None:
        k = next(counter)
        mgr.set_iteration(FineTuningIteration(plugin_name=PLUGIN, batch_id=f"b{k}"))
        mgr.set_run(Params(seed=k))
        mgr.save_metric(MetricValue("quality", 1.0))
        mgr.flush_metrics()

    def ours_save() -> None:
        assert mgr.save_model(kind.model)
        state["ours_run"] = mgr.current_run_id

    def ours_download() -> None:
        mgr.download_model_files(state["ours_run"], fresh_dir("ours"))

    def get_run_only() -> None:
        assert mgr.get_run_by_id(state["ours_run"]) is not None

    # -- MLflow
    def mlflow_setup() -> None:
        state["mlflow_run"] = client.create_run(naive_experiment).info.run_id

    def mlflow_save() -> None:
        staging = serialise()
        try:
            client.log_artifacts(state["mlflow_run"], str(staging), "model")
        finally:
            shutil.rmtree(staging)

    def mlflow_download() -> None:
        into = fresh_dir("mlflow")
        client.download_artifacts(state["mlflow_run"], "model", str(into))
        downloads[-1] = into / "model"  # MLflow keeps the artifact path

    # -- raw fsspec
    def raw_save(fs: Any, key: str) -> Callable[[], None]:
        def save() -> None:
            staging = serialise()
            try:
                folder = fs._strip_protocol(f"{raw_root}/{key}-{next(counter)}")
                state[key] = folder
                if kind.single_file is None:
                    fs.put(str(staging), folder, recursive=True)
                else:
                    fs.makedirs(folder, exist_ok=True)
                    fs.put_file(str(staging / kind.single_file), f"{folder}/{kind.single_file}")
            finally:
                shutil.rmtree(staging)

        return save

    def raw_download(fs: Any, key: str) -> Callable[[], None]:
        def download() -> None:
            if kind.single_file is None:
                fs.get(state[key], str(fresh_dir(key, create=False)), recursive=True)
            else:
                local = fresh_dir(key) / kind.single_file
                fs.get_file(f"{state[key]}/{kind.single_file}", str(local))

        return download

    ways = [
        Way("tracker-core save_model / download_model_files", ours_save, ours_download, ours_setup),
        Way(
            "MLflow log_artifacts / download_artifacts", mlflow_save, mlflow_download, mlflow_setup
        ),
        Way("raw fsspec, library defaults", raw_save(raw_fs, "raw"), raw_download(raw_fs, "raw")),
    ]
    if tuned_fs is not None and type(tuned_fs) is not type(raw_fs):
        ways.append(
            Way(
                "raw fsspec, tracker-core's filesystem",
                raw_save(tuned_fs, "tuned"),
                raw_download(tuned_fs, "tuned"),
            )
        )

    for way in ways:  # warm up each path once, untimed (imports, connections, caches)
        if way.setup is not None:
            way.setup()
        way.save()
        way.download()

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(max(1, repeat)):
        times.setdefault(("save", "serialise only"), []).append(
            _timed(lambda: shutil.rmtree(serialise()))
        )
        for way in ways:
            if way.setup is not None:
                way.setup()
            times.setdefault(("save", way.name), []).append(_timed(way.save))
            times.setdefault(("download", way.name), []).append(_timed(way.download))
        times.setdefault(("download", "get_run only (part of ours)"), []).append(
            _timed(get_run_only)
        )
        for path in downloads:  # every download is complete
            _check_download(path, kind)
        shutil.rmtree(work / "downloads")
        downloads.clear()
    mgr.close()

    medians = {key: statistics.median(values) for key, values in times.items()}
    raw = {op: t for (op, name), t in medians.items() if name.startswith("raw fsspec, library")}
    mlflow = {op: t for (op, name), t in medians.items() if name.startswith("MLflow")}
    return [
        {
            "storage": storage,
            "model": kind.label,
            "op": op,
            "way": name,
            "seconds": t,
            "MB/s": kind.nbytes / 2**20 / t,
            "x raw": t / raw[op],
            "x mlflow": t / mlflow[op],
        }
        for (op, name), t in sorted(medians.items(), key=lambda item: item[0][0] != "save")
    ]


def _check_download(path: Path, kind: Kind) -> None:
    """A download holds every file of the model, whole."""
    if kind.single_file is not None:
        assert (path / kind.single_file).stat().st_size > kind.nbytes, path
        return
    got = {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*") if p.is_file()}
    want = {rel: len(data) for rel, data in kind.model.items()}
    assert got == want, (path, sorted(set(got) ^ set(want)))


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--mb", default="50,100", help="state_dict sizes in MiB (about)")
    parser.add_argument("--files", type=int, default=20, help="files of the folder model")
    parser.add_argument("--storages", default="local,s3,gcs", help="of local, s3, gcs")
    parser.set_defaults(repeat=5)
    args = parser.parse_args()
    quiet_logs()
    storages = [s.strip() for s in args.storages.split(",") if s.strip()]

    import fsspec

    codec_registry._codecs[FOLDER_FORMAT] = FolderCodec()  # a codec for this process only
    kinds = [state_dict_kind(float(mb)) for mb in args.mb.split(",") if mb.strip()]
    if args.files:
        kinds.append(folder_kind(args.files))

    rows: list[Row] = []
    loads = [os.getloadavg()[0]]
    with (
        contextlib.redirect_stdout(sys.stderr),
        tempfile.TemporaryDirectory(prefix="bench-models-") as tmp,
        contextlib.ExitStack() as servers,
    ):
        root = Path(tmp)
        for storage in storages:
            if storage == "local":
                (root / "store").mkdir()
                label, root_uri, raw_fs = "local folder", (root / "store").as_uri(), None
                raw_fs = fsspec.filesystem("file")
            elif storage == "s3":
                import s3fs

                os.environ.update(AWS_TEST_ENV)
                endpoint = servers.enter_context(moto_server(root / "moto"))
                os.environ["MLFLOW_S3_ENDPOINT_URL"] = endpoint
                raw_fs = s3fs.S3FileSystem(endpoint_url=endpoint)
                raw_fs.mkdir("bench-models")
                label, root_uri = "S3 (moto)", "s3://bench-models/root"
            elif storage == "gcs":
                import gcsfs

                endpoint = servers.enter_context(gcs_emulator(root / "gcs"))
                os.environ["STORAGE_EMULATOR_HOST"] = endpoint  # MLflow's google-cloud-storage
                os.environ["GOOGLE_CLOUD_PROJECT"] = "bench"
                from tracker_core_gcs.backend import DEFAULT_BATCH_SIZE

                # the emulator is a single-threaded HTTP/1.0 server that queues 6 connections:
                # fsspec's default batch (every file at once) gets connections reset there
                raw_fs = gcsfs.GCSFileSystem(
                    endpoint_url=endpoint,
                    token="anon",
                    project="bench",
                    batch_size=DEFAULT_BATCH_SIZE,
                )
                raw_fs.mkdir("bench-models")
                label, root_uri = "GCS (emulator)", "gs://bench-models/root"
            else:
                parser.error(f"unknown storage {storage!r}")
            for i, kind in enumerate(kinds):
                work = root / f"{storage}-{i}"
                rows += bench_kind(label, root_uri, raw_fs, work, kind, args.repeat)
                loads.append(os.getloadavg()[0])
    emit(
        "bench_models: save then download, "
        + ", ".join(k.label for k in kinds)
        + f"; {', '.join(storages)}",
        rows,
        ["storage", "model", "op", "way", "seconds", "MB/s", "x raw", "x mlflow"],
        args.json,
        {
            "repeat": args.repeat,
            "load average (1 min) before / during / after": (
                f"{loads[0]:.1f} / {statistics.median(loads):.1f} / {loads[-1]:.1f}"
            ),
        },
    )


if __name__ == "__main__":
    main()
