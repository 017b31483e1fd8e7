"""Metric learning's shared parts: balanced batches and online triplet mining inside a batch.

Written here because neither torch (``TripletMarginLoss`` takes pre-formed triplets) nor the
project's libraries mine triplets inside a batch, and two packages need it: ctretrieval
(multi-label CT findings, negatives must share no positive finding with the anchor) and
binensemble (two classes, batch-hard mining of Hermans et al., 2017).

- :class:`BalancedBatchSampler`: batches of ``n_classes`` class ids x ``n_samples`` members.
- :func:`triplet_masks`: positive / negative pair masks, single-label or multi-label.
- :func:`batch_hard`: per anchor, the farthest positive and the closest negative.
- :func:`mine_triplets`: per (anchor, positive) pair, one negative (hardest, semi-hard or a
  random margin violator), as index triplets.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Sampler

from medcore.errors import DataError

Mining = Literal["hardest", "semihard", "random_hard"]


class BalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``n_classes`` class ids with ``n_samples`` members of each.

    Each class is read from its own stream, reshuffled whenever it runs out, so a small class
    repeats within an epoch and a large one is covered in order before any member repeats.
    ``n_classes=None`` puts every class in every batch. With ``labels`` (multi-hot, one row
    per sample) the class ids of a batch are chosen to be mutually *compatible* where possible:
    the first at random, each next one among those whose members share no positive label with
    the ones already chosen (so every anchor has negatives); when none is left, among the rest.

    The batches of an epoch depend only on ``(seed, epoch)`` (``set_epoch`` as for
    DistributedSampler), which gives medcore's Trainer exact resume. Under DDP one global
    sequence is drawn and rank ``r`` takes every ``world_size``-th batch from ``r``, so all
    ranks have the same number of batches. ``batches_per_epoch`` is per rank; by default
    ``ceil(len(class_ids) / (batch size x world size))``.
    """

    def __init__(
        self,
        class_ids: np.ndarray,
        n_samples: int,
        n_classes: int | None = None,
        *,
        labels: np.ndarray | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batches_per_epoch: int | None = None,
    ) -> None:
        self.class_ids = np.asarray(class_ids)
        self.classes = np.unique(self.class_ids)
        self.n_classes = len(self.classes) if n_classes is None else int(n_classes)
        if self.n_classes < 2 or n_samples < 1:
            raise DataError(
                "batch sampler",
                f"needs 2 or more classes and 1 or more samples each per batch "
                f"(asked {self.n_classes} x {n_samples})",
            )
        if len(self.classes) < self.n_classes:
            raise DataError(
                "training split",
                f"has {len(self.classes)} class ids, fewer than n_classes={self.n_classes}",
            )
        self.n_samples = int(n_samples)
        self.members = [np.flatnonzero(self.class_ids == c) for c in self.classes]
        self.compatible: np.ndarray | None = None
        if labels is not None:
            hot = (np.asarray(labels) > 0).astype(np.int64)
            class_hot = np.stack([hot[m[0]] for m in self.members])
            # compatible[i, j]: classes i and j share no positive label.
            self.compatible = (class_hot @ class_hot.T) == 0
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        batch = self.n_classes * self.n_samples
        self.num_batches = batches_per_epoch or max(
            1, math.ceil(len(self.class_ids) / (batch * world_size))
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _pick_classes(self, rng: np.random.Generator) -> list[int]:
        if self.n_classes == len(self.classes):
            return list(range(len(self.classes)))
        chosen: list[int] = []
        free = np.ones(len(self.classes), dtype=bool)
        for _ in range(self.n_classes):
            ok = free.copy()
            if self.compatible is not None:
                for c in chosen:
                    ok &= self.compatible[c]
            pool = np.flatnonzero(ok) if ok.any() else np.flatnonzero(free)
            pick = int(rng.choice(pool))
            chosen.append(pick)
            free[pick] = False
        return chosen

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        streams = [np.empty(0, dtype=np.int64) for _ in self.members]
        for b in range(self.num_batches * self.world_size):
            batch: list[int] = []
            for c in self._pick_classes(rng):
                while len(streams[c]) < self.n_samples:
                    streams[c] = np.concatenate([streams[c], rng.permutation(self.members[c])])
                batch.extend(int(i) for i in streams[c][: self.n_samples])
                streams[c] = streams[c][self.n_samples :]
            if b % self.world_size == self.rank:
                yield batch


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
def mine_triplets(
    dist: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    mining: Mining = "hardest",
    margin: float = 0.2,
) -> torch.Tensor:
    """Triplets ``[t, 3]`` (anchor, positive, negative indices): one negative per (a, p) pair.

    * ``hardest``: the negative closest to the anchor.
    * ``semihard``: a random negative with ``d_ap < d_an < d_ap + margin``.
    * ``random_hard``: a random negative that violates the margin, ``d_an < d_ap + margin``.

    Pairs without such a negative give no triplet. One ``[b, b, b]`` masked tensor, no Python
    loops; the random choices draw on the global torch RNG (seeded and checkpointed by the
    Trainer).
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
    chosen = score.argmax(2)  # [a, p]
    anchors, positives = valid.any(2).nonzero(as_tuple=True)
    return torch.stack([anchors, positives, chosen[anchors, positives]], dim=1)
