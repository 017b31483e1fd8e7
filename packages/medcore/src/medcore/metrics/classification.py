"""Classification metrics, threshold selection and bootstrap confidence intervals.

Shape notation: ``n`` samples, ``c`` classes (or label columns for multi-label tasks).

Inputs may be numpy arrays, torch tensors or sequences. Binary labels are 0/1 (or booleans), and
scores are any real values where higher means "more positive"; predictions from scores use
``score >= threshold``. Ratios with an empty denominator (precision without positive predictions,
F1 of a class that is neither present nor predicted, ...) are 0, like scikit-learn's
``zero_division=0``. ROC AUC needs both classes and average precision needs a positive: without
them they are NaN and a warning is issued.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "average_precision",
    "binary_metrics",
    "bootstrap_ci",
    "metrics_with_ci",
    "multiclass_metrics",
    "multilabel_f1",
    "roc_auc",
    "roc_auc_per_class",
    "select_threshold",
    "to_numpy",
]

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def to_numpy(x: Any) -> np.ndarray:
    """The input as a numpy array (torch tensors are detached and moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _binary_labels(y_true: Any) -> np.ndarray:
    """0/1 labels as a boolean array, rejecting anything else."""
    y = to_numpy(y_true)
    if y.dtype == bool:
        return y
    if not np.isin(y, (0, 1)).all():
        raise ValueError("binary labels must be 0/1")
    return y.astype(bool)


def _binary_inputs(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray]:
    """Boolean labels and float scores, checked to be 1-D and of equal length."""
    y, score = _binary_labels(y_true), to_numpy(y_score).astype(float)
    if y.ndim != 1 or y.shape != score.shape:
        raise ValueError(
            f"expected 1-D labels and scores of one length, got {y.shape}, {score.shape}"
        )
    return y, score


def _safe_div(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """``num / den`` with 0 wherever ``den`` is 0."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds in descending order with true and false positives at each.

    ``tps[i]`` / ``fps[i]`` count the positives / negatives with ``score >= thresholds[i]``, the
    points of scikit-learn's ROC and precision-recall curves.
    """
    order = np.argsort(-score, kind="stable")
    score, y = score[order], y[order]
    # Last position of every run of tied scores.
    last = np.r_[np.flatnonzero(np.diff(score)), score.size - 1]
    tps = np.cumsum(y)[last]
    return score[last], tps, last + 1 - tps


def roc_auc(y_true: Any, y_score: Any) -> float:
    """Area under the ROC curve (ties count one half); NaN with a warning for a single class."""
    y, score = _binary_inputs(y_true, y_score)
    num_pos = int(y.sum())
    num_neg = y.size - num_pos
    if num_pos == 0 or num_neg == 0:
        warnings.warn("ROC AUC is undefined when y_true has one class; returning NaN", stacklevel=2)
        return float("nan")
    _, tps, fps = _curve(y, score)
    # Trapezoids between consecutive curve points, starting from (0, 0).
    tpr = np.r_[0, tps] / num_pos
    fpr = np.r_[0, fps] / num_neg
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(y_true: Any, y_score: Any) -> float:
    """Average precision (area under the step precision-recall curve, as scikit-learn).

    NaN with a warning when ``y_true`` has no positive.
    """
    y, score = _binary_inputs(y_true, y_score)
    if not y.any():
        warnings.warn(
            "average precision is undefined without positives; returning NaN", stacklevel=2
        )
        return float("nan")
    _, tps, fps = _curve(y, score)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0, recall]) * precision))


def _counts(y: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    """True positives, false positives, true negatives and false negatives."""
    tp = int(np.sum(y & pred))
    fp = int(np.sum(~y & pred))
    fn = int(np.sum(y & ~pred))
    return tp, fp, y.size - tp - fp - fn, fn


def _accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(y == pred))


def _precision(y: np.ndarray, pred: np.ndarray) -> float:
    tp, fp, _, _ = _counts(y, pred)
    return float(_safe_div(tp, tp + fp))


def _recall(y: np.ndarray, pred: np.ndarray) -> float:
    tp, _, _, fn = _counts(y, pred)
    return float(_safe_div(tp, tp + fn))


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp, fp, _, fn = _counts(y, pred)
    return float(_safe_div(2 * tp, 2 * tp + fp + fn))


