"""Evaluation metrics: retrieval, classification, landmarks, kNN probes and batch accumulation."""

from medcore.metrics.accumulate import MetricAccumulator
from medcore.metrics.classification import (
    average_precision,
    binary_metrics,
    bootstrap_ci,
    metrics_with_ci,
    multiclass_metrics,
    multilabel_f1,
    roc_auc,
    roc_auc_per_class,
    select_threshold,
    to_numpy,
)
from medcore.metrics.knn import knn_auto_k, knn_predict_proba
from medcore.metrics.landmarks import landmark_errors
from medcore.metrics.retrieval import compute_relevance, random_baseline, retrieval_metrics

__all__ = [
    "MetricAccumulator",
    "average_precision",
    "binary_metrics",
    "bootstrap_ci",
    "compute_relevance",
    "knn_auto_k",
    "knn_predict_proba",
    "landmark_errors",
    "metrics_with_ci",
    "multiclass_metrics",
    "multilabel_f1",
    "random_baseline",
    "retrieval_metrics",
    "roc_auc",
    "roc_auc_per_class",
    "select_threshold",
    "to_numpy",
]
