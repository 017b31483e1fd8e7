"""Online triplet mining inside a batch (balanced batches: :mod:`medcore.data.samplers`).

Written here because neither torch (``TripletMarginLoss`` takes pre-formed triplets) nor the
project's libraries mine triplets inside a batch, and two packages need it: ctretrieval
(multi-label CT findings, negatives must share no positive finding with the anchor) and
binensemble (two classes, batch-hard mining of Hermans et al., 2017).

- :func:`triplet_masks`: positive / negative pair masks, single-label or multi-label.
- :func:`batch_hard`: per anchor, the farthest positive and the closest negative.
- :func:`mine_negatives`: per (anchor, positive) pair, one negative (hardest, semi-hard or a
  random margin violator), as ``[b, b]`` tensors: what a loss uses inside a training step,
  with no read back to the host.
- :func:`mine_triplets`: the same choice as index triplets ``[t, 3]`` (sized on the host).
"""

from __future__ import annotations

from typing import Literal

import torch

Mining = Literal["hardest", "semihard", "random_hard"]


def pairwise_distances(emb: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Euclidean distances ``[b, b]`` (squared with ``squared``); the clamp keeps the gradient
    of the square root finite at zero distance."""
    sq = emb.pow(2).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * emb @ emb.T
    return d2.clamp_min(0.0) if squared else d2.clamp_min(1e-12).sqrt()


def triplet_masks(
    class_ids: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, b]`` positive mask (same class id, not itself) and negative mask.

    Without ``labels`` a negative is any sample of another class. With multi-hot ``labels``
    a negative shares no positive label with the anchor: a study with nodules is no negative
    for one with nodules and cysts, although their class ids differ.
    """
    same = class_ids[:, None] == class_ids[None, :]
    eye = torch.eye(len(class_ids), dtype=torch.bool, device=class_ids.device)
    if labels is None:
        negative = ~same
    else:
        hot = (labels > 0).float()
        negative = (hot @ hot.T) == 0
    return same & ~eye, negative


def batch_hard(
    dist: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per anchor: hardest-positive distance, hardest-negative distance, and whether it has both."""
    hardest_pos = dist.masked_fill(~positive, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(~negative, float("inf")).amin(1)
    return hardest_pos, hardest_neg, positive.any(1) & negative.any(1)


@torch.no_grad()
def mine_negatives(
    dist: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    mining: Mining = "hardest",
    margin: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (anchor, positive) pair, the chosen negative's index and whether there is one, both
    ``[b, b]`` (row: anchor, column: positive).

    * ``hardest``: the negative closest to the anchor.
    * ``semihard``: a random negative with ``d_ap < d_an < d_ap + margin``.
    * ``random_hard``: a random negative that violates the margin, ``d_an < d_ap + margin``.

    A pair that is no positive pair, or has no such negative, has ``False``. One ``[b, b, b]``
    masked tensor, no Python loops and no host sync (the shapes do not depend on the data); the
    random choices draw on the global torch RNG (seeded and checkpointed by the Trainer).
    """
    if mining not in ("hardest", "semihard", "random_hard"):
        raise ValueError(f"mining must be hardest, semihard or random_hard, got {mining!r}")
    d_ap = dist[:, :, None]  # [a, p, 1]
    d_an = dist[:, None, :]  # [a, 1, n]
    valid = positive[:, :, None] & negative[:, None, :]  # [a, p, n]
    if mining == "semihard":
        valid = valid & (d_an > d_ap) & (d_an < d_ap + margin)
    elif mining == "random_hard":
        valid = valid & (d_an < d_ap + margin)
    if mining == "hardest":
        score = torch.where(
            valid, -d_an.expand_as(valid), torch.full_like(valid, -torch.inf, dtype=dist.dtype)
        )
    else:
        noise = torch.rand(valid.shape, device=dist.device)
        score = torch.where(valid, noise, torch.full_like(noise, -1.0))
    return score.argmax(2), valid.any(2)


def mine_triplets(
    dist: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    mining: Mining = "hardest",
    margin: float = 0.2,
) -> torch.Tensor:
    """Triplets ``[t, 3]`` (anchor, positive, negative indices): :func:`mine_negatives`' choice
    for every pair that has one. Sizing ``t`` reads back to the host once."""
    chosen, has = mine_negatives(dist, positive, negative, mining, margin)
    anchors, positives = has.nonzero(as_tuple=True)
    return torch.stack([anchors, positives, chosen[anchors, positives]], dim=1)