def binary_metrics(y_true: Any, y_score: Any, threshold: float = 0.5) -> dict[str, float]:
    """Threshold metrics at ``score >= threshold`` plus the threshold-free ROC AUC and PR AUC.

    ``balanced_accuracy`` is the mean of sensitivity and specificity over the classes present in
    ``y_true``; ``pr_auc`` is the average precision; ``recall`` and ``sensitivity`` are the same
    number under both names.
    """
    y, score = _binary_inputs(y_true, y_score)
    pred = score >= threshold
    tp, fp, tn, fn = _counts(y, pred)
    sensitivity = float(_safe_div(tp, tp + fn))
    specificity = float(_safe_div(tn, tn + fp))
    present = [r for r, support in ((sensitivity, tp + fn), (specificity, tn + fp)) if support]
    return {
        "accuracy": (tp + tn) / y.size,
        "balanced_accuracy": float(np.mean(present)),
        "precision": float(_safe_div(tp, tp + fp)),
        "recall": sensitivity,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "f1": float(_safe_div(2 * tp, 2 * tp + fp + fn)),
        "roc_auc": roc_auc(y, score),
        "pr_auc": average_precision(y, score),
    }


def multilabel_f1(y_true: Any, y_pred: Any) -> dict[str, Any]:
    """Micro, macro and support-weighted F1 of multi-label predictions ``[n, c]``, and per class.

    ``y_pred`` holds 0/1 decisions. Micro pools the counts of all classes; macro averages the
    per-class F1 over all ``c`` classes; weighted averages them by the number of positives.
    """
    y, pred = _binary_labels(y_true), _binary_labels(y_pred)
    if y.ndim != 2 or y.shape != pred.shape:
        raise ValueError(f"expected two [n, c] arrays, got shapes {y.shape} and {pred.shape}")
    tp = np.sum(y & pred, axis=0)
    fp = np.sum(~y & pred, axis=0)
    fn = np.sum(y & ~pred, axis=0)
    per_class = _safe_div(2 * tp, 2 * tp + fp + fn)
    support = tp + fn
    return {
        "micro_f1": float(_safe_div(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())),
        "macro_f1": float(per_class.mean()),
        "weighted_f1": float(_safe_div(np.sum(per_class * support), support.sum())),
        "per_class_f1": per_class.tolist(),
    }


def roc_auc_per_class(y_true: Any, y_score: Any) -> np.ndarray:
    """ROC AUC of each column of ``[n, c]`` labels and scores.

    NaN, with one warning naming them, for columns whose labels have a single class.
    """
    y, score = _binary_labels(y_true), to_numpy(y_score).astype(float)
    if y.ndim != 2 or y.shape != score.shape:
        raise ValueError(f"expected two [n, c] arrays, got shapes {y.shape} and {score.shape}")
    num_pos = y.sum(0)
    defined = (num_pos > 0) & (num_pos < y.shape[0])
    aucs = np.full(y.shape[1], np.nan)
    for j in np.flatnonzero(defined):
        aucs[j] = roc_auc(y[:, j], score[:, j])
    if not defined.all():
        warnings.warn(
            f"ROC AUC is NaN for classes {np.flatnonzero(~defined).tolist()} (one class only)",
            stacklevel=2,
        )
    return aucs


def multiclass_metrics(y_true: Any, probs: Any) -> dict[str, Any]:
    """Metrics of arg-max predictions from class probabilities ``[n, c]`` and integer labels.

    ``macro_f1`` and ``weighted_f1`` average over the classes that occur in ``y_true`` or in the
    predictions, and ``balanced_accuracy`` is the mean recall over classes in ``y_true`` (all as
    scikit-learn's defaults). ``precision``/``recall`` are per-class lists of length ``c``.
    ``roc_auc_ovr`` is the mean one-vs-rest ROC AUC over classes present in ``y_true`` (the
    MedMNIST AUC). ``confusion_matrix[i][j]`` counts samples of class ``i`` predicted as ``j``.
    """
    y, p = to_numpy(y_true).astype(np.int64), to_numpy(probs).astype(float)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"expected labels [n] and probabilities [n, c], got {y.shape}, {p.shape}")
    num_classes = p.shape[1]
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"labels must be class ids in [0, {num_classes}), got {y.min()}..{y.max()}"
        )
    pred = p.argmax(1)
    confusion = np.bincount(y * num_classes + pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )
    tp = np.diag(confusion)
    support = confusion.sum(1)
    predicted = confusion.sum(0)
    f1 = _safe_div(2 * tp, support + predicted)
    seen = (support + predicted) > 0
    present = support > 0
    if present.sum() > 1:
        roc_auc_ovr = float(np.mean([roc_auc(y == j, p[:, j]) for j in np.flatnonzero(present)]))
    else:
        warnings.warn(
            "one-vs-rest ROC AUC needs two classes in y_true; returning NaN", stacklevel=2
        )
        roc_auc_ovr = float("nan")
    return {
        "accuracy": float(tp.sum() / y.size),
        "balanced_accuracy": float(np.mean(tp[present] / support[present])),
        "macro_f1": float(f1[seen].mean()),
        "weighted_f1": float(_safe_div(np.sum(f1 * support), support.sum())),
        "precision": _safe_div(tp, predicted).tolist(),
        "recall": _safe_div(tp, support).tolist(),
        "roc_auc_ovr": roc_auc_ovr,
        "confusion_matrix": confusion.tolist(),
    }


