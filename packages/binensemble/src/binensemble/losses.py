"""The two models' losses; each returns ``(total, terms)``: the loss to back-propagate and
detached tensors to log, left on the device (the trainer reads them at logging steps only, so
nothing here waits for the device).

Triplet loss with online batch-hard mining (Hermans et al., 2017), vectorised: for every anchor
in the batch the hardest positive (farthest sample of its class) and the hardest negative
(closest sample of another class) are taken from the pairwise distance matrix;
``loss = mean(relu(d(a, p) - d(a, n) + margin))`` over anchors that have both. The mining
itself is medcore's (:mod:`medcore.losses.triplet_mining`). Cross-entropy (the baseline) with
the batch accuracy as its term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medcore.losses.triplet_mining import batch_hard, pairwise_distances, triplet_masks
from medcore.runtime.distributed import gather_with_grad, get_world_size


def batch_hard_triplet_loss(
    emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.5
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and its terms: ``active`` (fraction of anchors violating the margin), ``d_pos``
    / ``d_neg`` (mean hardest positive / negative distance), over the anchors that have both.

    Anchors without a positive or a negative are masked out rather than indexed away, so the
    loss never asks the device how many there are; with none, every value is 0 and the loss
    still carries the graph.
    """
    positive, negative = triplet_masks(labels)
    d_ap, d_an, valid = batch_hard(pairwise_distances(emb), positive, negative)
    count = valid.sum().clamp_min(1)
    zero = emb.new_zeros(())
    # An anchor without a positive (d_ap = -inf) or negative (d_an = +inf) is masked to 0.
    d_ap, d_an = torch.where(valid, d_ap, zero), torch.where(valid, d_an, zero)
    losses = torch.where(valid, F.relu(d_ap - d_an + margin), zero)
    terms = {
        "active": ((losses > 0).sum() / count).detach(),
        "d_pos": (d_ap.sum() / count).detach(),
        "d_neg": (d_an.sum() / count).detach(),
    }
    return losses.sum() / count, terms


def cross_entropy_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of ``[b, c]`` logits and the batch ``accuracy`` (arg-max) as its term."""
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    return loss, {"accuracy": (logits.argmax(1) == labels).float().mean().detach()}


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
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.gather and get_world_size() > 1:
            emb = gather_with_grad(emb)
            labels = gather_with_grad(labels.float()).long()
        return batch_hard_triplet_loss(emb, labels, self.margin)
