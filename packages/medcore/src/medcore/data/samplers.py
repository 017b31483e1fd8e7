"""Batch samplers the packages share: balanced class batches for metric learning (ctretrieval's
multi-label findings, binensemble's two classes), deterministic per ``(seed, epoch)``."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from medcore.errors import DataError


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
