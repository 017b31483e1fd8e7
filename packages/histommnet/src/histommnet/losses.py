"""The training objective (``HistoLoss``: focal loss plus the subtype head's cross-entropy,
returning ``(total, terms)``), focal loss with label smoothing on soft targets, and mixup.

Shapes: ``b`` batch, ``k`` classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Integer labels ``[b]`` -> smoothed one-hot ``[b, k]``: ``(1 - e) * onehot + e / k``."""
    onehot = F.one_hot(labels.long(), num_classes).float()
    return onehot * (1.0 - smoothing) + smoothing / num_classes


class FocalLoss(nn.Module):
    """Alpha-balanced focal loss for the binary head, on (smoothed, possibly mixed) soft targets.

    ``loss = -sum_k w_k (1 - p_k)^gamma q_k log p_k``, averaged over the batch, with class
    weights ``w = (1 - alpha, alpha)`` (``alpha`` weighs the malignant class here; training
    derives it from the config with ``malignant_alpha``) and ``q`` the target
    distribution. With one-hot ``q`` this is the focal loss of Lin et al.; written here because
    torchvision's ``sigmoid_focal_loss`` takes neither soft targets nor label smoothing.
    """

    def __init__(
        self, alpha: float = 0.7, gamma: float = 2.0, label_smoothing: float = 0.2
    ) -> None:
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weights", torch.tensor([1.0 - alpha, alpha]), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits [b, 2]``; ``target`` integer labels ``[b]`` (smoothed here) or soft ``[b, 2]``."""
        if target.ndim == 1:
            target = soft_targets(target, logits.shape[-1], self.label_smoothing)
        log_p = F.log_softmax(logits.float(), dim=-1)
        focal = (1.0 - log_p.exp()).pow(self.gamma)
        return -(self.weights * focal * target * log_p).sum(-1).mean()


class HistoLoss(nn.Module):
    """The training objective: the focal loss of the benign/malignant head plus
    ``subtype_weight`` times the cross-entropy of the subtype head, when the model has one.

    ``forward(out, target, subtype_target)`` takes the model's output dict and (soft or integer)
    targets and returns ``(total, terms)``: ``terms`` holds the detached parts, ``focal`` and
    ``subtype_ce``, left on the device (the trainer reads them once per logging step).
    """

    def __init__(self, focal: FocalLoss, subtype_weight: float = 0.0) -> None:
        super().__init__()
        self.focal = focal
        self.subtype_weight = subtype_weight

    def forward(
        self, out: dict[str, torch.Tensor], target: torch.Tensor, subtype_target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        focal = self.focal(out["logits"], target)
        total, terms = focal, {"focal": focal.detach()}
        if "subtype_logits" in out and self.subtype_weight > 0:
            sub = F.cross_entropy(out["subtype_logits"].float(), subtype_target)
            total = total + self.subtype_weight * sub
            terms["subtype_ce"] = sub.detach()
        return total, terms


def malignant_alpha(labels: Sequence[int], alpha: float, alpha_class: str = "minority") -> float:
    """The focal weight of the malignant class for ``FocalLoss``, from ``loss.focal_alpha``.

    ``alpha`` weighs ``alpha_class``: "malignant", "benign", or "minority", the class with
    fewer training ``labels`` (one per training draw; a tie counts benign as the minority).
    """
    if alpha_class == "malignant":
        return alpha
    if alpha_class == "benign":
        return 1.0 - alpha
    malignant = int(np.sum(np.asarray(labels) == 1))
    return alpha if malignant < len(labels) - malignant else 1.0 - alpha


def mixup(images: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix each sample with a permuted partner: returns (mixed images, permutation, lambda).

    ``lambda ~ Beta(alpha, alpha)`` from the global torch RNG (saved in checkpoints, so resume
    is exact); targets are mixed by the caller as ``lambda * q + (1 - lambda) * q[perm]``.
    All magnifications of a draw share the partner.
    """
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(images.shape[0]).to(images.device)
    return lam * images + (1.0 - lam) * images[perm], perm, lam
