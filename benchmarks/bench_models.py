"""Saving then downloading a ~50 MB model: tracker-core vs MLflow artifacts vs a raw copy.

The model is one ``torch.nn.Linear`` (float32), written in the ``state_dict`` format. For each
storage (a local folder; S3 on moto's server) three ways move the same bytes:

- ``ours``: ``ExperimentsManager.save_model`` (serialise, upload, mark the run, rank it
  against the iteration's other models) and ``download_model_files`` (files only, no load);
- ``mlflow``: ``torch.save`` to a temporary folder + ``MlflowClient.log_artifacts``, and
  ``MlflowClient.download_artifacts``;
- ``raw``: ``torch.save`` to a temporary folder + fsspec ``put_file``, and ``get_file`` (on S3:
  a plain ``s3fs.S3FileSystem`` with s3fs's defaults). A second raw row uses the very
  filesystem tracker-core's store holds (on S3: 8 MiB parts, 4 in flight), to split our
  bookkeeping from the transfer settings.

Saving includes serialisation in every row (``serialise only`` shows its share). Tracking is
in-process SQLite; iteration and run creation are not timed.

    .venv/bin/python benchmarks/bench_models.py [--mb 50] [--repeat 3] [--json]
"""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # before mlflow is imported

import contextlib
import math
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import AWS_TEST_ENV, Row, base_parser, emit, measure, quiet_logs

import tracker_core
from tracker_core import FineTuningIteration, FineTuningParams, MetricValue
from tracker_core.testing.servers import moto_server

PLUGIN = "bench-models"
FILE = "state_dict.pt"


@attrs.frozen
class Params(FineTuningParams):
    seed: int


