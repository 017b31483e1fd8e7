"""Balanced batches for triplet mining: ``n_classes`` label ids x ``n_samples`` studies each."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class BalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``n_classes`` label ids with ``n_samples`` studies of each.

    The label ids of a batch are chosen to be mutually *compatible* where possible: the first at
    random, each next one among those sharing no positive finding with the ones already chosen
    (so every anchor has negatives); when none is left, among the rest. A label id with fewer
    than ``n_samples`` studies is sampled with replacement.

    The batches of an epoch depend only on ``(seed, epoch, rank)`` (``set_epoch`` as for
    DistributedSampler), which gives medcore's Trainer exact resume; under torchrun each rank
    draws its own batches and all ranks have the same number of them.
    """

    def __init__(
        self,
        labels: np.ndarray,
        label_ids: np.ndarray,
        n_classes: int,
        n_samples: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batches_per_epoch: int | None = None,
    ) -> None:
        self.label_ids = np.asarray(label_ids)
        self.classes = np.unique(self.label_ids)
        if n_classes < 1 or n_samples < 1:
            raise ValueError("n_classes and n_samples must be >= 1")
        if len(self.classes) < n_classes:
            raise ValueError(
                f"the data has {len(self.classes)} label ids, fewer than n_classes={n_classes}"
            )
        self.members = {int(c): np.flatnonzero(self.label_ids == c) for c in self.classes}
        hot = np.asarray(labels) > 0
        class_hot = np.stack([hot[self.members[int(c)][0]] for c in self.classes])
        # compatible[i, j]: label ids i and j share no positive slot.
        self.compatible = (class_hot.astype(np.int64) @ class_hot.T.astype(np.int64)) == 0
        self.n_classes, self.n_samples = n_classes, n_samples
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        batch = n_classes * n_samples
        self.num_batches = batches_per_epoch or max(1, len(self.label_ids) // (batch * world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _pick_classes(self, rng: np.random.Generator) -> list[int]:
        chosen: list[int] = []
        free = np.ones(len(self.classes), dtype=bool)
        for _ in range(self.n_classes):
            ok = free.copy()
            for c in chosen:
                ok &= self.compatible[c]
            pool = np.flatnonzero(ok) if ok.any() else np.flatnonzero(free)
            pick = int(rng.choice(pool))
            chosen.append(pick)
            free[pick] = False
        return chosen

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        for _ in range(self.num_batches):
            batch: list[int] = []
            for c in self._pick_classes(rng):
                members = self.members[int(self.classes[c])]
                replace = len(members) < self.n_samples
                batch.extend(int(i) for i in rng.choice(members, self.n_samples, replace=replace))
            yield batch
