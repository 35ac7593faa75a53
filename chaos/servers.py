"""The soak's servers, started once per soak on loopback: PostgreSQL, ``mlflow server`` on it,
moto's S3 and the GCS emulator, each behind a seeded fault-injecting proxy (:mod:`chaos.proxy`)."""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from chaos.proxy import FaultPlan, FaultProxy, ProxySet

__all__ = ["Servers", "save_for_replay", "servers"]


@attrs.define
class Servers:
    mlflow: str
    database: str
    s3: str
    gcs: str
    proxies: ProxySet

    def proxy(self, name: str) -> FaultProxy:
        return self.proxies.proxies[name]


@contextlib.contextmanager
def servers(workdir: Path, seed: int) -> Iterator[Servers]:
    from tracker_core.testing import servers as srv

    if not srv.postgres_installed():
        raise RuntimeError("the soak needs PostgreSQL's server binaries (initdb, postgres)")
    with (
        srv.postgres(workdir / "pg") as database,
        srv.mlflow_server(workdir / "mlflow", database) as mlflow_url,
        srv.moto_server(workdir) as s3_url,
        srv.gcs_emulator(workdir) as gcs_url,
        ProxySet() as proxies,
    ):
        # a hung request is held until the client gives up, at most 8 s (then reset): the
        # workers' clients time out after 2 s; tracker-core gc's S3 client waits 60 s
        plan = FaultPlan(hang_seconds=8.0)
        for name, url in (("mlflow", mlflow_url), ("s3", s3_url), ("gcs", gcs_url)):
            proxies.add(
                FaultProxy(
                    name, url, flavor=name, seed=seed, plan=plan, log_path=workdir / "faults.log"
                )
            )
        yield Servers(mlflow_url, database, s3_url, gcs_url, proxies)


def save_for_replay(database: str, bucket: tuple[Callable[[], Any], str], folder: Path) -> None:
    """Dump the MLflow database (``pg_dump``) and copy the bucket (``(open its filesystem,
    its name)``) into ``folder``, as far as each works: a failing trial's data for replay."""
    match = re.match(r".*://(\w+)@([\d.]+):(\d+)/(\w+)", database)
    if match:
        user, host, port, name = match.groups()
        from tracker_core.testing.postgres import _pg_bindir

        with contextlib.suppress(Exception):
            subprocess.run(
                [
                    str(_pg_bindir() / "pg_dump"),
                    *("-h", host, "-p", port, "-U", user, name),
                    *("-f", str(folder / "mlflow.sql")),
                ],
                check=False,
                timeout=300,
                capture_output=True,
            )
    open_fs, name = bucket
    with contextlib.suppress(Exception):
        fs = open_fs()
        for path in fs.find(name):
            local = folder / "bucket" / path
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(fs.cat_file(path))
