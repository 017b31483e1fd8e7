"""The Trainer's training batches: the epoch's batch order, its length, and the run's one
DataLoader (see :mod:`medcore.engine.batching` for the seeded loading it reads through).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, Sampler

from medcore.config import TrainerConfig
from medcore.engine.batching import (
    EpochBatches,
    EpochRandomSampler,
    SeededFetch,
    collated,
    seed_worker,
)
from medcore.errors import UserError
from medcore.runtime.interrupts import SIGNALS


def init_training_worker(worker_id: int) -> None:
    """A training loader's worker: seeded (:func:`medcore.engine.batching.seed_worker`) and deaf to
    the stop signals. SLURM signals every process of a job step, a Ctrl-C the terminal's
    whole process group: the training process stops at a step boundary and ends its workers
    itself (:mod:`medcore.runtime.interrupts`); a worker that died first would fail the step."""
    seed_worker(worker_id)
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class TrainLoader:
    """Batch order, epoch length and the one DataLoader of a training run.

    ``batch_sampler``: the task's own batches (class-balanced ones); else shuffled batches of
    ``batch_size``, split across ranks, in an order that depends on ``(seed, epoch)`` only.
    """

    def __init__(
        self,
        data: Dataset,
        cfg: TrainerConfig,
        *,
        batch_size: int,
        num_workers: int,
        seed: int,
        rank: int,
        world_size: int,
        device: torch.device,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        batch_sampler: Sampler[list[int]] | None = None,
    ) -> None:
        self.data = data
        self.cfg = cfg
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.world_size = world_size
        self.device = device
        self.collate_fn = collate_fn
        self.batch_sampler = batch_sampler
        self.batches_per_epoch = self._batches_per_epoch()
        if rank == 0:
            self._note_small_last_batch()
        self._epoch_batches = EpochBatches(self._batches_of, self.batches_per_epoch, seed, rank)
        self._loader: torch.utils.data.DataLoader | None = None

    def _batches_of(self, epoch: int) -> Iterable[list[int]]:
        if self.batch_sampler is not None:
            if hasattr(self.batch_sampler, "set_epoch"):
                self.batch_sampler.set_epoch(epoch)
            return self.batch_sampler
        if self.world_size > 1:
            inner: Sampler[int] = DistributedSampler(
                self.data, shuffle=True, seed=self.seed, drop_last=self.cfg.drop_last
            )
        else:
            inner = EpochRandomSampler(len(self.data), seed=self.seed)
        inner.set_epoch(epoch)
        return BatchSampler(inner, self.batch_size, drop_last=self._drop_last(len(inner)))

    def _drop_last(self, per_rank: int) -> bool:
        """Drop the last batch if asked, or if it is smaller than ``min_batch_size``."""
        rest = per_rank % self.batch_size
        return self.cfg.drop_last or 0 < rest < min(self.cfg.min_batch_size, self.batch_size)

    def _note_small_last_batch(self) -> None:
        if self.batch_sampler is not None or self.cfg.drop_last:
            return
        per_rank = len(self._batches_of(0).sampler)
        rest = per_rank % self.batch_size
        if self._drop_last(per_rank):
            print(
                f"note: the last training batch of each epoch would hold {rest} sample"
                f"{'s' if rest != 1 else ''} (fewer than trainer.min_batch_size="
                f"{self.cfg.min_batch_size}); it is dropped, so {rest} of {per_rank} samples "
                "per rank sit out each epoch (a different draw each epoch)"
            )

    def _batches_per_epoch(self) -> int:
        n = len(self._batches_of(0))
        if self.cfg.max_steps_per_epoch:
            n = min(n, self.cfg.max_steps_per_epoch * self.cfg.grad_accum_steps)
        if n == 0:
            raise UserError(
                "training data", f"has {len(self.data)} samples: not enough for one batch"
            )
        return n

    def epoch(self, epoch: int, skip: int) -> torch.utils.data.DataLoader:
        """The run's one DataLoader, positioned at batch ``skip`` of ``epoch``."""
        self._epoch_batches.position(epoch, skip)
        persistent = self.cfg.persistent_workers and self.num_workers > 0
        if self._loader is None:
            # An explicit generator keeps the loader from drawing on the global RNG (exact
            # resume); what the dataset and collate_fn draw is seeded per batch (SeededFetch),
            # the workers' own seeds are a function of (seed, epoch) for anything else.
            self._loader = torch.utils.data.DataLoader(
                SeededFetch(self.data, self.collate_fn),
                batch_sampler=self._epoch_batches,
                num_workers=self.num_workers,
                collate_fn=collated,
                pin_memory=self.device.type == "cuda",
                worker_init_fn=init_training_worker,
                generator=torch.Generator(),
                persistent_workers=persistent,
            )
        if not persistent or self._loader._iterator is None:
            self._loader.generator.manual_seed(self.seed * 7919 + epoch)
        return self._loader

    def close(self) -> None:
        """Stop the loader's workers now (the end of ``fit``), not when the Trainer is
        collected: a persistent worker left to the garbage collector takes seconds to stop."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