def bench_storage(
    label: str, root_uri: str, raw_fs: Any, work: Path, model: Any, repeat: int
) -> list[Row]:
    import torch
    from mlflow import MlflowClient

    work.mkdir(parents=True)
    tracking_uri = f"sqlite:///{work / f'{label.split()[0]}.db'}"
    features = model.in_features
    mgr = tracker_core.connect(
        root_uri,
        tracking_uri=tracking_uri,
        main_metric="quality",
        plugin_name=PLUGIN,
        model_format="state_dict",
        model_factory=lambda: torch.nn.Linear(features, features),
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

    def fresh_dir(name: str) -> Path:
        path = work / f"{name}-{next(counter)}"
        path.mkdir(parents=True)
        return path

    def serialise() -> Path:
        staging = Path(tempfile.mkdtemp(prefix="bench-staging-", dir=work))
        torch.save(model.state_dict(), staging / FILE)
        return staging

    # -- saving
    def ours_setup() -> None:
        k = next(counter)
        mgr.set_iteration(FineTuningIteration(plugin_name=PLUGIN, batch_id=f"b{k}"))
        mgr.set_run(Params(seed=k))
        mgr.save_metric(MetricValue("quality", 1.0))
        mgr.flush_metrics()

    def ours_save() -> None:
        assert mgr.save_model(model)
        state["ours_run"] = mgr.current_run_id

    def mlflow_setup() -> None:
        state["mlflow_run"] = client.create_run(naive_experiment).info.run_id

    def mlflow_save() -> None:
        staging = serialise()
        try:
            client.log_artifacts(state["mlflow_run"], str(staging), "model")
        finally:
            shutil.rmtree(staging)

    def raw_save(fs: Any, key: str) -> Callable[[], None]:
        def save() -> None:
            staging = serialise()
            try:
                state[key] = f"{raw_root}/{key}-{next(counter)}/{FILE}"
                target = fs._strip_protocol(state[key])
                fs.makedirs(fs._parent(target), exist_ok=True)
                fs.put_file(str(staging / FILE), target)
            finally:
                shutil.rmtree(staging)

        return save

    def serialise_only() -> None:
        shutil.rmtree(serialise())

    # -- downloading
    def ours_download() -> None:
        mgr.download_model_files(state["ours_run"], fresh_dir("ours"))

    def mlflow_download() -> None:
        client.download_artifacts(state["mlflow_run"], "model", str(fresh_dir("mlflow")))

    def raw_download(fs: Any, key: str) -> Callable[[], None]:
        def download() -> None:
            fs.get_file(fs._strip_protocol(state[key]), str(fresh_dir(key) / FILE))

        return download

    # warm up each path once, untimed (imports, connections, SQLAlchemy caches)
    for step in (ours_setup, ours_save, ours_download, mlflow_setup, mlflow_save, mlflow_download):
        step()
    raw_save(raw_fs, "raw")()
    raw_download(raw_fs, "raw")()

    size = os.path.getsize(next(work.glob(f"ours-*/{FILE}")))
    results: list[tuple[str, str, float]] = [
        ("save", "serialise only (torch.save to a temp dir)", measure(serialise_only, repeat)[0]),
    ]
    saves: list[tuple[str, Callable[[], None], Callable[[], None] | None, Callable[[], None]]] = [
        ("tracker-core save_model / download_model_files", ours_save, ours_setup, ours_download),
        ("MLflow log_artifacts / download_artifacts", mlflow_save, mlflow_setup, mlflow_download),
        (
            "raw fsspec put_file / get_file",
            raw_save(raw_fs, "raw"),
            None,
            raw_download(raw_fs, "raw"),
        ),
    ]
    if tuned_fs is not None and type(tuned_fs) is not type(raw_fs):
        saves.append(
            (
                "raw put_file / get_file, tracker-core's filesystem",
                raw_save(tuned_fs, "tuned"),
                None,
                raw_download(tuned_fs, "tuned"),
            )
        )
    for name, save, setup, download in saves:
        results.append(("save", name, measure(save, repeat, setup)[0]))
        results.append(("download", name, measure(download, repeat)[0]))

    for path in work.glob(f"*-*/{FILE}"):  # every download is complete
        assert os.path.getsize(path) == size, (path, os.path.getsize(path), size)
    mgr.close()

    raw = {op: t for op, name, t in results if name.startswith("raw fsspec")}
    mlflow = {op: t for op, name, t in results if name.startswith("MLflow")}
    return [
        {
            "storage": label,
            "op": op,
            "way": name,
            "seconds": t,
            "MB/s": size / 2**20 / t,
            "x raw": t / raw[op],
            "x mlflow": t / mlflow[op],
        }
        for op, name, t in sorted(results, key=lambda r: r[0] != "save")
    ]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--mb", type=float, default=50.0, help="model size in MiB (about)")
    parser.add_argument("--no-s3", action="store_true", help="local folder only")
    args = parser.parse_args()
    quiet_logs()

    import fsspec
    import s3fs
    import torch

    torch.manual_seed(0)
    features = int(math.sqrt(args.mb * 2**20 / 4))
    model = torch.nn.Linear(features, features)
    size_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20

    rows: list[Row] = []
    with (
        contextlib.redirect_stdout(sys.stderr),
        tempfile.TemporaryDirectory(prefix="bench-models-") as tmp,
    ):
        root = Path(tmp)
        local_root = root / "store"
        local_root.mkdir()
        rows += bench_storage(
            "local folder",
            local_root.as_uri(),
            fsspec.filesystem("file"),
            root / "local",
            model,
            args.repeat,
        )
        if not args.no_s3:
            os.environ.update(AWS_TEST_ENV)
            with moto_server(root / "moto") as endpoint:
                os.environ["MLFLOW_S3_ENDPOINT_URL"] = endpoint
                plain = s3fs.S3FileSystem(endpoint_url=endpoint)
                plain.mkdir("bench-models")
                rows += bench_storage(
                    "S3 (moto)", "s3://bench-models/root", plain, root / "s3", model, args.repeat
                )
    emit(
        f"bench_models: save then download a {size_mb:.1f} MiB state_dict"
        f" (Linear {features}x{features})",
        rows,
        ["storage", "op", "way", "seconds", "MB/s", "x raw", "x mlflow"],
        args.json,
        {"model_mib": round(size_mb, 1), "repeat": args.repeat},
    )


if __name__ == "__main__":
    main()
