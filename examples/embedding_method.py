"""A fine-tuning method plug-in: a tiny two-tower embedding model trained with InfoNCE.

The task is synthetic and generated here, so the example needs no data download:

- a hidden space of ``LATENT`` dimensions holds item vectors drawn around ``CLUSTERS``
  centres; each item has a *query* view and a *document* view, two different non-linear
  projections of its vector into ``IN_DIM`` dimensions, plus noise;
- retrieval = for each held-out query, rank every held-out document; **recall@5** is the share
  of queries whose own document is in the top 5 (chance: 5 / number of documents);
- each data batch (``batch_id``) is a fresh sample of training pairs from the same task, the
  way each new batch of user feedback is in production; a run is scored (the main metric) on
  held-out pairs *of its batch*, which is all a batch can tell;
- a *narrow* batch (``narrow_batches``) comes from a few clusters only, as feedback from one
  customer: training on it forgets the rest of the task, which its own pairs cannot show;
- the **holdout** (:meth:`EmbeddingMethod.evaluate_holdout`) is a fixed sample of the whole
  task, the same for every batch: it is what promotion gates on, so a model that forgot does
  not replace the one serving.

The model is two small MLPs (query tower, document tower; ~4.7k parameters). Training is
contrastive (InfoNCE with in-batch negatives) on CPU and takes well under a second per run.

The method can be searched (``proposal="search"``, or ``--search`` in
``finetune_embeddings.py``): its ``search_space`` covers the learning rate, the epochs and the
temperature, and ``train`` logs the validation recall after every epoch and calls
``check_prune()``, so the search's median pruner stops a run clearly behind the others.
By default it keeps the seed's top-N rule.

Import it as a module (``from embedding_method import EmbeddingMethod``) or name it on the
command line: ``tracker-core run embedding_method:EmbeddingMethod --batch-id b1`` (run from
this folder).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from optuna.distributions import FloatDistribution, IntDistribution
from torch import nn
from torch.nn import functional as F

from tracker_core import ExperimentsManager, FineTuningParams, MetricValue
from tracker_core.finetune import check_prune
from tracker_core.methods import FineTuningMethod, sample_params
from tracker_core.search import Search, SearchSpace

__all__ = ["EmbeddingMethod", "EmbeddingParams", "TwoTowerEncoder", "make_task"]

IN_DIM, LATENT, HIDDEN, OUT_DIM = 32, 8, 48, 16
CLUSTERS, TRAIN_PAIRS, EVAL_ITEMS, TOP_K = 12, 2048, 1024, 5
BATCH_EVAL_ITEMS = 512
NARROW_CLUSTERS = (0, 1)  # where a narrow batch's pairs come from
NOISE = 0.35


class TwoTowerEncoder(nn.Module):
    """Query and document encoders; embeddings are L2-normalised."""

    def __init__(self, in_dim: int = IN_DIM, hidden: int = HIDDEN, out_dim: int = OUT_DIM) -> None:
        super().__init__()
        self.query = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        self.doc = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor, kind: str = "query") -> torch.Tensor:
        tower = self.query if kind == "query" else self.doc
        return F.normalize(tower(x), dim=-1)


@attrs.frozen
class EmbeddingParams(FineTuningParams):
    """Hyper-parameters of one run. (The architecture is fixed: each iteration starts from the
    previous best model, so every run must fit its weights.)"""

    lr: float
    epochs: int
    temperature: float
    batch_size: int = 128


@attrs.frozen
class Task:
    """The hidden structure of the synthetic retrieval task."""

    centres: torch.Tensor
    to_query: torch.Tensor
    to_doc: torch.Tensor

    def sample(
        self, n: int, seed: int, clusters: Sequence[int] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` (query, document) pairs (of ``clusters`` only, if given); row ``i`` of both
        views is the same item."""
        g = torch.Generator().manual_seed(seed)
        if clusters:
            pick = torch.randint(0, len(clusters), (n,), generator=g)
            cluster = torch.tensor(list(clusters))[pick]
        else:
            cluster = torch.randint(0, self.centres.shape[0], (n,), generator=g)
        z = self.centres[cluster] + 0.6 * torch.randn(n, LATENT, generator=g)
        queries = torch.tanh(z @ self.to_query) + NOISE * torch.randn(n, IN_DIM, generator=g)
        docs = torch.tanh(z @ self.to_doc) + NOISE * torch.randn(n, IN_DIM, generator=g)
        return queries, docs


def make_task(seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    return Task(
        centres=1.5 * torch.randn(CLUSTERS, LATENT, generator=g),
        to_query=torch.randn(LATENT, IN_DIM, generator=g) / LATENT**0.5,
        to_doc=torch.randn(LATENT, IN_DIM, generator=g) / LATENT**0.5,
    )


def _stable_seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("/".join(parts).encode()).digest()[:4], "little")


