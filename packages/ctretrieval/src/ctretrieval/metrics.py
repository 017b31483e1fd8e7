"""Embeddings of a split and the metric table: retrieval (P/R/mAP/NDCG@k) and finding F1.

Shape notation: ``q`` queries, ``n`` database studies, ``c`` label slots, ``e`` embedding size.

Findings are predicted by the classification head (microf1 mode) or, for a model without a
head (triplet mode), by a vote of the ``knn_k`` nearest database studies: a slot is positive
when at least ``threshold`` of the neighbours have it. The pooled F1 scores (micro, macro,
weighted) cover the real findings only: the derived "no finding" slot is set for every study
without one, so it is easy to get right and would inflate them; its F1 is reported beside them.

Used by training (validation and the test report), ``ctretrieval-eval`` and the index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ctretrieval.config import CTRetrievalConfig, EvalConfig
from medcore.engine.inference import PredictOptions, predict
from medcore.errors import DataError
from medcore.metrics.classification import multilabel_f1
from medcore.metrics.retrieval import random_baseline, retrieval_metrics


@dataclass
class Embedded:
    emb: torch.Tensor  # [n, e] float32, L2-normalised
    labels: torch.Tensor  # [n, c]
    probs: torch.Tensor | None  # [n, c] head probabilities, None without a head


def embed(model: nn.Module, data: Dataset, options: PredictOptions) -> Embedded:
    """Embeddings (and head probabilities) of every study of ``data``, in order, no augmentation.

    One :func:`medcore.engine.inference.predict` loop: volumes read from the HDF5 in DataLoader
    workers, pinned memory on CUDA, the training run's precision; with ``options.shard`` under
    DDP each rank embeds its part and every rank gets all of them.
    """

    def forward(m: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**m.get_embeddings(batch["volume"]), "labels": batch["labels"]}

    out = predict(model, data, forward, options)
    return Embedded(out["embedding"], out["labels"], out.get("probs"))


def knn_label_scores(
    query: torch.Tensor,
    db: torch.Tensor,
    db_labels: torch.Tensor,
    k: int,
    exclude_self: bool = False,
) -> torch.Tensor:
    """``[q, c]``: the fraction of each query's ``k`` most similar (cosine) database studies with each slot."""
    sim = query @ db.T
    if exclude_self:
        sim.fill_diagonal_(-math.inf)
    k = min(k, db.shape[0] - int(exclude_self))
    top = sim.topk(k, dim=1).indices
    return (db_labels[top] > 0).float().mean(1)


def valid_ks(ks: list[int], n_db: int, exclude_self: bool) -> list[int]:
    """The cutoffs that a database of ``n_db`` studies can fill."""
    return [k for k in sorted(set(ks)) if k <= n_db - int(exclude_self)]


def compute_metrics(
    query: Embedded,
    db: Embedded,
    cfg: EvalConfig,
    class_names: list[str],
    exclude_self: bool,
    no_finding: str | None = None,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, float], torch.Tensor]:
    """(model metrics, random-ranking baseline, finding scores ``[q, c]``) for ``query`` against ``db``.

    ``no_finding``: the name of the derived "no finding" slot in ``class_names``, left out of
    ``micro_f1`` / ``macro_f1`` / ``weighted_f1`` and reported as ``f1/<name>`` only.
    ``seed``: the random ranking of the baseline.
    """
    ks = valid_ks(cfg.ks, len(db.emb), exclude_self)
    if not ks:
        raise DataError(
            "evaluation",
            f"the database has {len(db.emb)} studies: too few for any cutoff in {cfg.ks}",
        )
    metrics = retrieval_metrics(
        query.emb,
        db.emb,
        query.labels,
        db.labels,
        ks=ks,
        relevance=cfg.relevance,
        exclude_self=exclude_self,
    )
    baseline = random_baseline(
        query.labels,
        db.labels,
        ks=ks,
        relevance=cfg.relevance,
        exclude_self=exclude_self,
        seed=seed,
    )
    if query.probs is not None:
        scores = query.probs
    else:
        scores = knn_label_scores(query.emb, db.emb, db.labels, cfg.knn_k, exclude_self)
    truth, predicted = query.labels.numpy() > 0, scores.numpy() >= cfg.threshold
    findings = [c for c, name in enumerate(class_names) if name != no_finding]
    pooled = multilabel_f1(truth[:, findings], predicted[:, findings])
    metrics.update(
        micro_f1=pooled["micro_f1"], macro_f1=pooled["macro_f1"], weighted_f1=pooled["weighted_f1"]
    )
    per_class = multilabel_f1(truth, predicted)["per_class_f1"]
    metrics.update({f"f1/{name}": v for name, v in zip(class_names, per_class, strict=True)})
    return metrics, baseline, scores


def score(
    query: Embedded,
    db: Embedded,
    cfg: CTRetrievalConfig,
    class_names: list[str],
    exclude_self: bool,
) -> tuple[dict[str, float], dict[str, float], torch.Tensor]:
    """:func:`compute_metrics` with the run's eval settings, "no finding" slot and seed."""
    return compute_metrics(
        query,
        db,
        cfg.eval,
        class_names,
        exclude_self=exclude_self,
        no_finding=cfg.data.no_finding_name,
        seed=cfg.seed,
    )


def metric_rows(metrics: dict[str, float], baseline: dict[str, float]) -> list[dict[str, Any]]:
    """Rows ``metric | model | random`` for :func:`medcore.report.tables.format_table`."""
    return [{"metric": k, "model": v, "random": baseline.get(k, "")} for k, v in metrics.items()]
