"""Fast fine-tuning methods for the task-service tests, named by ``--method NAME=module:attr``.

Training adds ``lr`` to every weight of a tiny model, sleeping ``sleep`` seconds first in
small steps that call :func:`tracker_core.finetune.check_stop` (so a cancel stops it within
one step); evaluation reports ``quality``. With ``$TC_SERVICE_TRAIN_LOG`` set, every train
call appends ``start|end <method> <params id> <pid> <unix time>`` to that file, so tests can
count how often each run was trained, by which process, and when.

``svc-barrier`` trains two params sets that wait for each other (files in
``$TC_SERVICE_BARRIER_DIR``), so that their runs end at the same moment.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from tracker_core import ExperimentsManager, FineTuningParams, MetricValue, RunStatus
from tracker_core.finetune import check_prune, check_stop
from tracker_core.methods import FineTuningMethod
from tracker_core.search import SearchSpace


@attrs.frozen
class SvcParams(FineTuningParams):
    lr: float
    quality: float
    sleep: float = 0.0


def tiny_model() -> nn.Module:
    return nn.Linear(4, 2)


def log_event(event: str, method: str, params: SvcParams) -> None:
    path = os.environ.get("TC_SERVICE_TRAIN_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{event} {method} {params.id} {os.getpid()} {time.time():.6f}\n")


class _Base(FineTuningMethod[SvcParams]):
    params_type = SvcParams
    main_metric = "quality"
    model_format = "state_dict"
    sleep = 0.0
    fail = False
    qualities: Sequence[float] = (0.3, 0.9, 0.6)

    def __init__(self) -> None:
        self.model_factory = tiny_model

    def initial_model(self) -> nn.Module:
        torch.manual_seed(0)
        return tiny_model()

    def initial_params(self, seed: int | None = None) -> Sequence[SvcParams]:
        return [
            SvcParams(lr=0.01 * (i + 1), quality=q, sleep=self.sleep)
            for i, q in enumerate(self.qualities)
        ]

    def train(self, model: Any, params: SvcParams, manager: ExperimentsManager) -> Any:
        log_event("start", self.name, params)
        deadline = time.monotonic() + params.sleep
        while time.monotonic() < deadline:
            check_stop()
            time.sleep(0.05)
        if self.fail:
            raise RuntimeError(f"boom in {self.name}")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(params.lr)
        log_event("end", self.name, params)
        return model

    def evaluate(self, model: Any, params: SvcParams, manager: ExperimentsManager) -> float:
        return params.quality


class Fast(_Base):
    name = "svc-fast"


class Batched(_Base):
    """Proposes its own batch id (the optional hook)."""

    name = "svc-batched"

    def next_batch_id(self) -> str | None:
        return "batch-from-the-method"


class Failing(_Base):
    name = "svc-fail"
    fail = True


class Locked(_Base):
    """Slow enough that a second task of the same batch has to wait for it."""

    name = "svc-lock"
    sleep = 1.5


class Cancel(_Base):
    """Slow runs, so that a cancel lands inside one (and stops it at its next step)."""

    name = "svc-cancel"
    sleep = 2.5


class Kill(_Base):
    name = "svc-kill"
    sleep = 1.5


class Long(_Base):
    """Each run outlives the tests' stall threshold (3 s) on a live worker."""

    name = "svc-long"
    sleep = 4.0
    qualities = (0.4, 0.8)


class Restart(_Base):
    name = "svc-restart"
    sleep = 1.0


class Parallel(_Base):
    """Six sleeping runs: three workers train three of them at a time."""

    name = "svc-par"
    sleep = 1.5
    qualities = (0.2, 0.9, 0.5, 0.7, 0.4, 0.6)


class KillParallel(_Base):
    name = "svc-kpar"
    sleep = 2.5
    qualities = (0.3, 0.8, 0.5, 0.6)


class CancelParallel(_Base):
    name = "svc-cpar"
    sleep = 2.0
    qualities = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


class Capped(_Base):
    """Caps its own parallelism at one run at a time."""

    name = "svc-capped"
    max_parallel_runs = 1


