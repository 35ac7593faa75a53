"""The chaos soak: seeded, bounded, self-stopping trials of tracker-core under kills, faults, load.

Production shape on loopback: ``mlflow server`` on a private PostgreSQL, models on S3 (moto's
server) or GCS (the emulator), each server behind a fault-injecting proxy (:mod:`chaos.proxy`)
that fails a seeded 20% of requests. Per trial, with a seed:

1. **load**: worker processes (:mod:`chaos.worker`) train their runs into one iteration (shape
   ``one``: 8 workers x 25 runs on top of a previous iteration they delete at the end), or run
   the driver over 4 iterations in sequence (shape ``sequence``: each iteration starts from the
   previous best and deletes it); each run logs a few hundred loss values, a score, and saves
   its model best-only with ``keep`` 1 or 3;
2. **kills**: each worker incarnation may be armed with a named kill point (the worker kills
   itself with SIGKILL there), and the runner SIGKILLs random workers at random moments;
   killed workers restart at once and resume;
3. **faults**: the proxies reset connections, hang, answer 500/503 and slow down;
4. **audit** (:mod:`chaos.audit`) after ``tracker-core gc --delete``, against the journals.

It prints one table (:func:`table`). Every trial leaves ``<out>/trial-<seed>/result.json``
(``python -m chaos --report <out>...`` tables them again). A failing trial prints its seed
and keeps its data (journals, logs, the proxies' fault logs, a dump of the MLflow database
and a copy of the bucket) under ``<out>/trial-<seed>``; ``python -m chaos --seeds <seed>``
replays it (same settings, same kill and fault draws; the interleaving depends on timing).

The trial settings follow from the seed: storage ``s3``/``gcs`` alternate with the seed,
``keep`` 1/3 every two seeds, the shape every four.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from chaos.audit import INVARIANTS, Check, TrialFacts, audit, storage_fs
from chaos.journal import read_journals
from chaos.proxy import FAULT_KINDS, FaultPlan, FaultProxy, ProxySet

__all__ = ["Sizes", "Soak", "TrialResult", "load_results", "settings_of", "table"]

#: environment of the workers and of gc: one request per retry attempt, short timeouts
CLIENT_ENV = {
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
    "MLFLOW_LOGGING_LEVEL": "ERROR",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
    "TQDM_DISABLE": "1",
}
_RETRY_LINE = re.compile(r"tracker_core\.retry: (\S+): attempt \d+ failed with (\S+); retrying")


@attrs.frozen
class Sizes:
    """How big a trial is."""

    workers: int = 8
    runs_per_worker: int = 10  # shape "one"
    iterations: int = 4  # shape "sequence"
    runs_per_iteration: int = 8  # shape "sequence": shared by all workers
    loss_points: int = 300
    large_fraction: float = 0.1  # models of ~11 MiB (three S3 multipart parts)
    armed_kills: int = 12  # at most this many kill-point kills per trial
    random_kills: int = 4  # and this many kills at random moments
    random_kill_every: float = 10.0  # mean seconds between random kills
    arm_probability: float = 0.6
    max_errors_per_worker: int = 3
    lease_seconds: float = 15.0
    fault_rate: float = 0.2
    storage_timeout: float = 2.0
    #: (attempts, first wait, longest wait): the default, and for whole-folder transfers
    retry: tuple[int, float, float] = (12, 0.1, 2.0)
    retry_transfers: tuple[int, float, float] = (40, 0.1, 2.0)
    trial_timeout: float = 20 * 60.0

    @classmethod
    def full_load(cls) -> Sizes:
        """The issue's load: 8 workers x 25 runs (shape one), 4 iterations of 16 runs."""
        return cls(runs_per_worker=25, runs_per_iteration=16)

    @classmethod
    def quick(cls) -> Sizes:
        """The short trial of ``make test``: a few workers, a few kills, faults on."""
        return cls(
            workers=3,
            runs_per_worker=4,
            iterations=2,
            runs_per_iteration=6,
            loss_points=50,
            large_fraction=0.2,
            armed_kills=3,
            random_kills=1,
            random_kill_every=8.0,
            arm_probability=0.8,
            lease_seconds=15.0,  # as the full trials: 8 s lapsed on a loaded machine (a starved
            # MLflow server answers past the 2 s client timeout, so renewals fail in a row)
            trial_timeout=8 * 60.0,
        )


