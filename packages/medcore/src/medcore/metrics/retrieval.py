"""Ranking metrics for embedding-based retrieval (precision, recall, mAP and NDCG at cutoffs).

Shape notation: ``q`` queries, ``n`` database items, ``c`` classes (label columns), ``k`` cutoff,
``d`` embedding dimension.

Labels are multi-hot ``[q, c]`` / ``[n, c]`` matrices, or 1-D integer class ids that are turned
into one-hot rows. Two items are *relevant* to each other according to ``relevance``:

* ``"binary"``: 1 when they share at least one positive label, else 0.
* ``"jaccard"``: graded ``|a ∩ b| / |a ∪ b|`` in ``[0, 1]``; 0 when both label sets are empty.

A graded relevance is positive exactly when the binary one is, so "relevant item" below always
means "relevance > 0".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

Relevance = Literal["jaccard", "binary"]
Similarity = Literal["cosine", "euclidean"]

__all__ = ["compute_relevance", "random_baseline", "retrieval_metrics"]


def as_tensor(x: torch.Tensor | np.ndarray | Sequence) -> torch.Tensor:
    """The input as a detached torch tensor (numpy arrays and sequences are wrapped, not copied)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.as_tensor(np.asarray(x))


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Floating point view of ``x``, promoting integer and half types to float32."""
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.to(torch.float32)


def _multi_hot(
    query_labels: torch.Tensor, db_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both label sets as float multi-hot matrices with a common number of classes."""
    if query_labels.ndim != db_labels.ndim or query_labels.ndim not in (1, 2):
        raise ValueError(
            "labels must both be 1-D class ids or both 2-D multi-hot matrices, got shapes "
            f"{tuple(query_labels.shape)} and {tuple(db_labels.shape)}"
        )
    if query_labels.ndim == 1:
        # Class ids from both sides share one one-hot space.
        num_classes = int(max(query_labels.max(), db_labels.max())) + 1
        return (
            torch.nn.functional.one_hot(query_labels.long(), num_classes).float(),
            torch.nn.functional.one_hot(db_labels.long(), num_classes).float(),
        )
    if query_labels.shape[1] != db_labels.shape[1]:
        raise ValueError(
            f"query labels have {query_labels.shape[1]} columns, database labels "
            f"{db_labels.shape[1]}"
        )
    return (query_labels > 0).float(), (db_labels > 0).float()


def _relevance_from_multi_hot(
    query_hot: torch.Tensor, db_hot: torch.Tensor, kind: Relevance
) -> torch.Tensor:
    """``[q, n]`` relevance between multi-hot rows."""
    shared = query_hot @ db_hot.T
    if kind == "binary":
        return (shared > 0).float()
    if kind == "jaccard":
        union = query_hot.sum(1, keepdim=True) + db_hot.sum(1) - shared
        # An empty union means both label sets are empty: nothing shared, so not relevant.
        return torch.where(union > 0, shared / union.clamp_min(1), torch.zeros_like(shared))
    raise ValueError(f"relevance must be 'jaccard' or 'binary', got {kind!r}")


def compute_relevance(
    query_labels: torch.Tensor | np.ndarray,
    db_labels: torch.Tensor | np.ndarray,
    kind: Relevance = "jaccard",
) -> torch.Tensor:
    """Relevance ``[q, n]`` of every database item to every query (see the module docstring)."""
    query_hot, db_hot = _multi_hot(as_tensor(query_labels), as_tensor(db_labels))
    return _relevance_from_multi_hot(query_hot, db_hot, kind)


def _similarity(query: torch.Tensor, db: torch.Tensor, kind: Similarity) -> torch.Tensor:
    """``[q, n]`` scores where higher means closer."""
    if kind == "cosine":
        return (
            torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(db, dim=1).T
        )
    if kind == "euclidean":
        return -torch.cdist(query, db)
    raise ValueError(f"similarity must be 'cosine' or 'euclidean', got {kind!r}")


