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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from binensemble.config import KnnConfig
from binensemble.data import ImageDataset, ImageSet
from binensemble.ensemble import decide
from binensemble.model import MetricModel
from binensemble.tta import tta_embed, tta_probs
from medcore.device import AmpPolicy, autocast
from medcore.io import atomic_path
from medcore.metrics import binary_metrics, knn_auto_k, knn_predict_proba, roc_auc
from medcore.trainer import EvalContext, move_to_device


def images_loader(
    images: ImageSet, transform: Callable, batch_size: int, num_workers: int
) -> DataLoader:
    """Images in their set order (no shuffling), transformed for evaluation."""
    return DataLoader(
        ImageDataset(images, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )


@torch.no_grad()
def extract(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: AmpPolicy,
    views: Sequence[str] = ("identity",),
    desc: str | None = None,
) -> torch.Tensor:
    """Per image, in loader order: TTA embeddings ``[n, e]`` (metric) or probabilities ``[n, c]``."""
    was_training = model.training
    model.eval()
    fn = tta_embed if isinstance(model, MetricModel) else tta_probs
    out = []
    for batch in tqdm(loader, desc=desc, disable=desc is None, leave=False, dynamic_ncols=True):
        images = move_to_device(batch["image"], device)
        with autocast(device, amp):
            out.append(fn(model, images, views).float().cpu())
    model.train(was_training)
    return torch.cat(out)


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
    train_loader: DataLoader,
    train_y: np.ndarray,
    val_loader: DataLoader,
    val_y: np.ndarray,
    cfg: KnnConfig,
    heldout_dir: Path | None = None,
) -> Callable[[nn.Module, EvalContext], dict[str, float]]:
    """Per-epoch validation of the metric model: embed train and val, KNN with auto-k.

    With ``heldout_dir`` the validation probabilities of every k are kept per epoch.
    """

    def evaluate(model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        train_emb = extract(model, train_loader, ctx.device, ctx.amp)
        val_emb = extract(model, val_loader, ctx.device, ctx.amp)
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
    val_loader: DataLoader, val_y: np.ndarray, heldout_dir: Path | None = None
) -> Callable[[nn.Module, EvalContext], dict[str, float]]:
    """Per-epoch validation of the baseline: softmax probabilities and cross-entropy.

    With ``heldout_dir`` the validation probabilities are kept per epoch.
    """

    def evaluate(model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        probs = extract(model, val_loader, ctx.device, ctx.amp)
        if heldout_dir is not None and ctx.is_main:
            save_heldout(heldout_dir, ctx.epoch, {"probs": probs.numpy()})
        nll = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), torch.as_tensor(val_y))
        return {**summarise(val_y, probs), "val/loss": float(nll)}

    return evaluate
