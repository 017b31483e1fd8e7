"""Landmark losses: Wing, symmetry, distance preservation and their composite.

Every loss takes normalised coordinates (``[b, 30]`` or ``[b, 15, 2]``, in [0, 1]) and works on
pixel-scale differences (``pixel_scale`` = 224 by default, the model's reference input size),
so that Wing's ``w`` and ``epsilon`` mean pixels as in the Wing loss paper and the composite's
weights balance terms of the same unit. Each component has unit weight; the weights of the
composite (0.3 symmetry, 0.2 distance) live only in :class:`CompleteLandmarkLoss`.

The components return a scalar; a training loss (what :func:`build_loss` returns) returns
``(total, terms)``: ``terms`` its unweighted components, detached and left on the device, so
that the trainer reads them at logging steps only (no host sync per micro-batch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from cxrlandmarks.anatomy import asymmetry, pair_distances
from cxrlandmarks.config import LossConfig


def as_points(coords: torch.Tensor) -> torch.Tensor:
    """``[b, 30]`` -> ``[b, 15, 2]`` (already-shaped input passes through)."""
    return coords if coords.ndim == 3 else coords.reshape(coords.shape[0], -1, 2)


class WingLoss(nn.Module):
    """Wing loss (Feng et al., CVPR 2018) on pixel differences, averaged over coordinates.

    ``w * ln(1 + |x| / epsilon)`` for ``|x| < w``, ``|x| - C`` otherwise, with
    ``C = w - w * ln(1 + w / epsilon)`` making the two pieces meet at ``|x| = w``.
    """

    def __init__(self, w: float = 10.0, epsilon: float = 2.0, pixel_scale: float = 224.0) -> None:
        super().__init__()
        self.w, self.epsilon, self.pixel_scale = w, epsilon, pixel_scale
        self.c = w - w * math.log(1 + w / epsilon)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = (pred.float() - target.float()).abs() * self.pixel_scale
        small = self.w * torch.log1p(x / self.epsilon)
        return torch.where(x < self.w, small, x - self.c).mean()


class SymmetryLoss(nn.Module):
    """Bilateral symmetry about the mediastinal axis (the line fitted through 0, 1, 8, 9, 10).

    Each right landmark is mirrored about the axis, at the axis' own angle, and compared with
    its left partner (:func:`cxrlandmarks.anatomy.asymmetry`, in the axis' frame).
    ``reference="prior"`` (default, the original's prior) asks the prediction to be symmetric;
    ``reference="target"`` asks it to have the ground truth's asymmetry instead (zero at a
    perfect prediction, for chests that are not symmetric). Mean absolute pixel residual over
    the 5 pairs and both axis components.
    """

    def __init__(self, pixel_scale: float = 224.0, reference: str = "prior") -> None:
        super().__init__()
        if reference not in ("target", "prior"):
            raise ValueError(f"reference must be 'prior' or 'target', got {reference!r}")
        self.pixel_scale, self.reference = pixel_scale, reference

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        asym = asymmetry(as_points(pred.float()) * self.pixel_scale)
        if self.reference == "target":
            asym = asym - asymmetry(as_points(target.float()) * self.pixel_scale)
        return asym.abs().mean()


class DistancePreservationLoss(nn.Module):
    """Mean absolute difference, in pixels, of the anatomically fixed distances (DISTANCE_PAIRS)."""

    def __init__(self, pixel_scale: float = 224.0) -> None:
        super().__init__()
        self.pixel_scale = pixel_scale

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # The epsilon keeps the square root differentiable if two predicted landmarks coincide.
        d_pred = pair_distances(as_points(pred.float()) * self.pixel_scale, eps=1e-8)
        d_true = pair_distances(as_points(target.float()) * self.pixel_scale)
        return (d_pred - d_true).abs().mean()


DEFAULT_WEIGHTS = {"wing": 1.0, "symmetry": 0.3, "distance": 0.2}


class CompleteLandmarkLoss(nn.Module):
    """``sum(weights[t] * t)`` over the terms Wing, Symmetry and Distance (a term weighted 0 is
    not computed); the default weights are the original's 1, 0.3 and 0.2.

    Returns ``(total, terms)``: ``terms`` maps each computed term to its unweighted value
    (detached).
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        w: float = 10.0,
        epsilon: float = 2.0,
        pixel_scale: float = 224.0,
        symmetry_reference: str = "prior",
    ) -> None:
        super().__init__()
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        if set(self.weights) != set(DEFAULT_WEIGHTS):
            unknown = sorted(set(self.weights) - set(DEFAULT_WEIGHTS))
            raise ValueError(f"unknown loss terms {unknown} (terms: {', '.join(DEFAULT_WEIGHTS)})")
        self.terms = nn.ModuleDict(
            {
                "wing": WingLoss(w, epsilon, pixel_scale),
                "symmetry": SymmetryLoss(pixel_scale, symmetry_reference),
                "distance": DistancePreservationLoss(pixel_scale),
            }
        )

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = pred.new_zeros((), dtype=torch.float32)
        values: dict[str, torch.Tensor] = {}
        for name, term in self.terms.items():
            if self.weights[name] == 0:
                continue
            value = term(pred, target)
            values[name] = value.detach()
            total = total + self.weights[name] * value
        return total, values


class MSELoss(nn.Module):
    """Mean squared pixel error: a plain baseline to compare the Wing loss against.

    Returns ``(total, {"mse": total detached})``, as every training loss does.
    """

    def __init__(self, pixel_scale: float = 224.0) -> None:
        super().__init__()
        self.pixel_scale = pixel_scale

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = (((pred.float() - target.float()) * self.pixel_scale) ** 2).mean()
        return total, {"mse": total.detach()}


LOSS_NAMES = ("wing", "symmetry", "complete", "mse")


# Each phase's loss: the CompleteLandmarkLoss terms it switches off.
_OFF = {"wing": ("symmetry", "distance"), "symmetry": ("distance",)}


def build_loss(name: str, cfg: LossConfig | None = None) -> nn.Module:
    """The loss of a training phase by name: ``wing`` (phases 1-2), ``symmetry`` = Wing + 0.3 x
    symmetry (phase 3), ``complete`` = Wing + 0.3 x symmetry + 0.2 x distance (phase 4), ``mse``;
    with the parameters of ``cfg`` (the config's ``loss:`` section; default: its defaults).
    Called as ``loss(pred, target)``, it returns ``(total, terms)``.
    """
    cfg = cfg or LossConfig()
    if name == "mse":
        return MSELoss(cfg.pixel_scale)
    if name not in ("wing", "symmetry", "complete"):
        raise ValueError(f"unknown loss {name!r} (choose from {', '.join(LOSS_NAMES)})")
    weights = {"wing": 1.0, "symmetry": cfg.symmetry_weight, "distance": cfg.distance_weight}
    weights.update(dict.fromkeys(_OFF.get(name, ()), 0.0))
    return CompleteLandmarkLoss(
        weights, cfg.wing_w, cfg.wing_epsilon, cfg.pixel_scale, cfg.symmetry_reference
    )


__all__ = [
    "LOSS_NAMES",
    "CompleteLandmarkLoss",
    "DistancePreservationLoss",
    "MSELoss",
    "SymmetryLoss",
    "WingLoss",
    "as_points",
    "build_loss",
]