def recall_at_k(model: TwoTowerEncoder, queries: torch.Tensor, docs: torch.Tensor, k: int) -> float:
    """Share of queries whose own document (same row) ranks in the top ``k`` of all documents."""
    model.eval()
    with torch.no_grad():
        scores = model(queries, "query") @ model(docs, "doc").T
    own = scores.diagonal().unsqueeze(1)
    rank = (scores > own).sum(dim=1)  # documents scored strictly above the right one
    return float((rank < k).float().mean())


class EmbeddingMethod(FineTuningMethod[EmbeddingParams]):
    """Contrastive fine-tuning of :class:`TwoTowerEncoder` on the synthetic task."""

    name = "embedding-infonce"
    params_type = EmbeddingParams
    main_metric = f"recall_at_{TOP_K}"
    is_loss = False
    model_factory = TwoTowerEncoder  # used by the state_dict format; mlflow.pytorch ignores it
    search_space = SearchSpace(
        EmbeddingParams,
        lr=FloatDistribution(1e-3, 3e-2, log=True),
        epochs=IntDistribution(1, 5),
        temperature=FloatDistribution(0.03, 0.3, log=True),
    )
    #: when searched: four runs a batch, the validation recall of every epoch as the pruner's
    search = Search(max_runs=4, intermediate_metric=f"val_recall_at_{TOP_K}")

    def __init__(
        self,
        task_seed: int = 0,
        n_initial: int = 4,
        name: str | None = None,
        narrow_batches: Sequence[str] = (),
    ) -> None:
        self.task = make_task(task_seed)
        self.task_seed = task_seed
        self.n_initial = n_initial
        self.narrow_batches = frozenset(narrow_batches)
        if name is not None:
            self.name = name
        self._holdout = self.task.sample(EVAL_ITEMS, seed=_stable_seed(str(task_seed), "eval"))

    def _batch(self, manager: ExperimentsManager) -> tuple[str, Sequence[int]]:
        """The current batch and the clusters its pairs come from (all: empty)."""
        iteration = manager.current_iteration
        batch_id = iteration.batch_id if iteration else ""
        return batch_id, NARROW_CLUSTERS if batch_id in self.narrow_batches else ()

    def _batch_eval(self, manager: ExperimentsManager) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out pairs of the current batch (its own distribution)."""
        batch_id, clusters = self._batch(manager)
        seed = _stable_seed(str(self.task_seed), batch_id, "eval")
        return self.task.sample(BATCH_EVAL_ITEMS, seed=seed, clusters=clusters)

    def initial_model(self) -> TwoTowerEncoder:
        torch.manual_seed(self.task_seed)
        return TwoTowerEncoder()

    def initial_params(self, seed: int | None = None) -> Sequence[EmbeddingParams]:
        return sample_params(
            EmbeddingParams,
            self.n_initial,
            seed,
            lr=[3e-3, 1e-2],
            epochs=[2, 4],
            temperature=[0.05, 0.2],
        )

    def train(self, model: Any, params: EmbeddingParams, manager: ExperimentsManager) -> Any:
        batch_id, clusters = self._batch(manager)
        # deterministic per (batch, params): a resumed run trains exactly as the first attempt
        torch.manual_seed(_stable_seed(batch_id, params.id))
        queries, docs = self.task.sample(
            TRAIN_PAIRS, seed=_stable_seed(str(self.task_seed), batch_id), clusters=clusters
        )
        held_out = self._batch_eval(manager)
        optimiser = torch.optim.Adam(model.parameters(), lr=params.lr)
        for epoch in range(params.epochs):
            model.train()
            order = torch.randperm(TRAIN_PAIRS)
            total = 0.0
            for start in range(0, TRAIN_PAIRS, params.batch_size):
                idx = order[start : start + params.batch_size]
                logits = model(queries[idx], "query") @ model(docs[idx], "doc").T
                loss = F.cross_entropy(logits / params.temperature, torch.arange(len(idx)))
                optimiser.zero_grad()
                torch.autograd.backward(loss)
                optimiser.step()
                total += float(loss.detach()) * len(idx)
            manager.save_metric(MetricValue("train_loss", total / TRAIN_PAIRS, step=epoch))
            manager.save_metric(
                MetricValue(
                    f"val_{self.main_metric}", recall_at_k(model, *held_out, TOP_K), step=epoch
                )
            )
            check_prune()  # a no-op unless the iteration is searched with a pruner
        return model

    def evaluate(self, model: Any, params: EmbeddingParams, manager: ExperimentsManager) -> float:
        """recall@5 on held-out pairs of the run's batch."""
        return recall_at_k(model, *self._batch_eval(manager), TOP_K)

    def evaluate_holdout(self, model: Any) -> float:
        """recall@5 on the fixed holdout of the whole task (turns promotion on)."""
        return recall_at_k(model, *self._holdout, TOP_K)
