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
import multiprocessing
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from chaos.proxy import FAULT_KINDS
from chaos.servers import Servers, servers
from chaos.settings import CLIENT_ENV, Sizes, TrialResult, say, settings_of
from chaos.trial import Trial

__all__ = ["Soak", "run_soak"]


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
