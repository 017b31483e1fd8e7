"""Test-time augmentation: four views of a batch (identity, horizontal flip, vertical flip, 90°).

Metric model: the views' embeddings are averaged and re-normalised to the unit sphere before
the KNN; baseline: the views' softmax probabilities are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from binensemble.config import TTA_VIEWS, BinEnsembleConfig


def tta_views(cfg: BinEnsembleConfig) -> list[str]:
    """The views of the configured test-time augmentation (identity only without TTA)."""
    return list(cfg.predict.views) if cfg.predict.tta else ["identity"]


def apply_view(name: str, x: torch.Tensor) -> torch.Tensor:
    """View ``name`` of images ``[b, c, h, w]`` (rot90 turns counter-clockwise)."""
    if name == "identity":
        return x
    if name == "hflip":
        return x.flip(-1)
    if name == "vflip":
        return x.flip(-2)
    if name == "rot90":
        return torch.rot90(x, 1, dims=(-2, -1))
    raise ValueError(f"unknown view {name!r} (choose from {', '.join(TTA_VIEWS)})")


def invert_view(name: str, x: torch.Tensor) -> torch.Tensor:
    """Undo :func:`apply_view` (maps a view back onto the original pixel grid)."""
    if name == "rot90":
        return torch.rot90(x, -1, dims=(-2, -1))
    return apply_view(name, x)  # identity and the flips are their own inverses


def tta_embed(model: nn.Module, x: torch.Tensor, views: Sequence[str] = TTA_VIEWS) -> torch.Tensor:
    """Mean of the views' embeddings, re-normalised: ``[b, e]``."""
    embs = torch.stack([model(apply_view(v, x)).float() for v in views])
    return F.normalize(embs.mean(0), dim=1)


def tta_probs(model: nn.Module, x: torch.Tensor, views: Sequence[str] = TTA_VIEWS) -> torch.Tensor:
    """Mean of the views' softmax probabilities: ``[b, c]``."""
    return torch.stack([model(apply_view(v, x)).float().softmax(1) for v in views]).mean(0)