class Bench(_Base):
    """``benchmarks/bench_parallel.py``: eight runs whose training sleeps 2 s."""

    name = "svc-bench"
    sleep = 2.0
    qualities = (0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85)


class Outage(_Base):
    """Two runs long enough to end while the task database is stopped."""

    name = "svc-outage"
    sleep = 5.0
    qualities = (0.5, 0.7)


class Barrier(_Base):
    """Two runs that wait for each other and then end together."""

    name = "svc-barrier"
    qualities = (0.4, 0.8)
    timeout = 120.0

    def train(self, model: Any, params: SvcParams, manager: ExperimentsManager) -> Any:
        folder = Path(os.environ["TC_SERVICE_BARRIER_DIR"]) / str(manager.current_experiment_id)
        folder.mkdir(parents=True, exist_ok=True)
        log_event("arrive", self.name, params)
        (folder / params.id).touch()
        deadline = time.monotonic() + self.timeout
        while len(list(folder.iterdir())) < len(self.qualities):
            check_stop()
            if time.monotonic() > deadline:
                raise RuntimeError("the other run of the barrier never came")
            time.sleep(0.005)
        return super().train(model, params, manager)


@attrs.frozen
class SearchParams(FineTuningParams):
    x: float


class Searched(FineTuningMethod[SearchParams]):
    """A search space over ``x``: quality ``1 - (x - 0.7)^2``, logged as a curve over 4 steps
    with ``check_prune`` after each. The weak initial set (``x = 0``) waits at step 1 until
    two runs of its iteration finished, so the median pruner stops it whichever worker trains
    what when."""

    name = "svc-search"
    params_type = SearchParams
    main_metric = "quality"
    model_format = "state_dict"

    def __init__(self) -> None:
        from optuna.distributions import FloatDistribution

        self.model_factory = tiny_model
        self.search_space = SearchSpace(SearchParams, x=FloatDistribution(0.0, 1.0))

    def initial_model(self) -> nn.Module:
        torch.manual_seed(0)
        return tiny_model()

    def initial_params(self, seed: int | None = None) -> Sequence[SearchParams]:
        return [SearchParams(x=0.7), SearchParams(x=0.6), SearchParams(x=0.0)]

    def train(self, model: Any, params: SearchParams, manager: ExperimentsManager) -> Any:
        quality = 1 - (params.x - 0.7) ** 2
        for step in range(4):
            if step == 1 and params.x == 0.0:
                self._wait_for_two_finished(manager)
            value = quality * (1 - 0.5 ** (step + 1))
            manager.save_metric(MetricValue(self.main_metric, value, step=step))
            check_prune()
        return model

    def _wait_for_two_finished(self, manager: ExperimentsManager) -> None:
        deadline = time.monotonic() + 120
        experiment_id = manager.current_experiment_id or ""
        while len(manager.get_runs(experiment_id, statuses=[RunStatus.FINISHED])) < 2:
            check_stop()
            if time.monotonic() > deadline:
                raise RuntimeError("the other runs never finished")
            time.sleep(0.1)

    def evaluate(self, model: Any, params: SearchParams, manager: ExperimentsManager) -> float:
        return 1 - (params.x - 0.7) ** 2


METHODS = {
    "svc-fast": "Fast",
    "svc-batched": "Batched",
    "svc-fail": "Failing",
    "svc-lock": "Locked",
    "svc-cancel": "Cancel",
    "svc-kill": "Kill",
    "svc-long": "Long",
    "svc-restart": "Restart",
    "svc-par": "Parallel",
    "svc-kpar": "KillParallel",
    "svc-cpar": "CancelParallel",
    "svc-capped": "Capped",
    "svc-barrier": "Barrier",
    "svc-outage": "Outage",
    "svc-bench": "Bench",
    "svc-search": "Searched",
}


def method_options() -> list[str]:
    """``--method`` options offering every method of this module."""
    out: list[str] = []
    for name, attr in METHODS.items():
        out += ["--method", f"{name}={__name__}:{attr}"]
    return out
