"""The two training objectives: a graded micro-F1 loss and an online triplet loss with multi-label mining.

Each returns ``(total, terms)``: the loss to minimise and a dict of detached tensors that the
trainer logs as ``train/<name>`` at its logging steps (left on the device: no host sync per
micro-batch). Shape notation: ``b`` batch, ``c`` label slots, ``e`` embedding size.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medcore.losses.triplet_mining import (
    Mining,
    mine_negatives,
    mine_triplets,
    pairwise_distances,
    triplet_masks,
)

Average = Literal["micro", "sample"]
Targets = Literal["binary", "jaccard"]


def graded_targets(labels: torch.Tensor) -> torch.Tensor:
    """Jaccard-graded targets ``[b, c]`` of 0/1 label slots ``[b, c]``.

    Slot ``c`` of a study with the positive set ``L`` gets the Jaccard similarity of ``L`` with
    the single-finding set ``{c}``: ``|L & {c}| / |L | {c}| = 1 / |L|`` for ``c`` in ``L``, else
    0. A study with one finding keeps its 1; one with nodules and cysts asks 0.5 of each, the
    relevance that a single-finding study of either has to it. Rows without a positive stay 0.
    """
    hot = (labels > 0).to(torch.float32)
    return hot / hot.sum(1, keepdim=True).clamp_min(1.0)


class GradedMicroF1Loss(nn.Module):
    """``1 - F1`` computed from sigmoid probabilities with soft counts; targets may be graded.

    With ``p = sigmoid(logits)`` and targets ``t`` in ``[0, 1]``: ``TP = sum p t``,
    ``FP = sum p (1 - t)``, ``FN = sum (1 - p) t`` and ``F1 = 2 TP / (2 TP + FP + FN)``.

    * ``average="micro"`` (the default, the micro-F1 the original trains for): the sums run
      over the whole batch (all studies and slots), the batch-level micro-F1, the same pooling
      as the micro-F1 metric; frequent findings weigh more.
    * ``average="sample"``: the sums run over the label slots of each study and the per-study
      F1 is averaged over the batch; every study weighs the same.

    ``bce_weight > 0`` adds ``bce_weight * BCEWithLogits`` (the hybrid loss): BCE gives every
    slot a gradient even when the soft F1 saturates.

    Terms: ``soft_f1`` (the batch's soft F1, ``1 - total`` without BCE) and, in the hybrid,
    ``bce``.
    """

    def __init__(
        self, average: Average = "micro", bce_weight: float = 0.0, eps: float = 1e-7
    ) -> None:
        super().__init__()
        if average not in ("sample", "micro"):
            raise ValueError(f"average must be 'sample' or 'micro', got {average!r}")
        self.average = average
        self.bce_weight = bce_weight
        self.eps = eps

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, targets = logits.float(), targets.float()
        probs = torch.sigmoid(logits)
        dims = (1,) if self.average == "sample" else (0, 1)
        tp = (probs * targets).sum(dims)
        fp = (probs * (1 - targets)).sum(dims)
        fn = ((1 - probs) * targets).sum(dims)
        f1 = (2 * tp / (2 * tp + fp + fn + self.eps)).mean()
        loss = 1 - f1
        terms = {"soft_f1": f1.detach()}
        if self.bce_weight > 0:
            bce = F.binary_cross_entropy_with_logits(logits, targets)
            loss = loss + self.bce_weight * bce
            terms["bce"] = bce.detach()
        return loss, terms


class OnlineTripletLoss(nn.Module):
    """Triplet loss on the hardest, a semi-hard or a random hard negative of each (anchor, positive).

    Every (anchor, positive) pair of the batch gets one negative among the compatible ones
    (:func:`medcore.losses.triplet_mining.triplet_masks` with the multi-hot labels: no shared
    positive finding), chosen on squared Euclidean distances ``d``
    (:func:`medcore.losses.triplet_mining.mine_negatives`):

    * ``hardest``: the negative closest to the anchor.
    * ``semihard``: a random negative with ``d_ap < d_an < d_ap + margin``.
    * ``random_hard``: a random negative that violates the margin, ``d_an < d_ap + margin``.

    Pairs without such a negative give no triplet. The loss is the mean of
    ``relu(d_ap - d_an + margin)`` over the chosen triplets (0, still attached to the graph,
    when there are none). Mining is one ``[b, b, b]`` masked tensor, no Python loops; the random
    choices draw on the global torch RNG (seeded and checkpointed by the Trainer). Terms:
    ``triplets``, their number.
    """

    def __init__(self, margin: float = 0.2, mining: Mining = "hardest") -> None:
        super().__init__()
        if mining not in ("hardest", "semihard", "random_hard"):
            raise ValueError(f"mining must be hardest, semihard or random_hard, got {mining!r}")
        self.margin = margin
        self.mining = mining

    def mine(
        self, dist: torch.Tensor, labels: torch.Tensor, label_ids: torch.Tensor
    ) -> torch.Tensor:
        """Triplets ``[t, 3]`` (anchor, positive, negative indices) for distances ``dist [b, b]``."""
        positive, negative = triplet_masks(label_ids, labels)
        return mine_triplets(dist, positive, negative, self.mining, self.margin)

    def forward(
        self, emb: torch.Tensor, labels: torch.Tensor, label_ids: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(mean triplet loss, ``{"triplets": their number}``)."""
        emb = emb.float()
        dist = pairwise_distances(emb, squared=True)
        positive, negative = triplet_masks(label_ids, labels)
        chosen, has = mine_negatives(dist.detach(), positive, negative, self.mining, self.margin)
        # Masked over the [b, b] pairs rather than indexed by triplet: no shape depends on the
        # data, so the step never waits for the device (the count stays a tensor).
        losses = F.relu(dist - dist.gather(1, chosen) + self.margin) * has
        count = has.sum()
        loss = losses.sum() / count.clamp_min(1)  # 0, attached to the graph, without triplets
        return loss, {"triplets": count.float()}
