"""Batches for the Trainer: epoch-seeded orders, resumable positions, seeded loading, and the
helpers that move and count a batch.

The loader reads batches through :class:`SeededFetch`: each batch the batch sampler yields is a
:class:`SeededBatch` carrying the seed of its place in the run (``medcore.engine.rng.batch_seed``), and
the batch's samples are read and collated under that seed (``medcore.engine.rng.seeded_batch``).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from medcore.engine.rng import batch_seed, seeded_batch


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s contiguous block when ``n`` items are split evenly."""
    return n * rank // world_size, n * (rank + 1) // world_size


class EpochRandomSampler(Sampler[int]):
    """A shuffled order that depends only on ``(seed, epoch)``, never on the global RNG."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=gen).tolist())

    def __len__(self) -> int:
        return self.size


class SeededBatch(list):
    """The dataset indices of one batch, with the seed its loading draws from."""

    def __init__(self, indices: Iterable[int], seed: int) -> None:
        super().__init__(indices)
        self.seed = seed


class EpochBatches(Sampler[list[int]]):
    """The batches of one epoch after the first ``skip`` (resume inside an epoch, no data read),
    each a :class:`SeededBatch` seeded by ``(seed, epoch, rank, batch index)``.

    One object for the whole run, repositioned before each epoch, so that one DataLoader (and
    its persistent workers) serves every epoch.
    """

    def __init__(
        self,
        batches_of: Callable[[int], Iterable[list[int]]],
        limit: int,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        self.batches_of, self.limit = batches_of, limit
        self.seed, self.rank = seed, rank
        self.epoch, self.skip = 0, 0

    def position(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        batches = itertools.islice(iter(self.batches_of(epoch)), self.skip, self.limit)
        for number, indices in enumerate(batches, start=self.skip):
            yield SeededBatch(indices, batch_seed(self.seed, epoch, self.rank, number))

    def __len__(self) -> int:
        return max(0, self.limit - self.skip)


class SeededFetch(Dataset):
    """``dataset`` read one batch at a time under the batch's seed, collated inside it.

    The DataLoader calls ``__getitems__`` with a :class:`SeededBatch`; reading and collating
    happen in one seeded block, so a ``collate_fn`` that draws (mixing, random crops) is seeded
    too. Use :func:`collated` as the loader's ``collate_fn``.
    """

    def __init__(self, dataset: Dataset, collate_fn: Callable[[list[Any]], Any] | None) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn or default_collate

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, batch: list[int]) -> Any:
        seed = getattr(batch, "seed", None)
        if seed is None:
            return self.collate_fn([self.dataset[i] for i in batch])
        with seeded_batch(seed):
            return self.collate_fn([self.dataset[i] for i in batch])


def collated(batch: Any) -> Any:
    """The ``collate_fn`` of a loader over :class:`SeededFetch`: the batch is already collated."""
    return batch


def seed_worker(worker_id: int) -> None:
    # Each worker's torch seed is derived from the loader's generator; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def move_to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move every tensor in a (nested) batch to ``device``; other values pass through."""
    if isinstance(batch, torch.Tensor):
        out = batch.to(device, non_blocking=True)
        if channels_last and out.ndim == 4 and out.is_floating_point():
            out = out.contiguous(memory_format=torch.channels_last)
        return out
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not isinstance(batch, str):
        moved = [move_to_device(v, device, channels_last) for v in batch]
        return (
            type(batch)(moved)
            if isinstance(batch, tuple) and not hasattr(batch, "_fields")
            else moved
        )
    return batch


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, dict):
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        return 1
    for value in values:
        n = batch_size_of(value)
        if n:
            return n
    return 0
