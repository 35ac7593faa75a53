"""The search across batches: final-batch best metric and runs for ``top_n`` vs ``search`` vs
``search`` + pruning, on a synthetic continual task whose optimum drifts slowly.

The task (no training; a cheap objective with intermediate values): params ``(x, y)`` in the
unit square; on batch ``b`` the quality of ``(x, y)`` is ``level_b + exp(-d^2 / (2 * 0.18^2))``
where ``d`` is the distance to the batch's optimum, which moves ``0.05`` per batch along a
direction drawn from the seed, and ``level_b`` a batch-level shift (the batches differ in
difficulty, so metrics of two batches are not comparable), plus noise (sd 0.01) per run. A
run "trains" ``EPOCHS`` epochs and logs ``quality * (1 - exp(-(epoch + 1) / 2))`` + noise as
the main metric at each step, then calls ``check_prune()``; the final value is the quality.

Every run goes through the real driver (``run_iteration``) on an in-process SQLite tracking
store and a local model folder (a 2-parameter ``state_dict`` model saved when a run is among
the best), one fresh store per seed and policy; each iteration deletes the previous one at
step 7, so the search reads its history from MLflow's deleted experiments. Per seed, the
method's initial params sets are ``INITIAL`` points drawn from the seed (the sets a team would
start from); ``top_n`` then retries the top ``INITIAL`` of each iteration (the seed's rule,
``n_top_runs=10``); ``search`` starts from the first ``--budget`` (5) of them and then
proposes ``--budget`` sets per batch with TPE (the incumbent among them), without and with the
median pruner; the last row is the search with pruning at top_n's 10 runs per batch.

Reported over ``--seeds`` seeds (10 by default), each ``--batches`` batches (8): the mean
final-batch best metric (with its standard deviation over seeds and its distance to that
batch's optimum), total runs and epochs trained, and on how many seeds the policy's final
best is at least ``top_n``'s. ``.venv/bin/python benchmarks/bench_search.py [--seeds 10]
[--batches 8] [--budget 5] [--json]``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from _common import base_parser, emit, quiet_logs
from optuna.distributions import FloatDistribution

import tracker_core
from tracker_core import ExperimentsManager, FineTuningParams, MetricValue
from tracker_core.finetune import check_prune, run_iteration
from tracker_core.methods import FineTuningMethod, connect_kwargs
from tracker_core.search import Search, SearchSpace

EPOCHS = 8
INITIAL = 10
WIDTH = 0.18
DRIFT = 0.05
NOISE = 0.01


@attrs.frozen
class XY(FineTuningParams):
    x: float
    y: float


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts``."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _gauss(*parts: object) -> float:
    u1, u2 = max(_unit(*parts, 1), 1e-12), _unit(*parts, 2)
    return math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)


@attrs.frozen
class Drift:
    """The seed's continual task: where the optimum is on each batch, and the batch's level."""

    seed: int

    def optimum(self, batch: int) -> tuple[float, float]:
        angle = 2 * math.pi * _unit(self.seed, "angle")
        x0, y0 = 0.25 + 0.5 * _unit(self.seed, "x0"), 0.25 + 0.5 * _unit(self.seed, "y0")
        # the optimum moves DRIFT a batch, and bounces back off the square's edges
        x = x0 + DRIFT * batch * math.cos(angle)
        y = y0 + DRIFT * batch * math.sin(angle)
        return _fold(x), _fold(y)

    def level(self, batch: int) -> float:
        return 0.1 * _gauss(self.seed, "level", batch)

    def quality(self, p: XY, batch: int) -> float:
        ox, oy = self.optimum(batch)
        d2 = (p.x - ox) ** 2 + (p.y - oy) ** 2
        return self.level(batch) + math.exp(-d2 / (2 * WIDTH**2))

    def best(self, batch: int) -> float:
        return self.level(batch) + 1.0


def _fold(v: float) -> float:
    v = v % 2.0
    return v if v <= 1.0 else 2.0 - v


class Synthetic(FineTuningMethod[XY]):
    """The continual task as a method: training is a learning curve towards the quality."""

    params_type = XY
    main_metric = "quality"
    model_format = "state_dict"
    search_space = SearchSpace(XY, x=FloatDistribution(0.0, 1.0), y=FloatDistribution(0.0, 1.0))

    def __init__(self, drift: Drift, name: str, search: Search | None) -> None:
        self.drift, self.name, self.search = drift, name, search
        self.proposal = "search" if search is not None else "top_n"
        self.model_factory = lambda: torch.nn.Linear(1, 1)
        self.epochs = 0
        self.runs = 0

    def initial_model(self) -> Any:
        torch.manual_seed(0)
        return torch.nn.Linear(1, 1)

    def initial_params(self, seed: int | None = None) -> Sequence[XY]:
        rng = random.Random(f"{self.drift.seed}/initial")
        return [XY(x=rng.random(), y=rng.random()) for _ in range(INITIAL)]

    def _batch(self, manager: ExperimentsManager) -> int:
        iteration = manager.current_iteration
        assert iteration is not None
        return int(iteration.batch_id.removeprefix("batch-"))

    def train(self, model: Any, params: XY, manager: ExperimentsManager) -> Any:
        batch = self._batch(manager)
        quality = self.drift.quality(params, batch)
        self.runs += 1
        for epoch in range(EPOCHS):
            self.epochs += 1
            curve = quality * (1 - math.exp(-(epoch + 1) / 2))
            noise = NOISE * _gauss(self.drift.seed, batch, params.id, epoch)
            manager.save_metric(MetricValue(self.main_metric, curve + noise, step=epoch))
            check_prune()
        return model

    def evaluate(self, model: Any, params: XY, manager: ExperimentsManager) -> float:
        batch = self._batch(manager)
        noise = NOISE * _gauss(self.drift.seed, batch, params.id, "final")
        return self.drift.quality(params, batch) + noise


def _policies(budget: int) -> dict[str, tuple[int, Search | None]]:
    """Each policy's runs per batch and search (None: ``top_n``)."""
    return {
        "top_n": (INITIAL, None),
        "search": (budget, Search(max_runs=budget, pruner=None)),
        "search + pruning": (budget, Search(max_runs=budget)),
        f"search + pruning, {INITIAL} runs": (INITIAL, Search(max_runs=INITIAL)),
    }


