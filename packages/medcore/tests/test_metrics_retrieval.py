"""Retrieval metrics against a slow per-query reference and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, ndcg_score

from medcore.metrics import compute_relevance, random_baseline, retrieval_metrics

KS = (1, 3, 5, 10)


def _relevance(a: np.ndarray, b: np.ndarray, kind: str) -> float:
    shared = np.sum(a & b)
    if kind == "binary":
        return float(shared > 0)
    union = np.sum(a | b)
    return shared / union if union else 0.0


def _reference(query_emb, db_emb, query_labels, db_labels, ks, kind, exclude_self, similarity):
    """Per-query loops straight from the definitions; NDCG from scikit-learn."""
    qa, da = query_labels.astype(bool), db_labels.astype(bool)
    per_query: dict[str, list[float]] = {}
    for i in range(len(query_emb)):
        if similarity == "cosine":
            scores = db_emb @ query_emb[i] / np.linalg.norm(db_emb, axis=1)
            scores /= np.linalg.norm(query_emb[i])
        else:
            scores = -np.linalg.norm(db_emb - query_emb[i], axis=1)
        rel = np.array([_relevance(qa[i], da[j], kind) for j in range(len(db_emb))])
        if exclude_self:
            keep = np.arange(len(db_emb)) != i
            scores, rel = scores[keep], rel[keep]
        ranked = rel[np.argsort(-scores)]
        num_relevant = int(np.sum(rel > 0))
        for k in ks:
            per_query.setdefault(f"p@{k}", []).append(ranked[:k].sum() / k)
            if num_relevant == 0:
                continue
            hits = ranked[:k] > 0
            per_query.setdefault(f"r@{k}", []).append(hits.sum() / num_relevant)
            ap = sum(hits[: j + 1].mean() for j in range(k) if hits[j]) / min(k, num_relevant)
            per_query.setdefault(f"map@{k}", []).append(ap)
            ndcg = ndcg_score(rel[None], scores[None], k=k)
            per_query.setdefault(f"ndcg@{k}", []).append(ndcg)
    return {name: float(np.mean(values)) for name, values in per_query.items()}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    labels = (rng.random((70, 5)) < 0.25).astype(np.int64)
    emb = rng.normal(size=(70, 8))
    return emb, labels


@pytest.mark.parametrize("kind", ["binary", "jaccard"])
@pytest.mark.parametrize("similarity", ["cosine", "euclidean"])
def test_matches_reference_query_vs_database(data, kind, similarity):
    emb, labels = data
    expected = _reference(emb[:30], emb[30:], labels[:30], labels[30:], KS, kind, False, similarity)
    got = retrieval_metrics(
        torch.tensor(emb[:30]),
        torch.tensor(emb[30:]),
        torch.tensor(labels[:30]),
        torch.tensor(labels[30:]),
        ks=KS,
        relevance=kind,
        similarity=similarity,
        chunk_size=7,
    )
    assert got.keys() == {f"{m}@{k}" for m in ("p", "r", "map", "ndcg") for k in KS}
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name


@pytest.mark.parametrize("kind", ["binary", "jaccard"])
def test_matches_reference_with_exclude_self(data, kind):
    emb, labels = data
    expected = _reference(emb, emb, labels, labels, KS, kind, True, "cosine")
    got = retrieval_metrics(
        emb, emb, labels, labels, ks=KS, relevance=kind, exclude_self=True, chunk_size=16
    )
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name


def test_full_depth_map_is_sklearn_average_precision(data):
    emb, labels = data
    query, db = emb[:30], emb[30:]
    rel = compute_relevance(labels[:30], labels[30:], "binary").numpy()
    scores = (query / np.linalg.norm(query, axis=1, keepdims=True)) @ (
        db / np.linalg.norm(db, axis=1, keepdims=True)
    ).T
    has_relevant = rel.any(1)
    expected = np.mean(
        [
            average_precision_score(r, s)
            for r, s in zip(rel[has_relevant], scores[has_relevant], strict=True)
        ]
    )
    got = retrieval_metrics(query, db, labels[:30], labels[30:], ks=(len(db),), relevance="binary")
    assert got[f"map@{len(db)}"] == pytest.approx(expected, abs=1e-6)
    assert got[f"r@{len(db)}"] == pytest.approx(1.0)


def test_hand_computed_three_items():
    # Ranked by cosine: A (rel 1/2), B (rel 0), C (rel 2/3); two binary-relevant items.
    query = torch.tensor([[1.0, 0.0]])
    db = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.0, 1.0]])
    query_labels = torch.tensor([[1, 1, 0]])
    db_labels = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 1, 1]])
    idcg2 = 2 / 3 + 0.5 / math.log2(3)
    expected = {
        "p@1": 0.5,
        "p@2": 0.25,
        "p@3": 7 / 18,
        "r@1": 0.5,
        "r@2": 0.5,
        "r@3": 1.0,
        "map@1": 1.0,
        "map@2": 0.5,
        "map@3": 5 / 6,
        "ndcg@1": 0.75,
        "ndcg@2": 0.5 / idcg2,
        "ndcg@3": (0.5 + (2 / 3) / 2) / idcg2,
    }
    got = retrieval_metrics(query, db, query_labels, db_labels, ks=(1, 2, 3))
    assert got == pytest.approx(expected, abs=1e-6)

    binary = retrieval_metrics(query, db, query_labels, db_labels, ks=(1, 2, 3), relevance="binary")
    idcg2_binary = 1 + 1 / math.log2(3)
    assert binary["p@3"] == pytest.approx(2 / 3)
    assert binary["ndcg@2"] == pytest.approx(1 / idcg2_binary)
    assert binary["ndcg@3"] == pytest.approx(1.5 / idcg2_binary)


def test_class_ids_equal_one_hot(data):
    emb, _ = data
    ids = np.random.default_rng(1).integers(0, 4, size=len(emb))
    one_hot = np.eye(4, dtype=np.int64)[ids]
    by_ids = retrieval_metrics(emb, emb, ids, ids, ks=KS, exclude_self=True)
    by_hot = retrieval_metrics(emb, emb, one_hot, one_hot, ks=KS, exclude_self=True)
    assert by_ids == pytest.approx(by_hot)
    # With single labels Jaccard relevance is binary.
    assert torch.equal(
        compute_relevance(ids, ids, "jaccard"), compute_relevance(ids, ids, "binary")
    )


def test_relevance_values():
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    b = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    expected = np.array([[1 / 3, 0.0, 1.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(compute_relevance(a, b, "jaccard").numpy(), expected, rtol=1e-6)
    assert compute_relevance(a, b, "binary").tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


def test_no_relevant_query_gives_nan_for_ranking_metrics():
    emb = torch.randn(4, 3)
    labels = torch.tensor([[1, 0], [0, 1], [0, 1], [0, 1]])
    got = retrieval_metrics(emb[:1], emb[1:], labels[:1], labels[1:], ks=(1, 2))
    assert got["p@1"] == 0.0
    assert all(math.isnan(got[f"{m}@1"]) for m in ("r", "map", "ndcg"))


def test_random_baseline_is_seeded_and_near_chance(data):
    _, labels = data
    first = random_baseline(labels, labels, ks=KS, relevance="binary", exclude_self=True, seed=3)
    assert first == random_baseline(
        labels, labels, ks=KS, relevance="binary", exclude_self=True, seed=3
    )
    rel = compute_relevance(labels, labels, "binary").numpy()
    np.fill_diagonal(rel, 0)
    chance = rel.sum() / (len(labels) * (len(labels) - 1))
    assert first["p@10"] == pytest.approx(chance, abs=0.1)


def test_rejects_cutoff_beyond_database():
    emb = torch.randn(5, 3)
    labels = torch.ones(5, 2)
    with pytest.raises(ValueError, match="cutoffs"):
        retrieval_metrics(emb, emb, labels, labels, ks=(5,), exclude_self=True)
