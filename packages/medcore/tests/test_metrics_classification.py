"""Classification metrics against scikit-learn, plus bootstrap and threshold selection."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from medcore.metrics import (
    average_precision,
    binary_metrics,
    bootstrap_ci,
    metrics_with_ci,
    multiclass_metrics,
    multilabel_f1,
    roc_auc,
    roc_auc_per_class,
    select_threshold,
)


@pytest.fixture(scope="module")
def binary():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=500)
    # Rounded so that tied scores occur and their handling is exercised.
    score = np.round(np.clip(0.3 * y + rng.normal(0.35, 0.25, size=500), 0, 1), 2)
    return y, score


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_binary_metrics_match_sklearn(binary, threshold):
    y, score = binary
    pred = score >= threshold
    got = binary_metrics(torch.tensor(y), torch.tensor(score), threshold=threshold)
    expected = {
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "precision": skm.precision_score(y, pred, zero_division=0),
        "recall": skm.recall_score(y, pred),
        "sensitivity": skm.recall_score(y, pred),
        "specificity": skm.recall_score(y, pred, pos_label=0),
        "f1": skm.f1_score(y, pred, zero_division=0),
        "roc_auc": skm.roc_auc_score(y, score),
        "pr_auc": skm.average_precision_score(y, score),
    }
    assert got == pytest.approx(expected, abs=1e-12)


def test_single_class_auc_is_nan_with_warning():
    with pytest.warns(UserWarning, match="one class"):
        got = binary_metrics(np.ones(5, dtype=int), np.linspace(0, 1, 5))
    assert math.isnan(got["roc_auc"])
    assert got["pr_auc"] == pytest.approx(1.0)
    with pytest.warns(UserWarning, match="without positives"):
        assert math.isnan(average_precision(np.zeros(4), np.arange(4)))


def test_nothing_predicted_positive_gives_zero_precision(binary):
    y, score = binary
    got = binary_metrics(y, score, threshold=2.0)
    assert got["precision"] == 0.0
    assert got["f1"] == 0.0
    assert got["specificity"] == 1.0


def test_multilabel_f1_matches_sklearn():
    rng = np.random.default_rng(1)
    y = (rng.random((200, 6)) < 0.3).astype(int)
    pred = np.where(rng.random((200, 6)) < 0.8, y, 1 - y)
    y[:, 5] = 0  # a class without positives
    pred[:, 4] = 0  # a class never predicted
    got = multilabel_f1(torch.tensor(y), pred)
    for average in ("micro", "macro", "weighted"):
        expected = skm.f1_score(y, pred, average=average, zero_division=0)
        assert got[f"{average}_f1"] == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(
        got["per_class_f1"], skm.f1_score(y, pred, average=None, zero_division=0)
    )


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, size=300)
    logits = rng.normal(size=(300, 5)) + 1.5 * np.eye(5)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs[:, 4] = 0.0  # class 4 is neither present nor predicted
    pred = probs.argmax(1)
    got = multiclass_metrics(y, torch.tensor(probs))
    labels = list(range(5))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert got["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    np.testing.assert_allclose(
        got["precision"], skm.precision_score(y, pred, labels=labels, average=None, zero_division=0)
    )
    np.testing.assert_allclose(
        got["recall"], skm.recall_score(y, pred, labels=labels, average=None, zero_division=0)
    )
    assert got["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    one_vs_rest = [skm.roc_auc_score(y == j, probs[:, j]) for j in range(4)]
    assert got["roc_auc_ovr"] == pytest.approx(np.mean(one_vs_rest))


def test_roc_auc_per_class_matches_sklearn_and_flags_constant_columns():
    rng = np.random.default_rng(3)
    y = (rng.random((100, 4)) < 0.4).astype(int)
    score = rng.random((100, 4)) + 0.3 * y
    y[:, 2] = 1
    with pytest.warns(UserWarning, match=r"\[2\]"):
        got = roc_auc_per_class(y, torch.tensor(score))
    for j in (0, 1, 3):
        assert got[j] == pytest.approx(skm.roc_auc_score(y[:, j], score[:, j]))
    assert math.isnan(got[2])


def test_bootstrap_ci_matches_a_plain_sklearn_loop(binary):
    y, score = binary
    low, high = bootstrap_ci(roc_auc, y, torch.tensor(score), n_boot=100, alpha=0.1, seed=7)
    rng = np.random.default_rng(7)
    values = []
    for _ in range(100):
        idx = rng.integers(0, len(y), len(y))
        values.append(skm.roc_auc_score(y[idx], score[idx]))
    assert (low, high) == pytest.approx(tuple(np.percentile(values, [5, 95])))
    assert low < skm.roc_auc_score(y, score) < high


def test_bootstrap_skips_nan_resamples():
    y = np.array([1] + [0] * 9)
    score = np.linspace(0, 1, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low, high = bootstrap_ci(roc_auc, y, score, n_boot=200, seed=0)
    # Many resamples miss the single positive; the others all rank it last (AUC 0).
    assert (low, high) == (0.0, 0.0)


def test_metrics_with_ci(binary):
    y, score = binary
    got = metrics_with_ci(y, score, threshold=0.5, n_boot=300, seed=1)
    assert set(got) == {"auc", "f1", "precision", "recall", "accuracy"}
    pred = score >= 0.5
    assert got["auc"]["value"] == pytest.approx(skm.roc_auc_score(y, score))
    assert got["f1"]["value"] == pytest.approx(skm.f1_score(y, pred))
    assert got["precision"]["value"] == pytest.approx(skm.precision_score(y, pred))
    assert got["recall"]["value"] == pytest.approx(skm.recall_score(y, pred))
    assert got["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y, pred))
    for name, entry in got.items():
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"], name

    def f1(t: np.ndarray, s: np.ndarray) -> float:
        tp = np.sum((t == 1) & (s >= 0.5))
        return 2 * tp / (np.sum(t == 1) + np.sum(s >= 0.5))

    # Same resamples as a single-metric bootstrap with the same seed.
    assert got["f1"]["ci_low"] == pytest.approx(bootstrap_ci(f1, y, score, n_boot=300, seed=1)[0])


def test_select_threshold_by_hand():
    y = np.array([0, 0, 1, 0, 1, 1])
    score = np.array([0.1, 0.3, 0.4, 0.6, 0.7, 0.9])
    # At >= 0.4: TPR 1, FPR 1/3, J = 2/3 (best); at >= 0.7: TPR 2/3, FPR 0, J = 2/3 as well,
    # and the higher threshold wins the tie.
    assert select_threshold(y, score, "youden") == 0.7
    # F1: >= 0.4 gives 2*3/(2*3+1) = 6/7, >= 0.7 gives 0.8, >= 0.9 gives 0.5.
    assert select_threshold(y, score, "f1") == 0.4


def test_select_threshold_matches_sklearn_curves(binary):
    y, score = binary
    fpr, tpr, thresholds = skm.roc_curve(y, score, drop_intermediate=False)
    chosen = thresholds == select_threshold(y, score, "youden")
    assert (tpr - fpr)[chosen].item() == pytest.approx(np.max(tpr - fpr), abs=1e-12)
    precision, recall, pr_thresholds = skm.precision_recall_curve(y, score)
    f1 = 2 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1])
    chosen = pr_thresholds == select_threshold(y, score, "f1")
    assert f1[chosen].item() == pytest.approx(np.nanmax(f1), abs=1e-12)


def test_select_threshold_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        select_threshold(np.ones(3), np.arange(3))
