"""The main job: three fine-tuning iterations of a small embedding model, tracked in MLflow.

Runs on the embedded default (SQLite + a local folder; nothing to start) inside a working
directory, ``./demo-run`` by default, which is **recreated fresh on every run** so repeated
demos do not pile up (use ``--workdir`` to keep one elsewhere)::

    python examples/finetune_embeddings.py            # or: make demo

Iteration 1 starts from the initial model with the method's initial params sets; its best
model is the first **champion** (``models:/embedding-infonce@champion`` in MLflow's Model
Registry). Iteration 2 trains on a *narrow* batch (a few clusters only): its best model is
scored on the method's fixed holdout and **rejected**, since it forgot what the champion
knows. Iteration 3 starts from the champion (not from the rejected model) with iteration 2's
top params, beats it on the holdout and is **promoted**; the iterations no alias points at
are deleted (models included), the previous champion's is kept for rollback. The script
prints every run and decision, the champion's ``models:/`` URI, writes the lineage plot
(``quality.png``: the batch metric and holdout of each iteration, promotions and rejections
marked) and the command that opens the MLflow UI on the result.

``--search`` opts in to the search policy instead: iteration 2 retries iteration 1's best
params and tries sets an Optuna sampler proposes from iteration 1's runs, and a run clearly
behind the others at an epoch is pruned (``--batches N`` runs more iterations, so the sampler
has a history to learn from).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # embedding_method, when run as a script

from embedding_method import EmbeddingMethod

import tracker_core
from tracker_core.finetune import IterationResult, run_iteration
from tracker_core.lineage_plot import plot_lineage
from tracker_core.methods import connect_kwargs

MARKER = ".tracker-core-demo"


def fresh_workdir(path: Path) -> Path:
    """Recreate ``path``; refuse to wipe a non-empty folder the demo did not create."""
    path = path.resolve()
    if path.exists():
        if any(path.iterdir()) and not (path / MARKER).exists():
            sys.exit(f"{path} exists and was not made by this demo; pick another --workdir")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("created by examples/finetune_embeddings.py; safe to delete\n")
    return path


def print_iteration(number: int, result: IterationResult, narrow: bool) -> None:
    start = "the initial model" if result.started_from_initial else f"run {result.start_run_id}"
    kind = " (a narrow batch: a few clusters only)" if narrow else ""
    print(f"\nIteration {number}: {result.iteration_name!r} (experiment {result.experiment_id})")
    print(f"  batch {result.batch_id}{kind}")
    print(f"  started from {start}; {len(result.runs)} params sets")
    print(f"  {'run id':<34} {'lr':>7} {'epochs':>6} {'temp':>5} {result.main_metric:>12}  model")
    for run in result.runs:
        p = run.params
        metric = f"{run.metric:.4f}" if run.metric is not None else run.status.value
        metric = "pruned" if run.pruned else metric
        mark = (
            "kept (best)"
            if run.run_id == result.best_run_id
            else ("kept" if run.has_model else "-")
        )
        print(
            f"  {run.run_id:<34} {p.lr:>7g} {p.epochs:>6} {p.temperature:>5g} {metric:>12}  {mark}"  # type: ignore[attr-defined]
        )
    decision = result.promotion
    if decision is not None:
        against = (
            f" vs champion {decision.champion_holdout:.4f}"
            if decision.champion_holdout is not None
            else ""
        )
        print(
            f"  holdout {decision.holdout:.4f}{against}: {decision.outcome.value.upper()} "
            f"({decision.reason})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo-run"))
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    parser.add_argument(
        "--search", action="store_true", help="propose params sets with Optuna, prune weak runs"
    )
    parser.add_argument("--batches", type=int, default=3, help="iterations to run (default 3)")
    args = parser.parse_args()
    if args.batches < 3:
        parser.error("--batches must be at least 3 (a champion, a rejection, a promotion)")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # MLflow's own notices (database setup, pickle format) are noise here
        import mlflow  # noqa: F401 - it configures its loggers when imported: quiet them after

        logging.getLogger("mlflow").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # the model is tiny: threads cost more than they give

    began = time.perf_counter()
    workdir = fresh_workdir(args.workdir)
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    method = EmbeddingMethod(task_seed=0, n_initial=4, narrow_batches=["batch-0002"])
    manager = tracker_core.connect(
        str(workdir / "mlartifacts"),
        tracking_uri=tracking_uri,
        n_top_runs=3,
        **connect_kwargs(method),
    )
    print(f"tracking: {tracking_uri}\nmodels:   {manager.artifacts.root}")
    print(f"method:   {method.name!r}, main metric {method.main_metric} (higher is better)")

    batches = [f"batch-{n:04d}" for n in range(1, args.batches + 1)]
    results = []
    with manager:
        initial_holdout = 0.0
        proposal = "search" if args.search else None
        for number, batch_id in enumerate(batches, 1):
            result = run_iteration(method, manager, batch_id, seed=0, proposal=proposal)
            results.append(result)
            print_iteration(number, result, batch_id in method.narrow_batches)
            if number == 1:
                initial_holdout = method.evaluate_holdout(manager.download_initial_model())
        remaining = [e.name for e in manager.get_experiments()]
        initial_kept = manager.has_initial_model()
        champion = manager.promotion.champion()
        previous = manager.promotion.champion("previous-champion")
        name = manager.promotion.name
        plot = plot_lineage(manager.lineage.records(), workdir / "quality.png")

    decisions = [r.promotion for r in results]
    assert champion is not None and all(d is not None for d in decisions)
    print("\nSummary")
    print(
        f"  holdout {method.main_metric}: initial model {initial_holdout:.4f} -> "
        + " -> ".join(
            f"iteration {n} {d.holdout:.4f} ({d.outcome.value})"  # type: ignore[union-attr]
            for n, d in enumerate(decisions, 1)
        )
    )
    print(
        f"  iteration 3 started from the champion (run {results[2].start_run_id}), not from "
        f"iteration 2's rejected model, with iteration 2's top {len(results[2].runs)} params sets"
    )
    print(f"  iterations left: {remaining}; initial model kept: {initial_kept}")
    print(
        f"  champion: models:/{name}@champion = version {champion.version.version} "
        f"(run {champion.run_id}, holdout {champion.holdout:.4f})"
    )
    if previous is not None:
        print(
            f"    rollback: models:/{name}@previous-champion = version {previous.version.version}"
        )
    print(f"    stored at {champion.version.source}")
    here = Path(__file__).resolve().parent  # the pickled model's class is in embedding_method
    print(
        f"    load it:  PYTHONPATH={here} MLFLOW_TRACKING_URI={tracking_uri} \\\n"
        '              python -c "import mlflow.pytorch; '
        f"print(mlflow.pytorch.load_model('models:/{name}@champion'))\""
    )
    cli = (
        f"tracker-core --tracking-uri {tracking_uri} --artifact-uri {workdir / 'mlartifacts'} "
        f"--plugin {method.name} --metric {method.main_metric}"
    )
    print(f"    where it came from:  {cli} lineage @champion")
    print(f"  lineage plot: {plot} (batch metric, holdout, promotions and rejections)")
    print(f"  browse it:  mlflow ui --backend-store-uri {tracking_uri}")
    print(f"  ({time.perf_counter() - began:.1f} s)")
    outcomes = [d.outcome.value for d in decisions]  # type: ignore[union-attr]
    if not args.search and outcomes[:3] != ["promoted", "rejected", "promoted"]:
        print(f"warning: expected promoted, rejected, promoted; got {outcomes}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
