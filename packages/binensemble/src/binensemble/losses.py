"""Triplet loss with online batch-hard mining (Hermans et al., 2017), vectorised.

For every anchor in the batch the hardest positive (farthest sample of its class) and the
hardest negative (closest sample of another class) are taken from the pairwise distance
matrix; ``loss = mean(relu(d(a, p) - d(a, n) + margin))`` over anchors that have both.
The mining itself is medcore's (:mod:`medcore.losses.triplet_mining`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medcore.losses.triplet_mining import batch_hard, pairwise_distances, triplet_masks
from medcore.runtime.distributed import gather_with_grad, get_world_size


def batch_hard_triplet_loss(
    emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.5
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and statistics (fraction of active triplets, mean positive / negative distance)."""
    positive, negative = triplet_masks(labels)
    d_ap, d_an, valid = batch_hard(pairwise_distances(emb), positive, negative)
    if not valid.any():
        # No anchor has both a positive and a negative: a zero that still carries the graph.
        zero = emb.new_zeros(()).detach()
        return emb.sum() * 0.0, {"active": zero, "d_pos": zero, "d_neg": zero}
    losses = F.relu(d_ap[valid] - d_an[valid] + margin)
    # Tensors on the device: the trainer reads them once per logging step, not per batch.
    stats = {
        "active": (losses > 0).float().mean().detach(),
        "d_pos": d_ap[valid].mean().detach(),
        "d_neg": d_an[valid].mean().detach(),
    }
    return losses.mean(), stats


class BatchHardTripletLoss(torch.nn.Module):
    """Batch-hard triplet loss; under torchrun the batch is gathered from all ranks first.

    Gathering (with gradients) lets each anchor find its hardest partners in the global batch,
    as a single-GPU run with the same total batch would.
    """

    def __init__(self, margin: float = 0.5, gather_across_ranks: bool = True) -> None:
        super().__init__()
        self.margin = margin
        self.gather = gather_across_ranks

    def forward(
        self, emb: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.gather and get_world_size() > 1:
            emb = gather_with_grad(emb)
            labels = gather_with_grad(labels.float()).long()
        return batch_hard_triplet_loss(emb, labels, self.margin)
