"""Real servers for tests: MLflow, moto's S3, a GCS emulator and PostgreSQL, as subprocesses.

MLflow, moto and the GCS emulator are here; PostgreSQL is :mod:`tracker_core.testing.postgres`
and how a server process is run and stopped :mod:`tracker_core.testing.processes` (both
re-exported here, where the tests look for them).

Every context manager here picks a free port on 127.0.0.1, starts the server bound to
127.0.0.1 only, waits for it to answer (bounded by ``timeout``; a dead or slow server raises
:class:`ServerStartError` carrying the tail of its log), yields its address, and on exit stops
the process it started by PID (SIGTERM to its own process group, wait, then SIGKILL).

Nothing here imports mlflow, moto, boto3, s3fs or gcsfs: the servers run as
``sys.executable -m ...`` subprocesses, so this module is importable from the core package.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from tracker_core.testing.postgres import (
    PostgresCluster,
    postgres,
    postgres_cluster,
    postgres_installed,
)
from tracker_core.testing.processes import (
    DEFAULT_TIMEOUT,
    HOST,
    ServerStartError,
    free_port,
    http_ok,
    logs_folder,
    serve,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "PostgresCluster",
    "ServerStartError",
    "free_port",
    "gcs_emulator",
    "mlflow_server",
    "moto_server",
    "postgres",
    "postgres_cluster",
    "postgres_installed",
]

# --------------------------------------------------------------------------- MLflow


@contextlib.contextmanager
def mlflow_server(
    workdir: Path,
    backend_store_uri: str | None = None,
    *,
    default_artifact_root: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Iterator[str]:
    """An ``mlflow server`` on 127.0.0.1; yields ``http://127.0.0.1:PORT``.

    The backend store defaults to ``sqlite:///<workdir>/mlflow.db``. Artifacts are *not* proxied
    (``--no-serve-artifacts``): new experiments get ``<default_artifact_root>/<experiment_id>``
    (default ``<workdir>/artifacts``), and clients read and write that location directly.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    store = backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    artifact_root = default_artifact_root or str(workdir / "artifacts")
    server_env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}

    def cmd(port: int) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--host", HOST,
            "--port", str(port),
            "--workers", "1",
            "--backend-store-uri", store,
            "--default-artifact-root", artifact_root,
            "--no-serve-artifacts",
        ]  # fmt: skip

    def probe(port: int) -> Callable[[], bool]:
        return lambda: http_ok(f"http://{HOST}:{port}/health")

    with serve("mlflow", cmd, probe, workdir, timeout=timeout, env=server_env, cwd=workdir) as port:
        yield f"http://{HOST}:{port}"


# --------------------------------------------------------------------------- S3 (moto)


@contextlib.contextmanager
def moto_server(workdir: Path | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> Iterator[str]:
    """moto's S3-compatible server on 127.0.0.1; yields its endpoint ``http://127.0.0.1:PORT``.

    Clients need ``endpoint_url`` (or ``AWS_ENDPOINT_URL``/``MLFLOW_S3_ENDPOINT_URL``) and any
    credentials (e.g. ``AWS_ACCESS_KEY_ID=testing``).
    """
    log_dir = logs_folder(workdir)

    def cmd(port: int) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]

    def probe(port: int) -> Callable[[], bool]:
        return lambda: http_ok(f"http://{HOST}:{port}/moto-api/")

    with serve("moto", cmd, probe, log_dir, timeout=timeout, cwd=workdir) as port:
        yield f"http://{HOST}:{port}"


# --------------------------------------------------------------------------- GCS emulator


@contextlib.contextmanager
def gcs_emulator(workdir: Path | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> Iterator[str]:
    """``gcp-storage-emulator`` (in memory) on 127.0.0.1; yields ``http://127.0.0.1:PORT``.

    For gcsfs use ``endpoint_url=<url>, token="anon"`` and set
    ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` before importing gcsfs; for google-cloud-storage
    set ``STORAGE_EMULATOR_HOST=<url>``.
    """
    log_dir = logs_folder(workdir)
    exe = shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent))
    base = [exe] if exe else [sys.executable, "-m", "gcp_storage_emulator"]

    def cmd(port: int) -> list[str]:
        return [*base, "start", "--host", HOST, "--port", str(port), "--in-memory"]

    def probe(port: int) -> Callable[[], bool]:
        return lambda: http_ok(f"http://{HOST}:{port}/")

    with serve("gcs-emulator", cmd, probe, log_dir, timeout=timeout, cwd=workdir) as port:
        yield f"http://{HOST}:{port}"
