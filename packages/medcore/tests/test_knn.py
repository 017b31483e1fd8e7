"""kNN probe against scikit-learn's KNeighborsClassifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.neighbors import KNeighborsClassifier

from medcore.metrics import knn_auto_k, knn_predict_proba


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=1.5, size=(4, 6))
    train_y = rng.integers(0, 4, size=300)
    val_y = rng.integers(0, 4, size=120)
    train = centres[train_y] + rng.normal(size=(300, 6))
    val = centres[val_y] + rng.normal(size=(120, 6))
    return train, train_y, val, val_y


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_predict_proba_matches_sklearn(data, weighted, metric, dtype):
    train, train_y, val, _ = data
    sk = KNeighborsClassifier(
        n_neighbors=7, weights="distance" if weighted else "uniform", metric=metric
    ).fit(train, train_y)
    got = knn_predict_proba(
        torch.tensor(train, dtype=dtype),
        torch.tensor(train_y),
        torch.tensor(val, dtype=dtype),
        k=7,
        weighted=weighted,
        metric=metric,
        chunk_size=50,
    )
    assert got.shape == (len(val), 4)
    np.testing.assert_allclose(got.double().numpy(), sk.predict_proba(val), atol=1e-5)


def test_exclude_self_is_leave_one_out(data):
    train, train_y, _, _ = data
    sk = KNeighborsClassifier(n_neighbors=6, weights="distance").fit(train, train_y)
    # scikit-learn's leave-one-out: query the training set and drop each point's own hit.
    dist, idx = sk.kneighbors(train, n_neighbors=6)
    assert (idx[:, 0] == np.arange(len(train))).all()
    got = knn_predict_proba(train, train_y, train, k=5, metric="euclidean", exclude_self=True)
    weights = 1.0 / dist[:, 1:]
    expected = np.zeros((len(train), 4))
    np.add.at(expected, (np.arange(len(train))[:, None], train_y[idx[:, 1:]]), weights)
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_num_classes_pads_columns(data):
    train, train_y, val, _ = data
    got = knn_predict_proba(train, train_y, val, k=3, num_classes=6)
    assert got.shape == (len(val), 6)
    assert torch.all(got[:, 4:] == 0)
    np.testing.assert_allclose(got.sum(1).numpy(), 1.0, rtol=1e-12)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("score", ["accuracy", "balanced_accuracy"])
def test_auto_k_matches_sklearn_loop(data, weighted, score):
    train, train_y, val, val_y = data
    score_fn = accuracy_score if score == "accuracy" else balanced_accuracy_score
    ks = (1, 4, 9, 15, 40, 301, 500)
    expected = {}
    for k in ks[:-2]:
        sk = KNeighborsClassifier(n_neighbors=k, weights="distance" if weighted else "uniform")
        expected[k] = score_fn(val_y, sk.fit(train, train_y).predict(val))
    best_k, scores = knn_auto_k(
        torch.tensor(train), train_y, val, val_y, ks=ks, weighted=weighted, score=score
    )
    assert scores == pytest.approx(expected)  # ks beyond the 300 training items are skipped
    assert best_k == min(k for k in expected if expected[k] == max(expected.values()))


def test_auto_k_rejects_when_no_k_fits(data):
    train, train_y, val, val_y = data
    with pytest.raises(ValueError, match="no k"):
        knn_auto_k(train[:3], train_y[:3], val, val_y, ks=(5, 9))
