"""Landmark localisation errors.

Shape notation: ``n`` images, ``L`` landmarks per image; coordinates are ``[n, L, 2]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medcore.metrics.classification import to_numpy

__all__ = ["landmark_errors"]


def landmark_errors(
    pred: Any,
    target: Any,
    scale: float = 1.0,
    thresholds: Sequence[float] = (5.0, 8.5, 10.0, 15.0),
    percentiles: Sequence[float] = (25, 50, 75, 90, 95),
) -> dict[str, Any]:
    """Summary of the Euclidean distances between predicted and target landmarks.

    The distance of each landmark is multiplied by ``scale`` (e.g. 224 to express normalised
    coordinates in pixels of a 224-pixel image). ``mean``, ``median``, ``std`` (population,
    ``ddof=0``), ``max`` and the percentiles ``p{q}`` (e.g. ``p90``) are over all ``n * L``
    landmark errors. ``per_landmark_mean`` (length ``L``) averages each landmark over images and
    ``per_image_mean`` (length ``n``) each image over its landmarks. ``under_{t}px`` (e.g.
    ``under_8.5px``) is the share of IMAGES whose mean landmark error is below ``t`` (strictly),
    not the share of individual landmarks.
    """
    pred, target = to_numpy(pred).astype(float), to_numpy(target).astype(float)
    if pred.shape != target.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(
            f"pred and target must both be [n, L, 2], got {pred.shape} and {target.shape}"
        )
    errors = np.linalg.norm(pred - target, axis=-1) * scale
    per_image = errors.mean(1)
    out: dict[str, Any] = {
        "mean": float(errors.mean()),
        "median": float(np.median(errors)),
        "std": float(errors.std()),
        "max": float(errors.max()),
    }
    for q, value in zip(percentiles, np.percentile(errors, percentiles), strict=True):
        out[f"p{q:g}"] = float(value)
    out["per_landmark_mean"] = errors.mean(0).tolist()
    out["per_image_mean"] = per_image.tolist()
    for t in thresholds:
        out[f"under_{t:g}px"] = float(np.mean(per_image < t))
    return out
