"""The main job: two fine-tuning iterations of a small embedding model, tracked in MLflow.

Runs on the embedded default (SQLite + a local folder; nothing to start) inside a working
directory, ``./demo-run`` by default, which is **recreated fresh on every run** so repeated
demos do not pile up (use ``--workdir`` to keep one elsewhere)::

    python examples/finetune_embeddings.py            # or: make demo

Iteration 1 starts from the initial model with the method's initial params sets; iteration 2
starts from iteration 1's best model with its top params, then iteration 1 is deleted (its
models included). The script prints every run, the best model, where it is stored, and the
command that opens the MLflow UI on the result.

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


def print_iteration(number: int, result: IterationResult) -> None:
    start = "the initial model" if result.started_from_initial else f"run {result.start_run_id}"
    print(f"\nIteration {number}: {result.iteration_name!r} (experiment {result.experiment_id})")
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo-run"))
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    parser.add_argument(
        "--search", action="store_true", help="propose params sets with Optuna, prune weak runs"
    )
    parser.add_argument("--batches", type=int, default=2, help="iterations to run (default 2)")
    args = parser.parse_args()
    if args.batches < 2:
        parser.error("--batches must be at least 2")
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
    method = EmbeddingMethod(task_seed=0, n_initial=4)
    manager = tracker_core.connect(
        str(workdir / "mlartifacts"),
        tracking_uri=tracking_uri,
        n_top_runs=3,
        **connect_kwargs(method),
    )
    print(f"tracking: {tracking_uri}\nmodels:   {manager.artifacts.root}")
    print(f"method:   {method.name!r}, main metric {method.main_metric} (higher is better)")

    initial_quality = None
    results = []
    with manager:
        batches = [f"batch-{n:04d}" for n in range(1, args.batches + 1)]
        proposal = "search" if args.search else None
        for number, batch_id in enumerate(batches, 1):
            result = run_iteration(method, manager, batch_id, seed=0, proposal=proposal)
            results.append(result)
            print_iteration(number, result)
            if number == 1:
                initial_quality = method.evaluate(manager.download_initial_model(), None, manager)  # type: ignore[arg-type]
        remaining = [e.name for e in manager.get_experiments()]
        initial_kept = manager.has_initial_model()

    first, previous, second = results[0], results[-2], results[-1]
    assert all(r.best_metric is not None for r in results)
    print("\nSummary")
    chain = " -> ".join(f"iteration {n} {r.best_metric:.4f}" for n, r in enumerate(results, 1))
    print(f"  {method.main_metric}: initial model {initial_quality:.4f} -> {chain}")
    n = len(results)
    tried = (
        f"its best params and {len(second.runs) - 1} sets proposed from every earlier "
        f"iteration ({len(second.pruned_runs)} pruned)"
        if args.search
        else f"iteration {n - 1}'s top {len(second.runs)} params sets"
    )
    print(
        f"  iteration {n} tried {tried}, starting from its best model (run {second.start_run_id})"
    )
    print(
        f"  iteration {n - 1} deleted: {second.deleted_iteration_id == previous.experiment_id}; "
        f"iterations left: {remaining}; initial model kept: {initial_kept}"
    )
    print(f"  best model: run {second.best_run_id}, {method.main_metric}={second.best_metric:.4f}")
    print(f"    stored at {second.best_model_uri}")
    here = Path(__file__).resolve().parent  # the pickled model's class is in embedding_method
    print(
        f"    load it:  PYTHONPATH={here} MLFLOW_TRACKING_URI={tracking_uri} \\\n"
        '              python -c "import mlflow.pytorch; '
        f"print(mlflow.pytorch.load_model('runs:/{second.best_run_id}/model'))\""
    )
    print(
        f"    or copy:  tracker-core --tracking-uri {tracking_uri} --artifact-uri "
        f"{workdir / 'mlartifacts'} --plugin {method.name} --metric {method.main_metric} "
        f"download {second.best_run_id} ./best-model"
    )
    print(f"  browse it:  mlflow ui --backend-store-uri {tracking_uri}")
    print(f"  ({time.perf_counter() - began:.1f} s)")
    assert first.best_metric is not None and second.best_metric is not None
    if second.best_metric <= first.best_metric:
        print(f"warning: iteration {n} did not improve on iteration 1", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
