"""Embeddings of a split and the metric table: retrieval (P/R/mAP/NDCG@k) and finding F1.

Shape notation: ``q`` queries, ``n`` database studies, ``c`` label slots, ``e`` embedding size.

Findings are predicted by the classification head (microf1 mode) or, for a model without a
head (triplet mode), by a vote of the ``knn_k`` nearest database studies: a slot is positive
when at least ``threshold`` of the neighbours have it. The pooled F1 scores (micro, macro,
weighted) cover the real findings only: the derived "no finding" slot is set for every study
without one, so it is easy to get right and would inflate them; its F1 is reported beside them.

The test report and ``ctretrieval-eval`` add 95% percentile bootstrap intervals
(:func:`metric_intervals`): the queries are resampled, so a retrieval metric's interval is that of
its mean over queries and a pooled F1's that of the counts pooled over the resampled queries.

Used by training (validation and the test report), ``ctretrieval-eval`` and the index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ctretrieval.config import CTRetrievalConfig, EvalConfig
from medcore.engine.inference import PredictOptions, predict
from medcore.errors import DataError
from medcore.metrics.classification import bootstrap_ci, multilabel_f1
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
    findings = _findings(class_names, no_finding)
    pooled = multilabel_f1(truth[:, findings], predicted[:, findings])
    metrics.update(
        micro_f1=pooled["micro_f1"], macro_f1=pooled["macro_f1"], weighted_f1=pooled["weighted_f1"]
    )
    per_class = multilabel_f1(truth, predicted)["per_class_f1"]
    metrics.update({f"f1/{name}": v for name, v in zip(class_names, per_class, strict=True)})
    return metrics, baseline, scores


def _findings(class_names: list[str], no_finding: str | None) -> list[int]:
    """The slots the pooled F1 scores cover: all but the derived "no finding" one."""
    return [c for c, name in enumerate(class_names) if name != no_finding]


def per_query_retrieval(
    query: Embedded, db: Embedded, ks: list[int], cfg: EvalConfig, exclude_self: bool
) -> dict[str, np.ndarray]:
    """Each query's P/R/mAP/NDCG@k: ``{name: [q]}``, NaN where a query has no relevant study.

    Each query is ranked alone by :func:`medcore.metrics.retrieval.retrieval_metrics` (with
    ``exclude_self`` against the database without its own row), so the mean of ``p@k`` and the
    NaN-skipping mean of the others are the values :func:`compute_metrics` reports.
    """
    rows = []
    for i in range(len(query.emb)):
        keep = torch.arange(len(db.emb)) != i if exclude_self else slice(None)
        rows.append(
            retrieval_metrics(
                query.emb[i : i + 1],
                db.emb[keep],
                query.labels[i : i + 1],
                db.labels[keep],
                ks=ks,
                relevance=cfg.relevance,
            )
        )
    return {name: np.array([row[name] for row in rows]) for name in rows[0]}


def _mean_over_queries(values: np.ndarray, _: np.ndarray) -> float:
    # NaN for a resample of queries without any relevant study: bootstrap_ci skips it.
    return float(np.nanmean(values))


def metric_intervals(
    query: Embedded,
    db: Embedded,
    scores: torch.Tensor,
    cfg: EvalConfig,
    class_names: list[str],
    exclude_self: bool,
    no_finding: str | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """95% percentile bootstrap intervals of :func:`compute_metrics`' retrieval metrics and
    pooled F1 scores: ``{"<metric>_ci_low": ..., "<metric>_ci_high": ...}``.

    ``cfg.n_boot`` resamples of the queries (with replacement), drawn from ``seed`` by
    :func:`medcore.metrics.classification.bootstrap_ci`: every metric sees the same resamples.
    ``scores``: the finding scores ``compute_metrics`` returned. Empty with ``n_boot`` 0 or no
    query.
    """
    if not cfg.n_boot or not len(query.emb):
        return {}
    ks = valid_ks(cfg.ks, len(db.emb), exclude_self)
    out: dict[str, float] = {}

    def add(name: str, low: float, high: float) -> None:
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high

    for name, values in per_query_retrieval(query, db, ks, cfg, exclude_self).items():
        add(name, *bootstrap_ci(_mean_over_queries, values, values, cfg.n_boot, seed=seed))
    findings = _findings(class_names, no_finding)
    truth = query.labels.numpy()[:, findings] > 0
    predicted = scores.numpy()[:, findings] >= cfg.threshold
    for name in ("micro_f1", "macro_f1", "weighted_f1"):

        def pooled(t: np.ndarray, p: np.ndarray, name: str = name) -> float:
            return multilabel_f1(t, p)[name]

        add(name, *bootstrap_ci(pooled, truth, predicted, cfg.n_boot, seed=seed))
    return out


def score(
    query: Embedded,
    db: Embedded,
    cfg: CTRetrievalConfig,
    class_names: list[str],
    exclude_self: bool,
    intervals: bool = False,
) -> tuple[dict[str, float], dict[str, float], torch.Tensor]:
    """:func:`compute_metrics` with the run's eval settings, "no finding" slot and seed.

    ``intervals``: the model's metrics also carry :func:`metric_intervals` (``eval.n_boot``
    resamples seeded by the run's seed) as ``<metric>_ci_low`` / ``<metric>_ci_high``.
    """
    metrics, baseline, scores = compute_metrics(
        query,
        db,
        cfg.eval,
        class_names,
        exclude_self=exclude_self,
        no_finding=cfg.data.no_finding_name,
        seed=cfg.seed,
    )
    if intervals:
        metrics.update(
            metric_intervals(
                query,
                db,
                scores,
                cfg.eval,
                class_names,
                exclude_self,
                no_finding=cfg.data.no_finding_name,
                seed=cfg.seed,
            )
        )
    return metrics, baseline, scores


def metric_rows(metrics: dict[str, float], baseline: dict[str, float]) -> list[dict[str, Any]]:
    """Rows ``metric | model | ci_low | ci_high | random`` for
    :func:`medcore.report.tables.format_table` and the CSV: the interval keys of
    :func:`metric_intervals` fill the CI columns of their metric's row ("" without one)."""
    return [
        {
            "metric": k,
            "model": v,
            "ci_low": metrics.get(f"{k}_ci_low", ""),
            "ci_high": metrics.get(f"{k}_ci_high", ""),
            "random": baseline.get(k, ""),
        }
        for k, v in metrics.items()
        if not k.endswith(("_ci_low", "_ci_high"))
    ]