def _bootstrap(
    metric_fns: Mapping[str, MetricFn],
    y_true: np.ndarray,
    y_score: np.ndarray,
    n_boot: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Each metric on ``n_boot`` resamples of the rows (the same resamples for all metrics)."""
    rng = np.random.default_rng(seed)
    values = {name: np.empty(n_boot) for name in metric_fns}
    with warnings.catch_warnings():
        # Single-class resamples are expected; they come back as NaN and are skipped.
        warnings.simplefilter("ignore")
        for b in range(n_boot):
            idx = rng.integers(0, y_true.shape[0], y_true.shape[0])
            y, s = y_true[idx], y_score[idx]
            for name, fn in metric_fns.items():
                values[name][b] = fn(y, s)
    return values


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    """Percentile interval of the finite bootstrap values; NaNs if there are none."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        warnings.warn("every bootstrap resample gave NaN; interval is NaN", stacklevel=3)
        return float("nan"), float("nan")
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def bootstrap_ci(
    metric_fn: MetricFn,
    y_true: Any,
    y_score: Any,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` confidence interval of ``metric_fn(y_true, y_score)``.

    Rows (samples) are resampled with replacement; resamples on which the metric is NaN (e.g.
    a single class for ROC AUC) are skipped. The module's :func:`roc_auc` and
    :func:`average_precision` are plain numpy and fast enough for thousands of resamples.
    """
    values = _bootstrap({"metric": metric_fn}, to_numpy(y_true), to_numpy(y_score), n_boot, seed)
    return _percentile_interval(values["metric"], alpha)


def metrics_with_ci(
    y_true: Any,
    y_score: Any,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, dict[str, float]]:
    """AUC, F1, precision, recall and accuracy of binary scores, each with a bootstrap interval.

    Returns ``{name: {"value", "ci_low", "ci_high"}}`` for ``auc``, ``f1``, ``precision``,
    ``recall`` and ``accuracy``; threshold metrics use ``score >= threshold``. All intervals come
    from the same resamples (see :func:`bootstrap_ci`).
    """
    y, score = _binary_inputs(y_true, y_score)
    decision_fns: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "f1": _f1,
        "precision": _precision,
        "recall": _recall,
        "accuracy": _accuracy,
    }
    metric_fns: dict[str, MetricFn] = {"auc": roc_auc}
    for name, fn in decision_fns.items():
        metric_fns[name] = lambda yy, ss, fn=fn: fn(yy, ss >= threshold)
    boot = _bootstrap(metric_fns, y, score, n_boot, seed)
    out = {}
    for name, fn in metric_fns.items():
        low, high = _percentile_interval(boot[name], alpha)
        out[name] = {"value": fn(y, score), "ci_low": low, "ci_high": high}
    return out


def select_threshold(
    y_true: Any, y_score: Any, method: Literal["youden", "f1"] = "youden"
) -> float:
    """Decision threshold maximising Youden's J or F1 on (validation) data, to apply elsewhere.

    Candidates are the distinct scores, with predictions ``score >= threshold`` as in
    scikit-learn's ``roc_curve`` / ``precision_recall_curve``. Youden's ``J = TPR - FPR``; F1 is
    taken along the precision-recall curve. Ties go to the highest threshold.
    """
    y, score = _binary_inputs(y_true, y_score)
    num_pos = int(y.sum())
    if num_pos == 0 or num_pos == y.size:
        raise ValueError("threshold selection needs both classes in y_true")
    thresholds, tps, fps = _curve(y, score)
    if method == "youden":
        objective = tps / num_pos - fps / (y.size - num_pos)
    elif method == "f1":
        objective = 2 * tps / (tps + fps + num_pos)
    else:
        raise ValueError(f"method must be 'youden' or 'f1', got {method!r}")
    # The first (highest) threshold among ties; the tolerance keeps rounding from breaking them.
    best = np.flatnonzero(objective >= objective.max() - 1e-12)[0]
    return float(thresholds[best])