def retrieval_metrics(
    query_emb: torch.Tensor | np.ndarray,
    db_emb: torch.Tensor | np.ndarray,
    query_labels: torch.Tensor | np.ndarray,
    db_labels: torch.Tensor | np.ndarray,
    ks: Sequence[int] = (1, 3, 5, 10, 20),
    relevance: Relevance = "jaccard",
    exclude_self: bool = False,
    similarity: Similarity = "cosine",
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Precision, recall, mAP and NDCG at each cutoff for ranking the database by similarity.

    Each query ranks the whole database by ``similarity`` (cosine similarity, or negative
    Euclidean distance); ``rel_i`` is the relevance of the item at rank ``i`` (1-based) and
    ``bin_i = rel_i > 0``. Per query:

    * ``p@k``: ``sum_{i<=k} rel_i / k``. Graded relevance counts fractionally; with binary
      relevance this is ordinary precision.
    * ``r@k``: ``sum_{i<=k} bin_i / R`` where ``R`` is the number of relevant database items.
    * ``map@k``: ``AP@k = sum_{i<=k} P_bin@i * bin_i / min(k, R)`` with ``P_bin@i`` the binary
      precision at ``i``, averaged over queries.
    * ``ndcg@k``: ``DCG@k / IDCG@k`` with ``DCG@k = sum_{i<=k} rel_i / log2(i + 1)`` (graded
      gains) and ``IDCG@k`` the same sum for the database's relevances sorted in descending
      order, i.e. the best possible ranking.

    Returned values are means over queries. ``p@k`` averages over all queries; ``r@k``,
    ``map@k`` and ``ndcg@k`` average only over queries with at least one relevant item
    (``R > 0``), since they are undefined otherwise; they are NaN when no query has one.

    With ``exclude_self`` the query set must be the database in the same order; each query's own
    item is then removed from its ranking and from ``R``. Queries are processed ``chunk_size`` at a
    time so that only a ``[chunk_size, n]`` block of scores is held in memory. Ties in similarity
    are broken arbitrarily by ``torch.topk``.
    """
    query = as_float(as_tensor(query_emb))
    db = as_float(as_tensor(db_emb)).to(query.device, query.dtype)
    query_hot, db_hot = _multi_hot(
        as_tensor(query_labels).to(query.device), as_tensor(db_labels).to(query.device)
    )
    num_queries, num_db = query.shape[0], db.shape[0]
    if query_hot.shape[0] != num_queries or db_hot.shape[0] != num_db:
        raise ValueError("embeddings and labels must have the same number of rows")
    if exclude_self and num_queries != num_db:
        raise ValueError("exclude_self needs the query set to be the database (same rows)")
    ks = sorted(set(ks))
    rankable = num_db - int(exclude_self)
    if not ks or ks[0] < 1 or ks[-1] > rankable:
        raise ValueError(f"cutoffs must lie in [1, {rankable}], got {ks}")
    k_max = ks[-1]
    cut = torch.tensor(ks, device=query.device) - 1

    ranks = torch.arange(1, k_max + 1, device=query.device, dtype=torch.float64)
    discount = 1.0 / torch.log2(ranks + 1)
    # Running sums over queries, float64 so that large query sets do not lose precision.
    sums = {
        name: torch.zeros(len(ks), dtype=torch.float64, device=query.device)
        for name in ("p", "r", "map", "ndcg")
    }
    num_with_relevant = 0

    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        scores = _similarity(query[start:stop], db, similarity)
        rel = _relevance_from_multi_hot(query_hot[start:stop], db_hot, relevance).double()
        if exclude_self:
            own = torch.arange(start, stop, device=query.device)
            rows = own - start
            scores[rows, own] = -math.inf
            rel[rows, own] = 0.0

        top = torch.topk(scores, k_max, dim=1, sorted=True).indices
        top_rel = rel.gather(1, top)
        top_bin = (top_rel > 0).double()
        num_relevant = (rel > 0).sum(1).double()
        has_relevant = num_relevant > 0
        num_with_relevant += int(has_relevant.sum())

        hits = top_bin.cumsum(1)
        sums["p"] += (top_rel.cumsum(1)[:, cut] / (cut + 1)).sum(0)
        recall = hits[:, cut] / num_relevant.clamp_min(1)[:, None]
        sums["r"] += recall[has_relevant].sum(0)
        ap_num = (hits / ranks * top_bin).cumsum(1)[:, cut]
        ap_den = torch.minimum((cut + 1)[None, :].double(), num_relevant[:, None]).clamp_min(1)
        sums["map"] += (ap_num / ap_den)[has_relevant].sum(0)
        ideal = torch.topk(rel, k_max, dim=1, sorted=True).values
        dcg = (top_rel * discount).cumsum(1)[:, cut]
        idcg = (ideal * discount).cumsum(1)[:, cut]
        sums["ndcg"] += (dcg / idcg.clamp_min(1e-12))[has_relevant].sum(0)

    denominators = {
        "p": num_queries,
        "r": num_with_relevant,
        "map": num_with_relevant,
        "ndcg": num_with_relevant,
    }
    out: dict[str, float] = {}
    for name, total in sums.items():
        for i, k in enumerate(ks):
            den = denominators[name]
            out[f"{name}@{k}"] = float(total[i]) / den if den else math.nan
    return out


def random_baseline(
    query_labels: torch.Tensor | np.ndarray,
    db_labels: torch.Tensor | np.ndarray,
    ks: Sequence[int] = (1, 3, 5, 10, 20),
    relevance: Relevance = "jaccard",
    exclude_self: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """:func:`retrieval_metrics` for a random ranking: the chance level for comparison tables.

    The ranking comes from seeded random Gaussian embeddings (cosine similarity), so it is
    reproducible and independent of the labels.
    """
    query_labels, db_labels = as_tensor(query_labels), as_tensor(db_labels)
    generator = torch.Generator().manual_seed(seed)
    db_emb = torch.randn(db_labels.shape[0], 64, generator=generator)
    # With exclude_self the queries must be the database items themselves.
    query_emb = (
        db_emb if exclude_self else torch.randn(query_labels.shape[0], 64, generator=generator)
    )
    return retrieval_metrics(
        query_emb,
        db_emb,
        query_labels,
        db_labels,
        ks=ks,
        relevance=relevance,
        exclude_self=exclude_self,
    )
