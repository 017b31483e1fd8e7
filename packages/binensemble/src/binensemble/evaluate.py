"""Embedding / probability extraction, KNN with automatic k, and the per-epoch validation.

Shape notation: ``n`` images, ``e`` embedding size, ``c`` classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from binensemble.config import DataConfig, KnnConfig
from binensemble.data import ImageDataset, ImageSet, eval_transform
from binensemble.ensemble import decide
from binensemble.model import MetricModel
from binensemble.tta import tta_embed, tta_probs
from medcore.engine.inference import PredictOptions, predict
from medcore.engine.task import EvalContext
from medcore.io import atomic_path
from medcore.metrics import binary_metrics, knn_auto_k, knn_predict_proba, roc_auc
from medcore.runtime.device import AmpPolicy


def extract(
    model: nn.Module,
    images: ImageSet,
    data_cfg: DataConfig,
    device: torch.device,
    precision: AmpPolicy | None,
    num_workers: int | None,
    views: Sequence[str] = ("identity",),
    desc: str | None = None,
    shard: bool = True,
) -> torch.Tensor:
    """Per image, in set order: TTA embeddings ``[n, e]`` (metric) or probabilities ``[n, c]``.

    medcore's inference loop over the decoded store (centre crops); ``shard``: under DDP each
    rank predicts its part and every rank gets all (every rank must call it), else this
    process alone predicts everything.
    """
    fn = tta_embed if isinstance(model, MetricModel) else tta_probs
    out = predict(
        model,
        ImageDataset(images, eval_transform(data_cfg)),
        lambda m, batch: fn(m, batch["image"], views),
        PredictOptions(device, precision, data_cfg.eval_batch_size, num_workers, shard, desc),
    )
    assert isinstance(out, torch.Tensor)
    return out


@dataclass
class KnnResult:
    k: int
    scores: dict[int, float]
    val_probs: torch.Tensor  # [n_val, c] at the chosen k


def knn_select(
    train_emb: torch.Tensor,
    train_y: np.ndarray,
    val_emb: torch.Tensor,
    val_y: np.ndarray,
    cfg: KnnConfig,
    num_classes: int = 2,
) -> KnnResult:
    """The k of ``cfg.ks`` with the best validation accuracy (distance-weighted votes)."""
    k, scores = knn_auto_k(
        train_emb, train_y, val_emb, val_y, ks=cfg.ks, weighted=cfg.weighted, metric=cfg.metric
    )
    probs = knn_predict_proba(
        train_emb,
        train_y,
        val_emb,
        k,
        weighted=cfg.weighted,
        num_classes=num_classes,
        metric=cfg.metric,
    )
    return KnnResult(k, scores, probs)


def summarise(
    y_true: np.ndarray, probs: torch.Tensor | np.ndarray, prefix: str = "val/"
) -> dict[str, float]:
    """Accuracy, balanced accuracy, F1, sensitivity, specificity, ROC AUC of P(disease)."""
    p = np.asarray(probs, dtype=float)
    # The package's one decision rule (arg-max, ties to normal) gives the labels; the written
    # CSV labels are these, so the metrics score exactly what was written.
    metrics = binary_metrics(y_true, decide(p).astype(float), threshold=0.5)
    keep = ("accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity")
    return {
        **{f"{prefix}{k}": float(metrics[k]) for k in keep},
        f"{prefix}roc_auc": float(roc_auc(y_true, p[:, 1])),
    }


def save_heldout(folder: Path, epoch: int, probs: dict[str, np.ndarray]) -> Path:
    """One evaluation's held-out probabilities (``k<k>`` or ``probs`` -> ``[n, c]``), atomically.

    Cross-validated selection reads them back per epoch, so they survive an interrupted fold.
    """
    path = folder / f"epoch{epoch:03d}.npz"
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **probs)
    return path


def load_heldout(folder: Path) -> dict[int, dict[str, np.ndarray]]:
    """``{epoch: {key: probs}}`` of every evaluation :func:`save_heldout` wrote in ``folder``."""
    out = {}
    for path in sorted(folder.glob("epoch*.npz")):
        with np.load(path) as data:
            out[int(path.stem.removeprefix("epoch"))] = {k: data[k] for k in data.files}
    return out


def metric_evaluator(
    train_set: ImageSet,
    val_set: ImageSet,
    data_cfg: DataConfig,
    cfg: KnnConfig,
    num_workers: int | None,
    heldout_dir: Path | None = None,
) -> Callable[[nn.Module, EvalContext], dict[str, float]]:
    """Per-epoch validation of the metric model: embed train and val (sharded under DDP), KNN
    with auto-k. With ``heldout_dir`` the validation probabilities of every k are kept per epoch.
    """
    assert train_set.labels is not None and val_set.labels is not None
    train_y, val_y = train_set.labels, val_set.labels

    def evaluate(model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        train_emb = extract(model, train_set, data_cfg, ctx.device, ctx.amp, num_workers)
        val_emb = extract(model, val_set, data_cfg, ctx.device, ctx.amp, num_workers)
        result = knn_select(train_emb, train_y, val_emb, val_y, cfg)
        if heldout_dir is not None and ctx.is_main:  # every rank evaluates, one writes
            probs = {
                f"k{k}": knn_predict_proba(
                    train_emb,
                    train_y,
                    val_emb,
                    k,
                    weighted=cfg.weighted,
                    num_classes=2,
                    metric=cfg.metric,
                ).numpy()
                for k in result.scores
            }
            save_heldout(heldout_dir, ctx.epoch, probs)
        return {**summarise(val_y, result.val_probs), "val/k": float(result.k)}

    return evaluate


def baseline_evaluator(
    val_set: ImageSet,
    data_cfg: DataConfig,
    num_workers: int | None,
    heldout_dir: Path | None = None,
) -> Callable[[nn.Module, EvalContext], dict[str, float]]:
    """Per-epoch validation of the baseline (sharded under DDP): softmax probabilities and
    cross-entropy. With ``heldout_dir`` the validation probabilities are kept per epoch.
    """
    assert val_set.labels is not None
    val_y = val_set.labels

    def evaluate(model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        probs = extract(model, val_set, data_cfg, ctx.device, ctx.amp, num_workers)
        if heldout_dir is not None and ctx.is_main:
            save_heldout(heldout_dir, ctx.epoch, {"probs": probs.numpy()})
        nll = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), torch.as_tensor(val_y))
        return {**summarise(val_y, probs), "val/loss": float(nll)}

    return evaluate