def run_policy(seed: int, policy: str, search: Search | None, batches: int) -> dict[str, Any]:
    """One seed's continual run under one policy: final best, runs, epochs."""
    drift = Drift(seed)
    method = Synthetic(drift, f"bench-{seed}", search)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        with tracker_core.connect(
            f"{folder}/models",
            tracking_uri=f"sqlite:///{folder}/mlflow.db",
            **connect_kwargs(method),
        ) as manager:
            pruned = 0
            for batch in range(batches):
                result = run_iteration(method, manager, f"batch-{batch:02d}", seed=seed)
                pruned += len(result.pruned_runs)
            assert result.best_metric is not None
            final = result.best_metric
        seconds = time.perf_counter() - started
    return {
        "final": final,
        "gap": drift.best(batches - 1) - final,
        "runs": method.runs,
        "epochs": method.epochs,
        "pruned": pruned,
        "seconds": seconds,
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--budget", type=int, default=5, help="runs per batch of the search")
    args = parser.parse_args()
    quiet_logs()
    logging.getLogger("optuna").setLevel(logging.WARNING)
    results: dict[str, list[dict[str, Any]]] = {}
    policies = _policies(args.budget)
    for seed in range(args.seeds):
        for name, (_, search) in policies.items():
            outcome = run_policy(seed, name, search, args.batches)
            results.setdefault(name, []).append(outcome)
            print(f"seed {seed} {name}: {outcome}", file=sys.stderr)
    baseline = results["top_n"]
    rows = []
    for name, outcomes in results.items():
        finals = [o["final"] for o in outcomes]
        runs = statistics.mean(o["runs"] for o in outcomes)
        rows.append(
            {
                "policy": name,
                "runs/batch": policies[name][0],
                "final best (mean)": statistics.mean(finals),
                "sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "gap to optimum": statistics.mean(o["gap"] for o in outcomes),
                ">= top_n": sum(
                    o["final"] >= b["final"] for o, b in zip(outcomes, baseline, strict=True)
                ),
                "runs": runs,
                "runs x top_n": runs / statistics.mean(o["runs"] for o in baseline),
                "epochs": statistics.mean(o["epochs"] for o in outcomes),
                "pruned": statistics.mean(o["pruned"] for o in outcomes),
                "s/seed": statistics.mean(o["seconds"] for o in outcomes),
            }
        )
    emit(
        "search across batches (synthetic drifting task)",
        rows,
        list(rows[0]),
        args.json,
        {"seeds": args.seeds, "batches": args.batches, "epochs": EPOCHS, "initial": INITIAL},
    )


if __name__ == "__main__":
    main()