def settings_of(seed: int) -> tuple[str, int, str]:
    """``(storage, keep, shape)`` of the trial with this seed."""
    storage = ("s3", "gcs")[seed % 2]
    keep = (1, 3)[(seed // 2) % 2]
    shape = ("one", "sequence")[(seed // 4) % 2]
    return storage, keep, shape


@attrs.define
class TrialResult:
    seed: int
    storage: str
    keep: int
    shape: str
    runs: int = 0
    seconds: float = 0.0
    kills: Counter[str] = attrs.field(factory=Counter)
    armed: Counter[str] = attrs.field(factory=Counter)
    faults: dict[str, Counter[str]] = attrs.field(factory=dict)
    retried: Counter[str] = attrs.field(factory=Counter)
    restarts: int = 0
    checks: dict[str, Check] = attrs.field(factory=dict)
    kept_at: str | None = None

    @property
    def passed(self) -> bool:
        return all(c.held is not False for c in self.checks.values())


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------- servers
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


# ---------------------------------------------------------------------- one trial
class Trial:
    """One seeded trial: setup, workers with kills, gc, audit."""

    def __init__(self, soak: Soak, seed: int) -> None:
        self.soak, self.seed, self.sizes = soak, seed, soak.sizes
        self.storage, self.keep, self.shape = settings_of(seed)
        self.rng = random.Random(seed)
        self.dir = soak.out / f"trial-{seed}"
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "journals").mkdir(parents=True)
        (self.dir / "configs").mkdir()
        tag = uuid.uuid4().hex[:6]
        self.plugin = f"chaos-{seed}-{tag}"
        self.bucket = f"chaos-{seed}-{tag}"
        self.artifact_uri = f"{'s3' if self.storage == 's3' else 'gs'}://{self.bucket}/models"
        self.base_ts = int(time.time() * 1000)
        self.result = TrialResult(seed, self.storage, self.keep, self.shape)
        self.worker_problems: list[str] = []
        self.incarnations = 0

    # -- plumbing --------------------------------------------------------------------------
    @property
    def servers(self) -> Servers:
        return self.soak.servers

    def direct_endpoint(self) -> str:
        return self.servers.s3 if self.storage == "s3" else self.servers.gcs

    def proxy_endpoint(self) -> str:
        return self.servers.proxy(self.storage).url

    def params(self) -> list[tuple[int, int, float]]:
        s = self.sizes
        if self.shape == "one":
            return [
                (w, i, round(10 ** -self.rng.uniform(1, 5), 8))
                for w in range(s.workers)
                for i in range(s.runs_per_worker)
            ]
        return [
            (-1, i, round(10 ** -self.rng.uniform(1, 5), 8)) for i in range(s.runs_per_iteration)
        ]

    def batches(self) -> tuple[str, ...]:
        if self.shape == "one":
            return ("b1",)
        return tuple(f"b{k}" for k in range(1, self.sizes.iterations + 1))

    def base_config(self, batch: str) -> dict[str, Any]:
        s = self.sizes
        return {
            "shape": self.shape,
            "seed": self.seed,
            "batch": batch,
            "base_ts": self.base_ts,
            "plugin": self.plugin,
            "keep": self.keep,
            "artifact_uri": self.artifact_uri,
            "tracking_uri": self.servers.proxy("mlflow").url,
            "storage": self.storage,
            "storage_endpoint": self.proxy_endpoint(),
            "storage_timeout": s.storage_timeout,
            "lease_seconds": s.lease_seconds,
            "retry": list(s.retry),
            "retry_transfers": list(s.retry_transfers),
            "runs_per_worker": s.runs_per_worker if self.shape == "one" else s.runs_per_iteration,
            "trend": self.shape == "one",
            "loss_points": s.loss_points,
            "large_fraction": s.large_fraction,
            "log_path": str(self.dir / "workers.log"),
        }

    # -- setup -----------------------------------------------------------------------------
    def make_bucket(self) -> None:
        storage_fs(self.storage, self.direct_endpoint()).mkdir(self.bucket)

    def previous_iteration(self) -> None:
        """Shape ``one``: an earlier iteration (``b0``) with models, which the workers delete."""
        import tracker_core
        from chaos import workload as W
        from tracker_core import FineTuningIteration, MetricValue

        options: dict[str, Any] = {"endpoint_url": self.direct_endpoint()}
        options |= (
            {"key": "testing", "secret": "testing"}
            if self.storage == "s3"
            else {"token": "anon", "project": "test"}
        )
        with (
            contextlib.redirect_stdout(io.StringIO()),
            tracker_core.connect(
                self.artifact_uri,
                tracking_uri=self.servers.mlflow,
                storage_options=options,
                plugin_name=self.plugin,
                main_metric=W.MAIN_METRIC,
                keep=2,
                model_format="state_dict",
            ) as manager,
        ):
            manager.set_iteration(FineTuningIteration(plugin_name=self.plugin, batch_id="b0"))
            for index in range(3):
                params = W.SoakParams(worker=-2, index=index, lr=0.1)
                with manager.run(params):
                    manager.save_metric(MetricValue(W.MAIN_METRIC, 0.1 * (index + 1)))
                    manager.save_model(W.make_model(self.seed, "b0", params, False))
            manager.finish_iteration()

    # -- workers ---------------------------------------------------------------------------
    def arm(self, step: str | None = None, always: bool = False) -> str | None:
        """A kill point for a new incarnation (of ``step``'s points, else the shape's), or
        None; ``always``: armed whatever the trial's kill budget (the promotion step)."""
        from chaos.worker import KILL_POINTS

        s = self.sizes
        if not always:
            if sum(self.result.kills.values()) >= s.armed_kills + s.random_kills:
                return None
            if self.armed_hits() >= s.armed_kills or self.rng.random() >= s.arm_probability:
                return None
        points = KILL_POINTS[step or self.shape]
        fewest = min(self.soak.hits[p] for p in points)
        point = self.rng.choice([p for p in points if self.soak.hits[p] == fewest])
        self.soak.hits[point] += 1  # armed: try the others first next time
        self.result.armed[point] += 1
        return point

    def armed_hits(self) -> int:
        return sum(n for k, n in self.result.kills.items() if k != "random moment")

    def spawn(self, config: dict[str, Any], worker: int, incarnation: int) -> Any:
        step = config.get("step")
        # the promotion step: its first process is always killed at one of its points
        armed = self.arm(step, always=True) if step and (worker, incarnation) == (100, 0) else None
        config = {
            **config,
            "worker": worker,
            "incarnation": incarnation,
            "arm": armed if step else self.arm(),
            "journal_path": str(self.dir / "journals" / f"w{worker}-{config['batch']}.jsonl"),
        }
        path = self.dir / "configs" / f"w{worker}-{config['batch']}-{incarnation}.json"
        path.write_text(json.dumps(config))
        from chaos.worker import main

        process = self.soak.mp.Process(target=main, args=(str(path),), daemon=False)
        process.start()
        self.incarnations += 1
        return process

    def last_kill_point(self, worker: int, batch: str, incarnation: int) -> str | None:
        path = self.dir / "journals" / f"w{worker}-{batch}.jsonl"
        from chaos.journal import read_journal

        points = [
            r["point"]
            for r in read_journal(path)
            if r["ev"] == "kill" and r.get("inc") == incarnation
        ]
        return points[-1] if points else None

    def run_workers(
        self,
        batch: str,
        params: list[tuple[int, int, float]],
        deadline: float,
        step: str | None = None,
        ids: Sequence[int] = (),
    ) -> bool:
        """Run every worker of ``batch`` to completion, with kills and restarts; ``step``
        ``"promote"``: the promotion step's processes ``ids`` instead."""
        s = self.sizes
        config = self.base_config(batch) | ({"step": step} if step else {})
        procs: dict[int, Any] = {}
        incarnation: dict[int, int] = {}
        for w in ids if step else range(s.workers):
            mine = [p for p in params if p[0] in (w, -1)]
            procs[w] = self.spawn({**config, "params": mine}, w, 0)
            incarnation[w] = 0
        try:
            # the promotion step is killed at its armed point only (a random kill first would
            # leave that point untried)
            return self._supervise(
                batch, params, deadline, config, procs, incarnation, kill_randomly=not step
            )
        finally:
            for process in procs.values():  # an interrupted soak leaves no worker behind
                with contextlib.suppress(Exception):
                    process.kill()

    def _supervise(
        self,
        batch: str,
        params: list[tuple[int, int, float]],
        deadline: float,
        config: dict[str, Any],
        procs: dict[int, Any],
        incarnation: dict[int, int],
        kill_randomly: bool = True,
    ) -> bool:
        s = self.sizes
        errors: Counter[int] = Counter()
        random_kills: set[tuple[int, int]] = set()
        next_kill = time.monotonic() + self.rng.expovariate(1 / s.random_kill_every)
        ok = True
        while procs:
            if time.monotonic() > deadline:
                self.worker_problems.append(f"{batch}: trial timed out with {len(procs)} worker(s)")
                return False
            for w, process in list(procs.items()):
                if process.is_alive():
                    continue
                process.join()
                code = process.exitcode
                if code == 0:
                    del procs[w]
                    continue
                if code == -signal.SIGKILL:
                    if (w, incarnation[w]) in random_kills:
                        point = "random moment"
                    else:
                        point = self.last_kill_point(w, batch, incarnation[w]) or "unexplained"
                    self.result.kills[point] += 1
                else:
                    errors[w] += 1
                    if errors[w] > s.max_errors_per_worker:
                        self.worker_problems.append(
                            f"{batch}: worker {w} failed {errors[w]} times (exit {code})"
                        )
                        del procs[w]
                        ok = False
                        continue
                incarnation[w] += 1
                self.result.restarts += 1
                mine = [p for p in params if p[0] in (w, -1)]
                procs[w] = self.spawn({**config, "params": mine}, w, incarnation[w])
            now = time.monotonic()
            if kill_randomly and now >= next_kill and procs:
                next_kill = now + self.rng.expovariate(1 / s.random_kill_every)
                spent = sum(self.result.kills.values()) + len(random_kills)
                taken = sum(1 for _ in random_kills)
                if taken < s.random_kills and spent < s.armed_kills + s.random_kills:
                    w = self.rng.choice(sorted(procs))
                    if procs[w].is_alive() and procs[w].pid:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(procs[w].pid, signal.SIGKILL)
                            random_kills.add((w, incarnation[w]))
            time.sleep(0.1)
        return ok

    # -- gc --------------------------------------------------------------------------------
    def gc(self, through_proxy: bool) -> tuple[bool, str]:
        env = {**os.environ, **CLIENT_ENV}
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "STORAGE_EMULATOR_HOST"):
            env.pop(name, None)
        endpoint = self.proxy_endpoint() if through_proxy else self.direct_endpoint()
        if self.storage == "s3":
            env["AWS_ENDPOINT_URL"] = endpoint
        else:
            env["STORAGE_EMULATOR_HOST"] = endpoint
        tracking = self.servers.proxy("mlflow").url if through_proxy else self.servers.mlflow
        cmd = [
            sys.executable, "-m", "tracker_core.cli",
            "--tracking-uri", tracking, "--artifact-uri", self.artifact_uri,
            "--retries", str(self.sizes.retry_transfers[0]),  # a folder delete is many requests
            "--lease-seconds", str(self.sizes.lease_seconds),  # the workers' lease
            "--json", "-v", "gc", "--delete",
        ]  # fmt: skip
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        name = "gc-faults" if through_proxy else "gc-direct"
        (self.dir / f"{name}.out").write_text(out.stdout + "\n--- stderr\n" + out.stderr)
        for line in out.stderr.splitlines():
            match = _RETRY_LINE.search(line)
            if match:
                self.result.retried[f"gc {match.group(1)}"] += 1
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["?"])[-1]
            return False, f"gc exited {out.returncode}: {last[:300]}"
        return True, ""

    # -- the whole trial -------------------------------------------------------------------
    def run(self) -> TrialResult:
        started = time.monotonic()
        deadline = started + self.sizes.trial_timeout
        self.soak.servers.proxies.set_enabled(False)
        for index, proxy in enumerate(self.servers.proxies.proxies.values()):
            proxy.reseed(self.seed * 7919 + index)
            proxy.snapshot(reset=True)
        self.make_bucket()
        if self.shape == "one":
            self.previous_iteration()
        self.soak.servers.proxies.set_enabled(True)
        params = self.params()
        workers_ok = True
        for batch in self.batches():
            workers_ok = self.run_workers(batch, params, deadline) and workers_ok
            if not workers_ok:
                break
        if workers_ok and self.shape == "one":  # the hand-written loop's promotion step:
            # one process killed at a promote.* point and restarted, then two repeated
            # completions at once
            for ids in ((100,), (101, 102)):
                workers_ok = workers_ok and self.run_workers(
                    "b1", [], deadline, step="promote", ids=ids
                )
        workers_ended = time.monotonic()
        # a twin a worker created just before the end stays within its creation's grace (one
        # lease) and gc rightly keeps it: collect once no run can be in that window
        time.sleep(max(0.0, self.sizes.lease_seconds + 1.0 - (time.monotonic() - workers_ended)))
        gc_ok, gc_problem = self.gc(through_proxy=True)
        self.result.faults = {
            name: Counter(counts) for name, counts in self.servers.proxies.snapshot().items()
        }
        self.soak.servers.proxies.set_enabled(False)
        if not gc_ok:
            self.gc(through_proxy=False)  # the audit still needs a collected bucket
        journals = tuple(read_journals(self.dir / "journals"))
        self.count_retries()
        facts = TrialFacts(
            seed=self.seed,
            shape=self.shape,
            storage=self.storage,
            keep=self.keep,
            plugin=self.plugin,
            bucket=self.bucket,
            artifact_uri=self.artifact_uri,
            tracking_uri=self.servers.mlflow,
            storage_endpoint=self.direct_endpoint(),
            batches=self.batches(),
            params=tuple(params),
            runs_per_worker=self.base_config("b1")["runs_per_worker"],
            trend=self.shape == "one",
            large_fraction=self.sizes.large_fraction,
            base_ts=self.base_ts,
            journals=journals,
            workers_done=workers_ok,
            worker_problems=tuple(self.worker_problems),
            gc_ok=gc_ok,
            gc_problem=gc_problem,
        )
        try:
            self.result.checks = audit(facts)
        except Exception as exc:  # an audit that cannot run is a failed trial
            check = Check()
            check.fail(f"audit crashed: {type(exc).__name__}: {exc}")
            self.result.checks = {"workers_done": check}
        self.result.runs = len(params) * len(self.batches())
        self.result.seconds = time.monotonic() - started
        (self.dir / "result.json").write_text(json.dumps(self.summary(), indent=2, default=str))
        if self.result.passed and not self.soak.keep_all:
            self.drop_data()
        else:
            self.keep_data()
        return self.result

    def count_retries(self) -> None:
        log = self.dir / "workers.log"
        if not log.exists():
            return
        with open(log, errors="replace") as lines:
            for line in lines:
                match = _RETRY_LINE.search(line)
                if match:
                    self.result.retried[match.group(1)] += 1

    def summary(self) -> dict[str, Any]:
        r = self.result
        return {
            "seed": r.seed,
            "settings": {"storage": r.storage, "keep": r.keep, "shape": r.shape},
            "runs": r.runs,
            "seconds": round(r.seconds, 1),
            "kills": dict(r.kills),
            "armed": dict(r.armed),
            "restarts": r.restarts,
            "faults": {k: dict(v) for k, v in r.faults.items()},
            "retried": dict(r.retried),
            "checks": {k: {"held": c.held, "problems": c.problems} for k, c in r.checks.items()},
            "plugin": self.plugin,
            "bucket": self.bucket,
        }

    def drop_data(self) -> None:
        """A passing trial keeps only its ``result.json``, for ``--report``."""
        for path in self.dir.iterdir():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.name != "result.json":
                path.unlink(missing_ok=True)

    def keep_data(self) -> None:
        """A failing trial's data for replay: the MLflow database and the bucket."""
        self.result.kept_at = str(self.dir)
        database = self.servers.database
        match = re.match(r".*://(\w+)@([\d.]+):(\d+)/(\w+)", database)
        if match:
            user, host, port, name = match.groups()
            from tracker_core.testing.postgres import _pg_bindir

            with contextlib.suppress(Exception):
                subprocess.run(
                    [
                        str(_pg_bindir() / "pg_dump"),
                        "-h",
                        host,
                        "-p",
                        port,
                        "-U",
                        user,
                        name,
                        "-f",
                        str(self.dir / "mlflow.sql"),
                    ],
                    check=False,
                    timeout=300,
                    capture_output=True,
                )
        with contextlib.suppress(Exception):
            fs = storage_fs(self.storage, self.direct_endpoint())
            for path in fs.find(self.bucket):
                local = self.dir / "bucket" / path
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(fs.cat_file(path))


# ---------------------------------------------------------------------- the soak
def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


class Soak:
    """Servers, proxies, a forkserver for the workers, and the trials."""

    def __init__(self, out: Path, sizes: Sizes, *, keep_all: bool = False) -> None:
        self.out = Path(out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.sizes = sizes
        self.keep_all = keep_all
        self.hits: Counter[str] = Counter()
        self._servers: Servers | None = None
        self.mp: Any = None

    @property
    def servers(self) -> Servers:
        assert self._servers is not None
        return self._servers

    @contextlib.contextmanager
    def started(self, seed: int) -> Iterator[Soak]:
        # the workers' environment, for this process too (the forkserver inherits it); put
        # back on the way out: `make test` runs a trial in its own process, and a leaked
        # MLFLOW_LOGGING_LEVEL=ERROR made later tests' CLI subprocesses print MLflow's errors
        saved = {key: os.environ.get(key) for key in CLIENT_ENV}
        os.environ.update(CLIENT_ENV)
        # stop cleanly on SIGTERM too (a background `make chaos` ignores SIGINT): the servers
        # and workers started here are stopped on the way out
        previous_handler = signal.signal(signal.SIGTERM, _terminate)
        self.mp = multiprocessing.get_context("forkserver")
        self.mp.set_forkserver_preload(["chaos.worker"])
        try:
            with servers(self.out / "servers", seed) as running:
                self._servers = running
                yield self
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def trial(self, seed: int) -> TrialResult:
        return Trial(self, seed).run()


def run_soak(
    seeds: Sequence[int], out: Path, sizes: Sizes, *, keep_all: bool = False
) -> tuple[list[TrialResult], float]:
    """Run the trials; returns their results and the seconds they took (servers excluded)."""
    results: list[TrialResult] = []
    soak = Soak(out, sizes, keep_all=keep_all)
    with soak.started(seeds[0] if seeds else 0):
        started = time.monotonic()
        for seed in seeds:
            storage, keep, shape = settings_of(seed)
            say(f"trial seed {seed}: {storage}, keep={keep}, shape={shape} ...")
            result = soak.trial(seed)
            verdict = "every invariant held" if result.passed else "FAILED"
            say(
                f"  seed {seed}: {verdict} in {result.seconds:.0f}s, "
                f"{sum(result.kills.values())} kills, "
                f"{sum(sum(v[k] for k in FAULT_KINDS) for v in result.faults.values())} faults"
            )
            if not result.passed:
                for key, check in result.checks.items():
                    if check.held is False:
                        say(f"    {key}: {'; '.join(check.problems[:5])}")
                say(f"    replay: python -m chaos --seeds {seed}   (data kept in {result.kept_at})")
            results.append(result)
        elapsed = time.monotonic() - started
    return results, elapsed


def load_results(*outs: Path) -> list[TrialResult]:
    """The results of the trials run under the folders ``outs``, by seed.

    Every trial leaves its ``result.json``; a failing one (or any, with ``--keep-all``) also
    its data, and is marked as kept there. A soak split across processes (each its own
    ``--out``) is reported as one table this way.
    """
    results = []
    for path in sorted(p for out in outs for p in Path(out).glob("trial-*/result.json")):
        data = json.loads(path.read_text())
        settings = data["settings"]
        result = TrialResult(data["seed"], settings["storage"], settings["keep"], settings["shape"])
        result.runs, result.seconds = data["runs"], data["seconds"]
        result.kills, result.armed = Counter(data["kills"]), Counter(data["armed"])
        result.faults = {k: Counter(v) for k, v in data["faults"].items()}
        result.retried, result.restarts = Counter(data["retried"]), data["restarts"]
        result.checks = {
            k: Check(v["held"], list(v["problems"])) for k, v in data["checks"].items()
        }
        if any(p.name != "result.json" for p in path.parent.iterdir()):
            result.kept_at = str(path.parent)
        results.append(result)
    return sorted(results, key=lambda r: r.seed)


# ---------------------------------------------------------------------- the table
def _columns(results: Sequence[TrialResult]) -> list[tuple[str, list[TrialResult]]]:
    groups: dict[str, list[TrialResult]] = {}
    for r in results:
        groups.setdefault(f"{r.storage} keep={r.keep}", []).append(r)
    return [*sorted(groups.items()), ("all", list(results))]


def table(results: Sequence[TrialResult], seconds: float, *, title: str = "") -> str:
    """The soak's one table, in Markdown."""
    columns = _columns(results)
    rows: list[list[str]] = []

    def row(label: str, values: Sequence[object]) -> None:
        rows.append([label, *(str(v) for v in values)])

    def total(get: Any) -> list[int]:
        return [sum(get(r) for r in rs) for _, rs in columns]

    row("trials", [len(rs) for _, rs in columns])
    row("trials of shape one / sequence", [
        f"{sum(r.shape == 'one' for r in rs)} / {sum(r.shape == 'sequence' for r in rs)}"
        for _, rs in columns
    ])  # fmt: skip
    row("runs", total(lambda r: r.runs))
    row("worker restarts", total(lambda r: r.restarts))
    kill_points = sorted({k for r in results for k in r.kills})
    row("**kills**", total(lambda r: sum(r.kills.values())))
    for point in kill_points:
        row(f"&nbsp; {point}", total(lambda r, p=point: r.kills[p]))
    row("**requests through the proxies**", total(
        lambda r: sum(v["requests"] for v in r.faults.values())
    ))  # fmt: skip
    row("**faults injected**", total(
        lambda r: sum(sum(v[k] for k in FAULT_KINDS) for v in r.faults.values())
    ))  # fmt: skip
    for kind in FAULT_KINDS:
        row(f"&nbsp; {kind}", total(lambda r, k=kind: sum(v[k] for v in r.faults.values())))
    for server in ("mlflow", "s3", "gcs"):
        row(f"&nbsp; at {server}", total(
            lambda r, s=server: sum(r.faults.get(s, Counter())[k] for k in FAULT_KINDS)
        ))  # fmt: skip
    operations = sorted({k for r in results for k in r.retried})
    row("**operations retried**", total(lambda r: sum(r.retried.values())))
    for op in operations:
        row(f"&nbsp; {op}", total(lambda r, o=op: r.retried[o]))
    row("**invariant held (trials)**", ["" for _ in columns])
    for key, label in INVARIANTS:
        cells = []
        for _, rs in columns:
            applicable = [r for r in rs if r.checks.get(key, Check()).held is not None]
            held = sum(r.checks.get(key, Check()).held is True for r in applicable)
            cells.append(f"{held}/{len(applicable)}" if applicable else "n/a")
        row(f"&nbsp; {label}", cells)
    row("trial time (s), sum", [round(sum(r.seconds for r in rs)) for _, rs in columns])
    header = ["", *(name for name, _ in columns)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", *(["---:"] * len(columns))]) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    failed = [r.seed for r in results if not r.passed]
    head = title or f"chaos soak, {when}: {len(results)} trials in {seconds / 60:.1f} min"
    foot = f"failing seeds: {', '.join(map(str, failed))}" if failed else "no trial failed"
    return "\n".join([head, "", *lines, "", foot])
