"""Landmark predictions of one or several models (flip TTA), through medcore's inference loop.

Shared by training (validation), ``cxrlandmarks-eval`` and ``cxrlandmarks-predict``; kept apart
from train.py and evaluate.py so neither needs the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from cxrlandmarks.anatomy import flip_coords
from medcore.engine.inference import PredictOptions, predict

REFERENCE_SIZE = 224  # "px at 224": ||pred - target|| x 224 on normalised coordinates


@torch.no_grad()
def predict_batches(
    models: Sequence[nn.Module], images: torch.Tensor, tta_flip: bool = False
) -> torch.Tensor:
    """Mean prediction ``[b, 15, 2]`` of ``models``; with ``tta_flip`` each model also sees the
    mirrored image, whose prediction is flipped back (x mirrored, pairs swapped) before averaging."""
    outs = []
    for model in models:
        pred = model(images).float()
        outs.append(pred.reshape(pred.shape[0], -1, 2))
        if tta_flip:
            flipped = model(torch.flip(images, dims=[-1])).float()
            outs.append(flip_coords(flipped.reshape(pred.shape[0], -1, 2)))
    return torch.stack(outs).mean(0)


def predict_dataset(
    models: Sequence[nn.Module],
    dataset: Dataset,
    options: PredictOptions,
    tta_flip: bool = False,
) -> np.ndarray:
    """Normalised predictions ``[n, 15, 2]`` in dataset order. Under DDP with ``shard`` (every
    rank calls it) each rank predicts its shard and gets all of them; ``shard=False``: this
    rank predicts everything alone (see :func:`medcore.engine.inference.predict`)."""
    ensemble = nn.ModuleList(models)  # one module: predict() switches all of them to eval

    def forward(net: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return predict_batches(list(net), batch["image"], tta_flip)

    out = predict(
        ensemble,
        dataset,
        forward,
        options,
    )
    return out.numpy()
