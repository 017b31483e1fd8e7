"""One training loop for every task package.

The task supplies a model, a dataset, a ``step_fn(model, batch) -> loss`` and optionally an
``evaluate_fn(model, ctx) -> metrics``; the Trainer owns everything that is the same in every
task: precision, gradient accumulation and clipping, optimiser and scheduler, DDP/FSDP,
evaluation cadence, best/latest/final checkpoints, exact resume, the NaN guard, progress and
logging. Devices, precision, strategies and collectives are Lightning Fabric's
(``fabric.setup``, ``fabric.backward``, ``no_backward_sync``, ``clip_gradients``).

Where the pieces live: settings, ``EvalContext`` and ``TrainResult`` in
:mod:`medcore.engine.task`; batch order and seeded loading in :mod:`medcore.engine.batching` and
:mod:`medcore.engine.loader`; RNG states in :mod:`medcore.engine.rng`; checkpoints and resume in
:mod:`medcore.engine.checkpointing`; optimizer and schedule in :mod:`medcore.engine.optim`; the per-step loss
window and NaN guard in :mod:`medcore.engine.step_window`; SIGINT/SIGTERM/SIGUSR1 in
:mod:`medcore.runtime.interrupts` (the loop stops at a step boundary, see :meth:`Trainer.fit`). This
module is the loop.

Exact resume: the batch order of an epoch depends only on ``(seed, epoch)``; every rank's
global RNG states are saved with every checkpoint; the DataLoader never draws from the global
RNG; and each batch is read and collated under a seed of its place in the run,
``(seed, epoch, rank, batch index)`` (:class:`medcore.engine.batching.SeededFetch`): torch's, numpy's
and Python's global RNGs are seeded from it before the batch's first ``__getitem__`` and the
caller's states are put back after its ``collate_fn``. A dataset that augments with
``torch.rand`` / ``np.random`` / ``random`` therefore draws the same for a batch whatever the
number of workers, with persistent or fresh workers, and after a resume, with no change to the
dataset; and the main process's own streams (dropout) are the same with ``num_workers`` 0 or
more. On CPU a run resumed from step k ends with the same weights as an uninterrupted run.
Randomness a dataset keeps in its own generator objects is its own to seed.

Loop cost: loss and sample counts stay on the device and are synchronised only at logging
steps; the NaN check is one host sync per optimizer step; only normalisation buffers (the ones
a forward pass updates) are copied for the NaN guard, and only when the model has any.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from medcore.config import TrainerConfig
from medcore.engine.batching import (
    EpochBatches,
    batch_size_of,
    move_to_device,
)
from medcore.engine.checkpointing import CheckpointState
from medcore.engine.evaluation import Evaluation
from medcore.engine.loader import TrainData
from medcore.engine.optim import build_optimizer, build_scheduler
from medcore.engine.run_log import RunLogger
from medcore.engine.step_window import BufferGuard, StepWindow
from medcore.engine.task import EvalContext, StepFn, TrainResult
from medcore.errors import TrainingDiverged
from medcore.runtime import distributed as dist_utils
from medcore.runtime import interrupts
from medcore.runtime.device import device_defaults, precision_policy
from medcore.weights.checkpoint import release_spares


class Trainer(TrainData, CheckpointState, Evaluation):
    """Fits ``model`` on ``train_data`` with ``step_fn``; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainerConfig,
        *,
        train_data: Dataset,
        step_fn: StepFn,
        run_dir: str | Path,
        device: torch.device,
        kind: str,
        evaluate_fn: Callable[[nn.Module, EvalContext], dict[str, float]] | None = None,
        param_groups: list[dict[str, Any]] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        batch_sampler: Sampler[list[int]] | None = None,
        seed: int = 0,
        extra_state: dict[str, Any] | None = None,
        on_epoch_start: Callable[[int], None] | None = None,
        logger: RunLogger | None = None,
        show_progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.kind = kind
        self.seed = seed
        self.step_fn = step_fn
        self.evaluate_fn = evaluate_fn
        self.train_data = train_data
        self.collate_fn = collate_fn
        self.custom_batch_sampler = batch_sampler
        self.extra_state = extra_state or {}
        self.on_epoch_start = on_epoch_start
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.precision = dist_utils.fabric_precision(device, cfg.amp, cfg.amp_dtype, cfg.precision)
        # The trainer's own Fabric (its precision and strategy), in the process group that
        # setup_run / torchrun / SLURM / a test harness started.
        self.fabric = dist_utils.make_fabric(
            device,
            strategy=cfg.strategy,
            precision=self.precision,
            find_unused_parameters=cfg.find_unused_parameters,
            register=False,
        )
        self.device = self.fabric.device
        self.dist = dist_utils.DistInfo(
            rank=self.fabric.global_rank,
            local_rank=self.fabric.local_rank,
            world_size=self.fabric.world_size,
        )
        self.is_main = self.dist.is_main
        self.fsdp = cfg.strategy == "fsdp" and self.dist.enabled
        self.show_progress = show_progress and self.is_main
        self.logger = logger or RunLogger(self.run_dir, enabled=self.is_main)
        self.amp = precision_policy(self.precision)
        defaults = device_defaults(self.device)
        self.batch_size = cfg.batch_size or defaults.batch_size
        self.num_workers = defaults.num_workers if cfg.num_workers is None else cfg.num_workers

        model = model.to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._guard = BufferGuard(model)
        if self.fsdp:
            # FSDP flattens the parameters: the optimizer is built on the sharded module.
            self.train_model = self.fabric.setup_module(model)
            self.optimizer = build_optimizer(cfg, model, param_groups, self.train_model)
            self._step_optimizer = self.fabric.setup_optimizers(self.optimizer)
        else:
            self.optimizer = build_optimizer(cfg, model, param_groups)
            self.train_model, self._step_optimizer = self.fabric.setup(model, self.optimizer)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.batches_per_epoch = self._batches_per_epoch()
        self._note_small_last_batch()
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum_steps)
        self.total_steps = max(1, self.steps_per_epoch * cfg.epochs)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total_steps)
        self._epoch_batches = EpochBatches(
            self._base_batch_sampler, self.batches_per_epoch, seed, self.dist.rank
        )
        self._train_loader: torch.utils.data.DataLoader | None = None

        # Loop state (all of it goes into checkpoints).
        self.epoch = 0
        self.batch_in_epoch = 0
        self.global_step = 0
        self.best_value: float | None = None
        self.best_name: str | None = None
        self.best_path: Path | None = None
        self.bad_evals = 0
        self.nonfinite_streak = 0
        self.stop_requested = False  # a signal asked every rank to stop (the ranks agreed)
        self.history: list[dict[str, float]] = []
        self.last_good_checkpoint: Path | None = None
        self._latest_position: tuple[int, int, int] | None = None  # of our last latest.pt
        self._latest_time = time.monotonic()  # when latest.pt was last written (or fit began)

    # -- one optimizer step -----------------------------------------------------------------
    def _micro_batch(self, batch: Any, sync: bool, window: StepWindow) -> None:
        """Forward and backward of one micro-batch; gradients are all-reduced only if ``sync``."""
        with self.fabric.no_backward_sync(self.train_model, enabled=not sync):
            with self.fabric.autocast():
                out = self.step_fn(self.train_model, batch)
            loss, extras = out if isinstance(out, tuple) else (out, {})
            if loss.requires_grad:
                self.fabric.backward(loss.float() / self.cfg.grad_accum_steps)
            elif self.dist.enabled:
                # A loss cut from the graph (e.g. a NaN constant) still joins DDP's gradient
                # all-reduce, or the other ranks would wait in it; the step is skipped anyway.
                params = [p for p in self.train_model.parameters() if p.requires_grad]
                self.fabric.backward(sum(p.sum() for p in params) * 0.0)
        window.add(loss.detach(), extras, batch_size_of(batch))

    def _window_was_finite(self, window: StepWindow) -> bool:
        """Whether every rank's losses of this optimizer step were finite; also whether a
        signal reached any rank (``stop_requested``). One all-reduce, one host sync."""
        if not self.dist.enabled:
            self.stop_requested = self.stop_requested or interrupts.requested()
            return not bool(window.nonfinite.item() > 0)
        asked = window.nonfinite.new_full((), float(interrupts.requested()))
        flags = self.fabric.all_reduce(torch.stack([window.nonfinite, asked]), reduce_op="sum")
        bad, stop = flags.tolist()
        self.stop_requested = self.stop_requested or stop > 0
        return not bad > 0

    def _agree_to_stop(self) -> None:
        """After an evaluation: whether a signal reached any rank while it ran."""
        asked = interrupts.requested()
        if self.dist.enabled:
            flag = torch.tensor(float(asked), device=self.device)
            asked = bool(self.fabric.all_reduce(flag, reduce_op="sum").item() > 0)
        self.stop_requested = self.stop_requested or asked

    def _handle_nonfinite(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_streak += 1
        msg = f"non-finite loss at step {self.global_step}; step skipped ({self.nonfinite_streak} in a row)"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        self.logger.log_jsonl(
            {"event": "nonfinite_loss", "step": self.global_step, "streak": self.nonfinite_streak}
        )
        if self.nonfinite_streak >= self.cfg.max_nonfinite_steps:
            last = self.last_good_checkpoint
            where = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
            raise TrainingDiverged(
                "training",
                f"loss was NaN/inf for {self.nonfinite_streak} consecutive steps; stopped ({where})",
            )

    def _optimizer_step(self) -> None:
        if self.cfg.grad_clip:
            self.fabric.clip_gradients(
                self.train_model,
                self._step_optimizer,
                max_norm=self.cfg.grad_clip,
                error_if_nonfinite=False,
            )
        self._step_optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            self.scheduler.step()

    # -- the loop -------------------------------------------------------------------------
    def fit(
        self, resume: str | Path | None = None, stop_after_steps: int | None = None
    ) -> TrainResult:
        """Train for ``cfg.epochs``; ``resume`` continues from a checkpoint.

        ``stop_after_steps`` ends the run after that many optimizer steps as if interrupted
        (latest.pt written, no final checkpoint): used to test exact resume.

        SIGINT, SIGTERM and SIGUSR1 (see :mod:`medcore.runtime.interrupts`) stop it at the next
        optimizer-step boundary, or after the evaluation that is running: every rank stops
        there, ``latest.pt`` is written with the state of that boundary, and
        :class:`medcore.runtime.interrupts.Interrupted` is raised. ``--resume latest`` then continues
        exactly as if nothing had happened.
        """
        self.stop_requested = False
        if resume is not None:
            self.load_state(resume)
        self.logger.log_jsonl(
            {
                "event": "start",
                "epochs": self.cfg.epochs,
                "batches_per_epoch": self.batches_per_epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "amp": self.amp.name,
                "precision": self.precision,
                "strategy": type(self.fabric.strategy).__name__,
                "batch_size": self.batch_size,
                "world_size": self.dist.world_size,
                "save_interval_s": self.cfg.save_interval_s,
            }
        )
        self._latest_time = time.monotonic()
        try:
            with interrupts.deferred():
                stopped_early, final_path = self._fit_epochs(stop_after_steps)
                if not self.stop_requested:  # a signal during the last save (and a barrier)
                    self._agree_to_stop()
                signal_name = interrupts.signal_name()
        finally:
            if self.is_main:  # the hidden spare files of the checkpoint writes
                release_spares(self.ckpt_dir)
        if self.stop_requested:
            raise interrupts.Interrupted(signal_name)
        return TrainResult(
            best_metric=self.best_value,
            best_metric_name=self.best_name,
            best_path=self.best_path,
            final_path=final_path,
            global_step=self.global_step,
            epochs_completed=self.epoch,
            stopped_early=stopped_early,
            history=self.history,
        )

    def _fit_epochs(self, stop_after_steps: int | None) -> tuple[bool, Path | None]:
        """The epochs left and final.pt; returns (stopped early, final.pt or None)."""
        patience = self.cfg.early_stopping_patience
        # Resumed from the checkpoint of an early stop: the decision stands.
        stopped_early = bool(patience) and self.bad_evals >= patience
        interrupted = False
        try:
            while self.epoch < self.cfg.epochs and not (
                stopped_early or interrupted or self.stop_requested
            ):
                stopped_early, interrupted = self._run_epoch(stop_after_steps)
        finally:
            self._close_loader()
        final_path = None
        if not (interrupted or self.stop_requested):
            final_path = self._save("final.pt")
            if stopped_early:
                self.logger.log_jsonl(
                    {"event": "early_stop", "epoch": self.epoch, "step": self.global_step}
                )
        return stopped_early, final_path

    def _run_epoch(self, stop_after_steps: int | None) -> tuple[bool, bool]:
        """Train the rest of the current epoch; returns (stopped early, interrupted)."""
        if self.on_epoch_start is not None:
            self.on_epoch_start(self.epoch)
        self.train_model.train()
        bar = tqdm(
            total=self.batches_per_epoch,
            initial=self.batch_in_epoch,
            disable=not self.show_progress,
            desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
            dynamic_ncols=True,
            leave=False,
        )
        stopped_early = interrupted = False
        try:
            window = StepWindow(self.device)
            saved = self._guard.save()
            micro = 0
            for batch in self._loader(self.epoch, self.batch_in_epoch):
                batch = move_to_device(batch, self.device, self.cfg.channels_last)
                last_micro = (
                    micro + 1 == self.cfg.grad_accum_steps
                    or self.batch_in_epoch + 1 == self.batches_per_epoch
                )
                self._micro_batch(batch, sync=last_micro, window=window)
                micro += 1
                self.batch_in_epoch += 1
                bar.update(1)
                if not last_micro:
                    continue
                micro = 0
                if self._window_was_finite(window):
                    self._optimizer_step()
                    self.nonfinite_streak = 0
                    self.global_step += 1
                    stopped_early, interrupted = self._after_step(window, bar, stop_after_steps)
                else:
                    self._guard.restore(saved)
                    self._handle_nonfinite()
                window.reset_step()
                saved = self._guard.save()
                if stopped_early or interrupted or self.stop_requested:
                    break
        finally:
            # An error message printed next must start on its own line, not after the bar.
            bar.close()
        if interrupted or self.stop_requested:
            if self._latest_position != self._position():  # not saved at this step already
                # The state of the boundary just passed: nothing of a next step has run.
                self._save("latest.pt")
        elif self.batch_in_epoch >= self.batches_per_epoch:
            stopped_early = self._end_epoch() or stopped_early
        return stopped_early, interrupted

    def _after_step(
        self, window: StepWindow, bar: Any, stop_after_steps: int | None
    ) -> tuple[bool, bool]:
        """Logging, step-cadence evaluation and saves; returns (stopped early, interrupted)."""
        cfg = self.cfg
        if (
            self.global_step % max(1, cfg.log_every_steps) == 0
            or self.batch_in_epoch == self.batches_per_epoch
        ):
            self._log_window(window, bar)
        stopped_early = False
        if cfg.eval_every_steps and self.global_step % cfg.eval_every_steps == 0:
            stopped_early = self._evaluate_and_select()
            self.train_model.train()
        if cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0:
            self._save("latest.pt")
        interrupted = stop_after_steps is not None and self.global_step >= stop_after_steps
        return stopped_early, interrupted

    def _log_window(self, window: StepWindow, bar: Any) -> None:
        """The only host sync of the loss: mean over every rank's micro-batches of the window."""
        totals = torch.stack([window.loss_sum, window.count])
        if self.dist.enabled:
            totals = self.fabric.all_reduce(totals, reduce_op="sum")
        loss_sum, count = totals.tolist()
        mean_loss = loss_sum / max(count, 1.0)
        elapsed = max(time.perf_counter() - window.t0, 1e-9)
        throughput = window.samples * self.dist.world_size / elapsed
        scalars = {
            "train/loss": mean_loss,
            "train/samples_per_s": throughput,
            **{f"train/{k}": v for k, v in window.extras_means().items()},
        }
        for i, group in enumerate(self.optimizer.param_groups):
            scalars[f"lr/{group.get('name', i)}"] = group["lr"]
        self.logger.log_scalars(scalars, self.global_step)
        bar.set_postfix(loss=f"{mean_loss:.4f}", samples_s=f"{throughput:.1f}")
        window.reset_log()

    def _end_epoch(self) -> bool:
        """Epoch-end scheduler step, evaluation and latest.pt; True means stop early."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.StepLR):
            self.scheduler.step()
        stopped_early = False
        if not self.cfg.eval_every_steps and self.evaluate_fn is not None:
            stopped_early = self._evaluate_and_select()
        self.epoch += 1
        self.batch_in_epoch = 0
        due = time.monotonic() - self._latest_time >= self.cfg.save_interval_s
        if due or stopped_early or self.stop_requested or self.epoch >= self.cfg.epochs:
            self._save("latest.pt")
        return stopped_early

    def _evaluate_and_select(self) -> bool:
        """Evaluate, keep the best, and hear of a signal that came meanwhile: an evaluation
        runs to its end (its collectives cannot be left half-way by some ranks)."""
        stopped_early = self._after_eval(self.evaluate())
        self._agree_to_stop()
        return stopped_early
