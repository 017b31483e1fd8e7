"""The Trainer's training batches: the epoch's batch order, its length, and the run's one
DataLoader (see :mod:`medcore.engine.batching` for the seeded loading it reads through).

A mixin of :class:`medcore.engine.trainer.Trainer`, split out so the loop reads on its own.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable

import torch
from torch.utils.data import BatchSampler, DistributedSampler, Sampler

from medcore.engine.batching import EpochRandomSampler, SeededFetch, collated, seed_worker
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


class TrainData:
    """Batch order, epoch length and the DataLoader of the Trainer."""

    def _base_batch_sampler(self, epoch: int) -> Iterable[list[int]]:
        if self.custom_batch_sampler is not None:
            sampler = self.custom_batch_sampler
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            return sampler
        if self.dist.enabled:
            inner: Sampler[int] = DistributedSampler(
                self.train_data, shuffle=True, seed=self.seed, drop_last=self.cfg.drop_last
            )
        else:
            inner = EpochRandomSampler(len(self.train_data), seed=self.seed)
        inner.set_epoch(epoch)
        return BatchSampler(inner, self.batch_size, drop_last=self._drop_last(len(inner)))

    def _drop_last(self, per_rank: int) -> bool:
        """Drop the last batch if asked, or if it is smaller than ``min_batch_size``."""
        rest = per_rank % self.batch_size
        return self.cfg.drop_last or 0 < rest < min(self.cfg.min_batch_size, self.batch_size)

    def _note_small_last_batch(self) -> None:
        if self.custom_batch_sampler is not None or self.cfg.drop_last:
            return
        per_rank = len(self._base_batch_sampler(0).sampler)
        rest = per_rank % self.batch_size
        if self._drop_last(per_rank) and self.is_main:
            print(
                f"note: the last training batch of each epoch would hold {rest} sample"
                f"{'s' if rest != 1 else ''} (fewer than trainer.min_batch_size="
                f"{self.cfg.min_batch_size}); it is dropped, so {rest} of {per_rank} samples "
                "per rank sit out each epoch (a different draw each epoch)"
            )

    def _batches_per_epoch(self) -> int:
        n = len(self._base_batch_sampler(0))
        if self.cfg.max_steps_per_epoch:
            n = min(n, self.cfg.max_steps_per_epoch * self.cfg.grad_accum_steps)
        if n == 0:
            raise UserError(
                "training data", f"has {len(self.train_data)} samples: not enough for one batch"
            )
        return n

    def _loader(self, epoch: int, skip: int) -> torch.utils.data.DataLoader:
        """The run's one DataLoader, positioned at batch ``skip`` of ``epoch``."""
        self._epoch_batches.position(epoch, skip)
        persistent = self.cfg.persistent_workers and self.num_workers > 0
        if self._train_loader is None:
            # An explicit generator keeps the loader from drawing on the global RNG (exact
            # resume); what the dataset and collate_fn draw is seeded per batch (SeededFetch),
            # the workers' own seeds are a function of (seed, epoch) for anything else.
            self._train_loader = torch.utils.data.DataLoader(
                SeededFetch(self.train_data, self.collate_fn),
                batch_sampler=self._epoch_batches,
                num_workers=self.num_workers,
                collate_fn=collated,
                pin_memory=self.device.type == "cuda",
                worker_init_fn=init_training_worker,
                generator=torch.Generator(),
                persistent_workers=persistent,
            )
        if not persistent or self._train_loader._iterator is None:
            self._train_loader.generator.manual_seed(self.seed * 7919 + epoch)
        return self._train_loader

    def _close_loader(self) -> None:
        """Stop the loader's workers now (the end of ``fit``), not when the Trainer is
        collected: a persistent worker left to the garbage collector takes seconds to stop."""
        loader, self._train_loader = self._train_loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
