"""k-nearest-neighbour classification on embeddings, vectorised in torch.

Shape notation: ``q`` queries, ``n`` training items, ``c`` classes, ``k`` neighbours, ``d``
embedding dimension. Class labels are integer ids ``0 .. c-1``.

Distances are Euclidean, or ``1 - cosine similarity`` for ``metric="cosine"`` (as in
scikit-learn's ``metric="cosine"``). Distance weighting uses ``1 / (distance + eps)``, which
matches scikit-learn's ``weights="distance"`` up to ``eps`` (scikit-learn gives exact duplicates
all the weight; here their weight ``1 / eps`` dominates instead).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from medcore.metrics.retrieval import as_float, as_tensor

Metric = Literal["cosine", "euclidean"]
Score = Literal["accuracy", "balanced_accuracy"]

__all__ = ["knn_auto_k", "knn_predict_proba"]

_EPS = 1e-8


def _neighbours(
    train_emb: torch.Tensor,
    query_emb: torch.Tensor,
    k: int,
    metric: Metric,
    exclude_self: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances ``[q, k]`` and training indices ``[q, k]`` of each query's nearest neighbours.

    Sorted nearest first; queries are processed ``chunk_size`` at a time.
    """
    if metric == "cosine":
        train_emb = torch.nn.functional.normalize(train_emb, dim=1)
        query_emb = torch.nn.functional.normalize(query_emb, dim=1)
    elif metric != "euclidean":
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    dists, indices = [], []
    for start in range(0, query_emb.shape[0], chunk_size):
        chunk = query_emb[start : start + chunk_size]
        if metric == "cosine":
            dist = 1.0 - chunk @ train_emb.T
        else:
            dist = torch.cdist(chunk, train_emb)
        if exclude_self:
            rows = torch.arange(chunk.shape[0], device=dist.device)
            dist[rows, rows + start] = math.inf
        values, idx = torch.topk(dist, k, dim=1, largest=False, sorted=True)
        # Rounding can push a cosine distance of a near-duplicate slightly below zero.
        dists.append(values.clamp_min(0))
        indices.append(idx)
    return torch.cat(dists), torch.cat(indices)


def _vote(
    dist: torch.Tensor, neighbour_y: torch.Tensor, num_classes: int, weighted: bool
) -> torch.Tensor:
    """Class probabilities ``[q, c]`` from the (possibly weighted) votes of the neighbours."""
    weights = 1.0 / (dist + _EPS) if weighted else torch.ones_like(dist)
    votes = torch.zeros(dist.shape[0], num_classes, dtype=dist.dtype, device=dist.device)
    votes.scatter_add_(1, neighbour_y, weights)
    return votes / votes.sum(1, keepdim=True)


def _prepare(
    train_emb: torch.Tensor | np.ndarray,
    train_y: torch.Tensor | np.ndarray,
    query_emb: torch.Tensor | np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training and query embeddings as float tensors on one device, labels as long ids."""
    query = as_float(as_tensor(query_emb))
    train = as_float(as_tensor(train_emb)).to(query.device, query.dtype)
    labels = as_tensor(train_y).to(query.device).long()
    if labels.ndim != 1 or labels.shape[0] != train.shape[0]:
        raise ValueError("train_y must be 1-D class ids, one per training embedding")
    return train, labels, query


def knn_predict_proba(
    train_emb: torch.Tensor | np.ndarray,
    train_y: torch.Tensor | np.ndarray,
    query_emb: torch.Tensor | np.ndarray,
    k: int,
    weighted: bool = True,
    num_classes: int | None = None,
    metric: Metric = "cosine",
    exclude_self: bool = False,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class probabilities ``[q, c]`` for each query from its ``k`` nearest training items.

    Column ``j`` is class id ``j``; ``num_classes`` defaults to ``max(train_y) + 1``. Each
    neighbour votes with weight ``1 / (distance + eps)`` if ``weighted``, else 1, and the votes
    are normalised to sum to one. With ``exclude_self`` the queries must be the training items in
    the same order, and each query's own item is not its own neighbour (leave-one-out).
    """
    train, labels, query = _prepare(train_emb, train_y, query_emb)
    available = train.shape[0] - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(f"k must lie in [1, {available}], got {k}")
    if exclude_self and query.shape[0] != train.shape[0]:
        raise ValueError("exclude_self needs the queries to be the training items (same rows)")
    num_classes = num_classes if num_classes is not None else int(labels.max()) + 1
    dist, idx = _neighbours(train, query, k, metric, exclude_self, chunk_size)
    return _vote(dist, labels[idx], num_classes, weighted)


def _score(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int, score: Score) -> float:
    """Accuracy, or balanced accuracy (mean recall over the classes present in ``y_true``)."""
    correct = y_pred == y_true
    if score == "accuracy":
        return float(correct.double().mean())
    if score == "balanced_accuracy":
        support = torch.bincount(y_true, minlength=num_classes)
        hits = torch.bincount(y_true[correct], minlength=num_classes)
        present = support > 0
        return float((hits[present].double() / support[present]).mean())
    raise ValueError(f"score must be 'accuracy' or 'balanced_accuracy', got {score!r}")


def knn_auto_k(
    train_emb: torch.Tensor | np.ndarray,
    train_y: torch.Tensor | np.ndarray,
    val_emb: torch.Tensor | np.ndarray,
    val_y: torch.Tensor | np.ndarray,
    ks: Sequence[int] = (5, 9, 15, 20, 25, 30, 40, 50),
    weighted: bool = True,
    metric: Metric = "euclidean",
    score: Score = "accuracy",
    chunk_size: int = 1024,
) -> tuple[int, dict[int, float]]:
    """The ``k`` with the best validation score, and the score of every ``k`` tried.

    The neighbour ranking is computed once for the largest ``k`` and every smaller ``k`` reuses
    its prefix, so trying many ``k`` costs about as much as one. ``k`` larger than the training
    set are skipped. Predictions are the arg-max of :func:`knn_predict_proba` (ties go to the
    lowest class id), and ties in score go to the smallest ``k``.
    """
    train, labels, val = _prepare(train_emb, train_y, val_emb)
    val_labels = as_tensor(val_y).to(val.device).long()
    usable = sorted(k for k in set(ks) if 1 <= k <= train.shape[0])
    if not usable:
        raise ValueError(f"no k in {tuple(ks)} fits a training set of {train.shape[0]} items")
    num_classes = int(max(labels.max(), val_labels.max())) + 1
    dist, idx = _neighbours(train, val, usable[-1], metric, False, chunk_size)
    neighbour_y = labels[idx]
    scores = {
        k: _score(
            val_labels,
            _vote(dist[:, :k], neighbour_y[:, :k], num_classes, weighted).argmax(1),
            num_classes,
            score,
        )
        for k in usable
    }
    best_k = max(usable, key=lambda k: (scores[k], -k))
    return best_k, scores
