"""One training loop for every task package.

The task supplies a model, a dataset, a ``step_fn(model, batch) -> loss`` and optionally an
``evaluate_fn(model, ctx) -> metrics``; the Trainer owns everything that is the same in every
task: gradient accumulation and clipping, optimiser and scheduler, evaluation cadence,
best/latest/final checkpoints, exact resume, the NaN guard, progress and logging. Devices,
precision, strategies (DDP, FSDP) and collectives are those of the Lightning Fabric it is given
(the run's one, :func:`medcore.cli.run_setup.start_run`; ``fabric.setup``, ``fabric.backward``,
``no_backward_sync``, ``clip_gradients``).

Where the pieces live: ``EvalContext``, ``TrainResult`` and ``Stop`` in
:mod:`medcore.engine.task`; batch order and seeded loading in :mod:`medcore.engine.batching` and
:mod:`medcore.engine.loader` (the :class:`~medcore.engine.loader.TrainLoader`); RNG states in
:mod:`medcore.engine.rng`; the loop state, checkpoints and resume in
:mod:`medcore.engine.checkpointing` (:class:`~medcore.engine.checkpointing.LoopState`, the
:class:`~medcore.engine.checkpointing.Checkpointer`); evaluation and the monitored metric in
:mod:`medcore.engine.evaluation`; optimizer and schedule in :mod:`medcore.engine.optim`; the
per-step loss window and NaN guard in :mod:`medcore.engine.step_window`; SIGINT/SIGTERM/SIGUSR1
in :mod:`medcore.runtime.interrupts` (the loop stops at a step boundary, see
:meth:`Trainer.fit`). This module is the loop.

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

Loop cost: loss, sample counts and the step function's extras stay on the device and are
synchronised only at logging steps; the NaN check is one host sync per optimizer step; only normalisation buffers (the ones
a forward pass updates) are copied for the NaN guard, and only when the model has any.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from medcore.config import TrainerConfig
from medcore.engine.batching import batch_size_of, move_to_device
from medcore.engine.checkpointing import Best, Checkpointer, LoopState
from medcore.engine.evaluation import evaluate, improves, monitor_value
from medcore.engine.loader import TrainLoader
from medcore.engine.optim import Schedule, build_optimizer, build_scheduler
from medcore.engine.run_log import RunLogger
from medcore.engine.step_window import BufferGuard, StepWindow
from medcore.engine.task import EvalContext, EvaluateFn, StepFn, Stop, TrainResult
from medcore.errors import TrainingDiverged
from medcore.runtime import interrupts
from medcore.runtime.device import AmpPolicy, device_defaults, precision_policy
from medcore.runtime.distributed import DistInfo, is_fsdp
from medcore.weights.checkpoint import release_spares, unwrap_model

if TYPE_CHECKING:
    from lightning_fabric import Fabric


class Trainer:
    """Fits ``model`` on ``train_data`` with ``step_fn`` on ``fabric``; see the module docstring.

    ``cfg``'s precision, strategy and device settings are the Fabric's to apply (the run built
    it from the same ``trainer:`` section); the Trainer reads the loop's settings.
    """

    cfg: TrainerConfig
    fabric: Fabric
    dist: DistInfo
    device: torch.device
    precision: str  # Fabric's precision, e.g. "bf16-mixed"
    amp: AmpPolicy  # the autocast an evaluate_fn runs under (ctx.amp)
    model: nn.Module  # the task's module, on the device
    train_model: nn.Module  # Fabric's wrapper of it (DDP, FSDP), which the loop trains
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    data: TrainLoader
    checkpoints: Checkpointer
    logger: RunLogger
    state: LoopState  # where the loop is: all a checkpoint restores
    step_fn: StepFn
    evaluate_fn: EvaluateFn | None
    on_epoch_start: Callable[[int], None] | None
    run_dir: Path
    show_progress: bool  # a tqdm bar on rank 0
    steps_per_epoch: int
    total_steps: int
    _guard: BufferGuard  # the normalisation buffers a skipped non-finite step restores
    _step_optimizer: torch.optim.Optimizer  # Fabric's wrapper of ``optimizer``, which steps
    _stop_requested: bool  # a signal asked every rank to stop (the ranks agreed)

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainerConfig,
        *,
        fabric: Fabric,
        train_data: Dataset,
        step_fn: StepFn,
        run_dir: str | Path,
        kind: str,
        evaluate_fn: EvaluateFn | None = None,
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
        self.fabric = fabric
        self.dist = DistInfo(fabric.global_rank, fabric.local_rank, fabric.world_size)
        self.device = fabric.device
        self.precision = fabric.strategy.precision.precision
        self.amp = precision_policy(self.precision)
        self.step_fn = step_fn
        self.evaluate_fn = evaluate_fn
        self.on_epoch_start = on_epoch_start
        self.run_dir = Path(run_dir)
        self.show_progress = show_progress and self.dist.is_main
        self.logger = logger or RunLogger(self.run_dir, enabled=self.dist.is_main)
        defaults = device_defaults(self.device)
        self.data = TrainLoader(
            train_data,
            cfg,
            batch_size=cfg.batch_size or defaults.batch_size,
            num_workers=defaults.num_workers if cfg.num_workers is None else cfg.num_workers,
            seed=seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            device=self.device,
            collate_fn=collate_fn,
            batch_sampler=batch_sampler,
        )

        model = model.to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._guard = BufferGuard(model)
        if is_fsdp(fabric):
            # FSDP flattens the parameters: the optimizer is built on the sharded module.
            self.train_model = fabric.setup_module(model)
            self.optimizer = build_optimizer(cfg, model, param_groups, self.train_model)
            self._step_optimizer = fabric.setup_optimizers(self.optimizer)
        else:
            self.optimizer = build_optimizer(cfg, model, param_groups)
            self.train_model, self._step_optimizer = fabric.setup(model, self.optimizer)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.steps_per_epoch = math.ceil(self.data.batches_per_epoch / cfg.grad_accum_steps)
        self.total_steps = max(1, self.steps_per_epoch * cfg.epochs)
        self.schedule = build_scheduler(cfg, self.optimizer, self.total_steps)
        self.checkpoints = Checkpointer(
            fabric,
            model,
            self.train_model,
            self.optimizer,
            self.schedule,
            cfg,
            directory=self.run_dir / "checkpoints",
            kind=kind,
            seed=seed,
            extra_state=extra_state or {},
        )
        self.state = LoopState()
        self._stop_requested = False

    @property
    def batch_size(self) -> int:
        return self.data.batch_size

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
        signal reached any rank. One all-reduce, one host sync."""
        if not self.dist.enabled:
            self._stop_requested = self._stop_requested or interrupts.requested()
            return not bool(window.nonfinite.item() > 0)
        asked = window.nonfinite.new_full((), float(interrupts.requested()))
        flags = self.fabric.all_reduce(torch.stack([window.nonfinite, asked]), reduce_op="sum")
        bad, stop = flags.tolist()
        self._stop_requested = self._stop_requested or stop > 0
        return not bad > 0

    def _agree_to_stop(self) -> None:
        """After an evaluation: whether a signal reached any rank while it ran."""
        asked = interrupts.requested()
        if self.dist.enabled:
            flag = torch.tensor(float(asked), device=self.device)
            asked = bool(self.fabric.all_reduce(flag, reduce_op="sum").item() > 0)
        self._stop_requested = self._stop_requested or asked

    def _handle_nonfinite(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        state = self.state
        state.nonfinite_streak += 1
        msg = (
            f"non-finite loss at step {state.global_step}; step skipped "
            f"({state.nonfinite_streak} in a row)"
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        self.logger.log_jsonl(
            {"event": "nonfinite_loss", "step": state.global_step, "streak": state.nonfinite_streak}
        )
        if state.nonfinite_streak >= self.cfg.max_nonfinite_steps:
            last = self.checkpoints.last_good
            where = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
            raise TrainingDiverged(
                "training",
                f"loss was NaN/inf for {state.nonfinite_streak} consecutive steps; stopped ({where})",
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
        self.schedule.step("step")

    # -- the loop -------------------------------------------------------------------------
    def fit(self, resume: str | Path | None = None) -> TrainResult:
        """Train for ``cfg.epochs``; ``resume`` continues from a ``latest.pt``.

        SIGINT, SIGTERM and SIGUSR1 (and :func:`medcore.runtime.interrupts.request_stop`) stop
        it at the next optimizer-step boundary, or after the evaluation that is running: every
        rank stops there, ``latest.pt`` is written with the state of that boundary, and
        :class:`medcore.runtime.interrupts.Interrupted` is raised. ``--resume latest`` then
        continues exactly as if nothing had happened.
        """
        self._stop_requested = False
        if resume is not None:
            self.state = self.checkpoints.load(resume)
        self.logger.log_jsonl(
            {
                "event": "start",
                "epochs": self.cfg.epochs,
                "batches_per_epoch": self.data.batches_per_epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "amp": self.amp.name,
                "precision": self.precision,
                "strategy": type(self.fabric.strategy).__name__,
                "batch_size": self.batch_size,
                "world_size": self.dist.world_size,
                "save_interval_s": self.cfg.save_interval_s,
            }
        )
        self.checkpoints.latest_time = time.monotonic()
        try:
            with interrupts.deferred():
                stop = self._fit_epochs()
                if stop is not Stop.INTERRUPTED:  # a signal during the last save or barrier
                    self._agree_to_stop()
                reason = interrupts.signal_name()
        finally:
            if self.dist.is_main:  # the hidden spare files of the checkpoint writes
                release_spares(self.checkpoints.directory)
        if stop is Stop.INTERRUPTED or self._stop_requested:
            raise interrupts.Interrupted(reason)
        state = self.state
        return TrainResult(
            stop=stop,
            best_metric=state.best.value,
            best_metric_name=state.best.name,
            best_path=Path(state.best.path) if state.best.path else None,
            final_path=self.checkpoints.directory / "final.pt" if self.dist.is_main else None,
            global_step=state.global_step,
            epochs_completed=state.epoch,
            history=state.history,
        )

    def _fit_epochs(self) -> Stop:
        """The epochs left, then final.pt unless interrupted."""
        patience = self.cfg.early_stopping_patience
        # Resumed from the checkpoint of an early stop: the decision stands.
        stop = Stop.EARLY_STOP if patience and self.state.bad_evals >= patience else None
        try:
            while stop is None and self.state.epoch < self.cfg.epochs:
                stop = self._run_epoch()
        finally:
            self.data.close()
        if stop is Stop.INTERRUPTED:
            return stop
        self.checkpoints.save("final.pt", self.state)
        if stop is Stop.EARLY_STOP:
            self.logger.log_jsonl(
                {"event": "early_stop", "epoch": self.state.epoch, "step": self.state.global_step}
            )
        return stop or Stop.COMPLETED

    def _run_epoch(self) -> Stop | None:
        """Train the rest of the current epoch; why training stops, or None to go on."""
        state = self.state
        if self.on_epoch_start is not None:
            self.on_epoch_start(state.epoch)
        self.train_model.train()
        bar = tqdm(
            total=self.data.batches_per_epoch,
            initial=state.batch_in_epoch,
            disable=not self.show_progress,
            desc=f"epoch {state.epoch + 1}/{self.cfg.epochs}",
            dynamic_ncols=True,
            leave=False,
        )
        stop = None
        try:
            window = StepWindow(self.device)
            saved = self._guard.save()
            micro = 0
            for batch in self.data.epoch(state.epoch, state.batch_in_epoch):
                batch = move_to_device(batch, self.device, self.cfg.channels_last)
                last_micro = (
                    micro + 1 == self.cfg.grad_accum_steps
                    or state.batch_in_epoch + 1 == self.data.batches_per_epoch
                )
                self._micro_batch(batch, sync=last_micro, window=window)
                micro += 1
                state.batch_in_epoch += 1
                bar.update(1)
                if not last_micro:
                    continue
                micro = 0
                if self._window_was_finite(window):
                    self._optimizer_step()
                    state.nonfinite_streak = 0
                    state.global_step += 1
                    stop = self._after_step(window, bar)
                else:
                    self._guard.restore(saved)
                    self._handle_nonfinite()
                window.reset_step()
                saved = self._guard.save()
                if stop is not None or self._stop_requested:
                    break
        finally:
            # An error message printed next must start on its own line, not after the bar.
            bar.close()
        if state.batch_in_epoch >= self.data.batches_per_epoch and not self._stop_requested:
            stop = self._end_epoch() or stop
        if self._stop_requested:  # during the epoch, or during its closing evaluation
            if self.checkpoints.latest_at != state.position():  # not saved at this step already
                # The state of the boundary just passed: nothing of a next step has run.
                self.checkpoints.save("latest.pt", state)
            return Stop.INTERRUPTED
        return stop

    def _after_step(self, window: StepWindow, bar: Any) -> Stop | None:
        """Logging, step-cadence evaluation and saves."""
        cfg, state = self.cfg, self.state
        if (
            state.global_step % max(1, cfg.log_every_steps) == 0
            or state.batch_in_epoch == self.data.batches_per_epoch
        ):
            self._log_window(window, bar)
        stop = None
        if cfg.eval_every_steps and state.global_step % cfg.eval_every_steps == 0:
            stop = self._evaluate_and_select()
            self.train_model.train()
        if cfg.save_every_steps and state.global_step % cfg.save_every_steps == 0:
            self.checkpoints.save("latest.pt", state)
        return stop

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
        self.logger.log_scalars(scalars, self.state.global_step)
        bar.set_postfix(loss=f"{mean_loss:.4f}", samples_s=f"{throughput:.1f}")
        window.reset_log()

    def _end_epoch(self) -> Stop | None:
        """Epoch-end scheduler step, evaluation and latest.pt."""
        state = self.state
        self.schedule.step("epoch")
        stop = None
        if not self.cfg.eval_every_steps and self.evaluate_fn is not None:
            stop = self._evaluate_and_select()
        state.epoch += 1
        state.batch_in_epoch = 0
        due = time.monotonic() - self.checkpoints.latest_time >= self.cfg.save_interval_s
        if due or stop or self._stop_requested or state.epoch >= self.cfg.epochs:
            self.checkpoints.save("latest.pt", state)
        return stop

    def evaluate(self) -> dict[str, float]:
        """``evaluate_fn`` on every rank (:func:`medcore.engine.evaluation.evaluate`); rank 0's
        metrics for all."""
        if self.evaluate_fn is None:
            return {}
        # FSDP's forward needs every rank's shards: evaluate the wrapped module there.
        model = self.train_model if is_fsdp(self.fabric) else unwrap_model(self.model)
        state = self.state
        ctx = EvalContext(
            state.epoch,
            state.global_step,
            self.device,
            self.amp,
            self.logger,
            self.run_dir,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        return evaluate(self.evaluate_fn, model, ctx, self.fabric)

    def _evaluate_and_select(self) -> Stop | None:
        """Evaluate, log, keep the best checkpoint, step the plateau scheduler, and hear of a
        signal that came meanwhile: an evaluation runs to its end (its collectives cannot be
        left half-way by some ranks)."""
        metrics = self.evaluate()
        stop = self._select(metrics)
        self._agree_to_stop()
        return stop

    def _select(self, metrics: dict[str, float]) -> Stop | None:
        state, cfg = self.state, self.cfg
        record = {"epoch": state.epoch, "step": state.global_step, **metrics}
        state.history.append(record)
        self.logger.log_scalars(metrics, state.global_step)
        self.logger.log_jsonl({"event": "eval", **record})
        chosen = monitor_value(metrics, cfg.monitor)
        if chosen is None:
            return None
        name, value = chosen
        self.schedule.step("metric", value)
        if improves(state.best, name, value, cfg.monitor_mode):
            previous = Path(state.best.path) if state.best.path else None
            path = self.checkpoints.directory / self.checkpoints.best_filename(state.epoch, value)
            state.best = Best(value, name, str(path))
            state.bad_evals = 0
            self.checkpoints.save(path.name, state)
            if self.dist.is_main and previous not in (None, path) and previous.exists():
                previous.unlink()
            return None
        state.bad_evals += 1
        patience = cfg.early_stopping_patience
        return Stop.EARLY_STOP if patience and state.bad_evals >= patience else None
