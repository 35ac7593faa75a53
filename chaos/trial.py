"""One seeded chaos trial: set up the previous iteration, run the workers under kills and
faults (supervised, restarted), ``tracker-core gc --delete``, audit the invariants
(:mod:`chaos.audit`), keep a failing trial's data for replay."""

from __future__ import annotations

import contextlib
import io
import json
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from chaos.audit import audit
from chaos.facts import Check, TrialFacts, storage_fs
from chaos.journal import read_journals
from chaos.servers import Servers, save_for_replay
from chaos.settings import CLIENT_ENV, Sizes, TrialResult, settings_of

__all__ = ["Stage", "Trial"]

_RETRY_LINE = re.compile(r"tracker_core\.retry: (\S+): attempt \d+ failed with (\S+); retrying")


class Stage(Protocol):
    """What a trial runs on: the soak's servers, forkserver context and shared state."""

    out: Path
    sizes: Sizes
    keep_all: bool
    hits: Counter[str]
    mp: Any

    @property
    def servers(self) -> Servers: ...


class Trial:
    """One seeded trial: setup, workers with kills, gc, audit."""

    def __init__(self, soak: Stage, seed: int) -> None:
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
        from chaos.kills import KILL_POINTS

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
        bucket = (lambda: storage_fs(self.storage, self.direct_endpoint()), self.bucket)
        save_for_replay(self.servers.database, bucket, self.dir)
