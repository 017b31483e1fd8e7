"""Batch augmentation on the device with kornia: a small 3-D affine jitter and Gaussian noise."""

from __future__ import annotations

from typing import Any

import kornia.augmentation as K
import torch
from kornia.augmentation._3d.intensity.base import IntensityAugmentationBase3D
from torch import nn

from ctretrieval.config import AugmentConfig


class RandomGaussianNoise3D(IntensityAugmentationBase3D):
    """Add ``N(mean, std)`` noise to each selected volume of a ``[b, c, d, h, w]`` batch.

    kornia's RandomGaussianNoise is 2-D only (its parameter generator assumes ``[b, c, h, w]``);
    subclassing kornia's 3-D intensity base keeps the per-sample ``p`` gating and lets the noise
    sit in the same AugmentationSequential as RandomAffine3D.
    """

    SUBSTITUTE_SKIPPED_SAMPLES = True

    def __init__(
        self, mean: float = 0.0, std: float = 0.01, p: float = 0.5, keepdim: bool = False
    ) -> None:
        super().__init__(p=p, same_on_batch=False, keepdim=keepdim)
        self.mean, self.std = mean, std

    def compute_transformation(
        self, input: torch.Tensor, params: dict[str, Any], flags: dict[str, Any]
    ) -> torch.Tensor:
        return self.identity_matrix(input)

    def apply_transform(
        self,
        input: torch.Tensor,
        params: dict[str, Any],
        flags: dict[str, Any],
        transform: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return input + torch.randn_like(input) * self.std + self.mean


class VolumeAugmentation(nn.Module):
    """Augment a float batch ``[b, s, h, w]`` in ``[0, 1]`` (slices as depth); returns the same shape."""

    def __init__(self, cfg: AugmentConfig) -> None:
        super().__init__()
        self.pipeline = K.AugmentationSequential(
            K.RandomAffine3D(degrees=cfg.degrees, scale=tuple(cfg.scale), p=cfg.affine_p),
            RandomGaussianNoise3D(mean=0.0, std=cfg.noise_std, p=cfg.noise_p),
            data_keys=["input"],
        )

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        # Geometry in float32 even under autocast: grid sampling in half precision blurs edges.
        with torch.autocast(device_type=volume.device.type, enabled=False):
            out = self.pipeline(volume.float()[:, None])
        return out[:, 0]
