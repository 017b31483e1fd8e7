"""Figures every package writes: ROC curves, confusion matrices, training curves (PNG, atomic)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and CI without a display
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve

from medcore.io import atomic_path


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 120) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def plot_roc_curves(
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    path: str | Path,
    title: str = "ROC",
) -> Path:
    """One ROC curve per entry ``name -> (y_true, y_score)``, with its AUC in the legend."""
    from sklearn.metrics import roc_auc_score

    n = len(curves)
    cols = min(n, 6) or 1
    rows = max(1, int(np.ceil(n / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, (y_true, y_score)) in zip(axes.flat, curves.items(), strict=False):
        y_true = np.asarray(y_true)
        if len(np.unique(y_true)) < 2:
            ax.text(0.5, 0.5, "one class only", ha="center", va="center")
        else:
            fpr, tpr, _ = roc_curve(y_true, y_score)
            ax.plot(fpr, tpr, lw=1.5, label=f"AUC {roc_auc_score(y_true, y_score):.3f}")
            ax.legend(loc="lower right", fontsize=7)
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("FPR", fontsize=7)
        ax.set_ylabel("TPR", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    cm = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1.0 + 0.6 * len(labels)))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(
            j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black"
        )
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_training_curves(
    history: Sequence[Mapping[str, float]], keys: Sequence[str], path: str | Path, x: str = "epoch"
) -> Path:
    """Lines of ``keys`` over ``x`` from a list of per-evaluation records."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        pts = [(r[x], r[key]) for r in history if key in r and x in r]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", ms=3, label=key)
    ax.set_xlabel(x)
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
