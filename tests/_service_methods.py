"""Fast fine-tuning methods for the task-service tests, named by ``--method NAME=module:attr``.

Training adds ``lr`` to every weight of a tiny model, sleeping ``sleep`` seconds first in
small steps that call :func:`tracker_core.finetune.check_stop` (so a cancel stops it within
one step); evaluation reports ``quality``. With ``$TC_SERVICE_TRAIN_LOG`` set, every train
call appends ``start|end <method> <params id> <pid>`` to that file, so tests can count how
often each run was trained and by which process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import nn

from tracker_core import ExperimentsManager, FineTuningParams
from tracker_core.finetune import check_stop
from tracker_core.methods import FineTuningMethod


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
            f.write(f"{event} {method} {params.id} {os.getpid()}\n")


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


METHODS = {
    "svc-fast": "Fast",
    "svc-batched": "Batched",
    "svc-fail": "Failing",
    "svc-lock": "Locked",
    "svc-cancel": "Cancel",
    "svc-kill": "Kill",
    "svc-long": "Long",
    "svc-restart": "Restart",
}


def method_options() -> list[str]:
    """``--method`` options offering every method of this module."""
    out: list[str] = []
    for name, attr in METHODS.items():
        out += ["--method", f"{name}={__name__}:{attr}"]
    return out
