from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from binensemble.config import KnnConfig
from binensemble.evaluate import knn_select


@pytest.mark.parametrize("seed", [0, 7])
def test_knn_search_matches_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    train_y = rng.integers(0, 2, 80)
    val_y = rng.integers(0, 2, 40)
    # Overlapping classes so that different k really give different accuracies.
    train = rng.normal(size=(80, 6)) + 0.6 * train_y[:, None]
    val = rng.normal(size=(40, 6)) + 0.6 * val_y[:, None]
    cfg = KnnConfig(ks=[5, 9, 15, 20, 25, 30, 40, 50], weighted=True, metric="euclidean")
    result = knn_select(train, train_y, val, val_y, cfg)
    expected = {}
    for k in cfg.ks:
        clf = KNeighborsClassifier(n_neighbors=k, weights="distance").fit(train, train_y)
        expected[k] = float((clf.predict(val) == val_y).mean())
        assert result.scores[k] == pytest.approx(expected[k]), k
    best = max(expected.values())
    assert result.k == min(k for k, v in expected.items() if v == best)  # ties: the smallest k
    clf = KNeighborsClassifier(n_neighbors=result.k, weights="distance").fit(train, train_y)
    np.testing.assert_allclose(result.val_probs.numpy(), clf.predict_proba(val), atol=1e-5)


def test_k_larger_than_the_gallery_is_skipped() -> None:
    rng = np.random.default_rng(0)
    train_y = np.array([0, 1] * 6)
    result = knn_select(
        rng.normal(size=(12, 3)),
        train_y,
        rng.normal(size=(5, 3)),
        np.array([0, 1, 0, 1, 0]),
        KnnConfig(ks=[5, 9, 15, 20]),
    )
    assert set(result.scores) == {5, 9}
