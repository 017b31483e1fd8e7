"""Landmark figures: annotated image grids (truth vs prediction) and per-landmark error bars."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from cxrlandmarks.anatomy import LANDMARK_NAMES
from medcore.io import load_image
from medcore.report.plots import save_figure


def draw_landmarks(
    ax: plt.Axes, image: np.ndarray, pred: np.ndarray | None, truth: np.ndarray | None = None
) -> None:
    """Image with truth (green circles), prediction (red crosses) and the error as a yellow line.

    Coordinates are in the package's pixel-edge convention; the image is placed so that its
    pixel ``i`` covers ``[i, i + 1)`` as well (imshow would centre it on ``i``).
    """
    height, width = image.shape[:2]
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, extent=(0, width, height, 0))
    if truth is not None and pred is not None:
        for (tx, ty), (px, py) in zip(truth, pred, strict=True):
            ax.plot([tx, px], [ty, py], color="yellow", lw=0.6)
    if truth is not None:
        ax.scatter(
            truth[:, 0], truth[:, 1], s=14, facecolors="none", edgecolors="lime", linewidths=0.9
        )
    if pred is not None:
        ax.scatter(pred[:, 0], pred[:, 1], s=14, c="red", marker="x", linewidths=0.9)
        for i, (x, y) in enumerate(pred):
            ax.text(x + 3, y - 3, str(i), color="cyan", fontsize=5)
    ax.set_axis_off()


def plot_landmark_grid(
    records: Sequence, pred_px: np.ndarray, path: str | Path, cols: int = 4
) -> Path:
    """A grid of images with truth and prediction, titled with name, category and mean error."""
    n = max(1, len(records))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax, rec, pred in zip(axes.flat, records, pred_px, strict=False):
        err = np.linalg.norm(pred - rec.coords, axis=-1).mean()
        draw_landmarks(ax, load_image(rec.path, "L"), pred, rec.coords)
        ax.set_title(f"{rec.name} ({rec.category})\n{err:.1f} px (original)", fontsize=7)
    for ax in list(axes.flat)[len(records) :]:
        ax.axis("off")
    fig.suptitle("green o: truth, red x: prediction", fontsize=8)
    return save_figure(fig, path)


def plot_per_landmark(errors_px: np.ndarray, path: str | Path) -> Path:
    """Box plot of the error of each landmark (px at 224) with the clinical 8.5 px line."""
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.boxplot([errors_px[:, i] for i in range(errors_px.shape[1])], showfliers=False)
    ax.set_xticks(
        range(1, len(LANDMARK_NAMES) + 1),
        [f"{i}:{n}" for i, n in enumerate(LANDMARK_NAMES)],
        rotation=60,
        ha="right",
        fontsize=7,
    )
    ax.axhline(8.5, color="red", ls="--", lw=0.8, label="8.5 px")
    ax.set_ylabel("error (px at 224)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)
