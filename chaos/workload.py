"""What the soak's workers train: params, metric values, scores and models, all derived from the
trial's seed, so the audit knows what every run must hold without trusting any store.

A run is identified by its params. Everything a run logs and saves is a pure function of
``(trial seed, batch, params)``: its loss curve (values, steps *and* timestamps, so a resumed
run logs the very same points again), its score (the main metric) and its model's weights.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import attrs

from tracker_core import FineTuningParams

__all__ = [
    "LOSS",
    "MAIN_METRIC",
    "SoakParams",
    "expected_state",
    "is_large",
    "loss_points",
    "make_model",
    "score",
    "unit",
]

MAIN_METRIC = "score"
LOSS = "loss"
#: a small model: 64 x 64 float32 weights (~16 KiB)
SMALL_DIM = 64
#: a large model: 1700 x 1700 float32 (~11 MiB), three multipart parts at the soak's 5 MiB
#: S3 part size (``chaos.worker.S3_PART_SIZE``)
LARGE_DIM = 1700


@attrs.frozen
class SoakParams(FineTuningParams):
    """One run of the soak: ``worker`` owns it (-1: any worker, the driver's shape)."""

    worker: int
    index: int
    lr: float


def unit(*parts: object) -> float:
    """A uniform number in [0, 1) from ``parts`` (stable across processes and Python runs)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    (number,) = struct.unpack(">Q", digest[:8])
    return int(number) / 2**64


def score(seed: int, batch: str, params: SoakParams, runs_per_worker: int, trend: bool) -> float:
    """The run's main metric. With ``trend``, later runs of a worker score higher on average
    (so many runs beat the best so far and save, and prune, models)."""
    noise = unit(seed, batch, params.id, "score")
    if not trend:
        return round(noise, 9)
    position = params.index / max(runs_per_worker - 1, 1)
    return round(0.6 * position + 0.4 * noise, 9)


def loss_points(
    seed: int, batch: str, params: SoakParams, base_ts: int, count: int
) -> list[tuple[str, int, int, float]]:
    """``(name, step, timestamp_ms, value)`` of the run's loss curve."""
    offset = int(unit(seed, batch, params.id, "ts") * 1e9)
    return [
        (LOSS, step, base_ts + offset + step, round(unit(seed, batch, params.id, step) * 10, 9))
        for step in range(count)
    ]


def is_large(seed: int, batch: str, params: SoakParams, large_fraction: float) -> bool:
    return unit(seed, batch, params.id, "large") < large_fraction


def expected_state(seed: int, batch: str, params: SoakParams, large: bool) -> dict[str, Any]:
    """The state dict of the run's model."""
    import torch

    dim = LARGE_DIM if large else SMALL_DIM
    generator = torch.Generator().manual_seed(int(unit(seed, batch, params.id, "w") * 2**62))
    return {
        "weight": torch.rand((dim, dim), generator=generator),
        "bias": torch.rand((dim,), generator=generator),
    }


def make_model(seed: int, batch: str, params: SoakParams, large: bool) -> Any:
    """The run's model: a ``torch.nn.Linear`` with the weights of :func:`expected_state`."""
    import torch

    state = expected_state(seed, batch, params, large)
    dim = state["bias"].shape[0]
    model = torch.nn.Linear(dim, dim)
    model.load_state_dict(state)
    return model


def any_linear() -> Any:
    """The ``model_factory`` of the soak's ``state_dict`` models: a ``torch.nn.Linear`` that
    takes the size of the weights loaded into it (the soak's models come in two sizes)."""
    import torch

    class AnyLinear(torch.nn.Linear):
        def load_state_dict(
            self, state_dict: Any, strict: bool = True, assign: bool = False
        ) -> Any:
            out_features, in_features = state_dict["weight"].shape
            self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
            self.bias = torch.nn.Parameter(torch.empty(out_features))
            return super().load_state_dict(state_dict, strict, assign)

    return AnyLinear(1, 1)


def holdout(state: Any) -> float:
    """The soak's fixed holdout evaluation of a model (or state dict): a number in [0, 1)
    from its bias's bytes, so the audit computes it from :func:`expected_state` alone."""
    state = state.state_dict() if hasattr(state, "state_dict") else state
    digest = hashlib.sha256(state["bias"].detach().numpy().tobytes()).digest()
    (number,) = struct.unpack(">Q", digest[:8])
    return round(int(number) / 2**64, 9)


def initial_state(seed: int) -> dict[str, Any]:
    return expected_state(seed, "initial", SoakParams(worker=-1, index=-1, lr=0.0), False)


def initial_model(seed: int) -> Any:
    return make_model(seed, "initial", SoakParams(worker=-1, index=-1, lr=0.0), False)
