"""One training loop for every task package.

The task supplies a model, a dataset, a ``step_fn(model, batch) -> loss`` and optionally an
``evaluate_fn(model, ctx) -> metrics``; the Trainer owns everything that is the same in every
task: AMP, gradient accumulation and clipping, optimiser and scheduler, DDP, evaluation
cadence, best/latest/final checkpoints, exact resume, the NaN guard, progress and logging.

Exact resume: the batch order of an epoch depends only on ``(seed, epoch)``, the global RNG
states are saved with every checkpoint, and the DataLoader never draws from the global RNG,
so on CPU a run resumed from step k ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm

from medcore import distributed as dist_utils
from medcore.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint, unwrap_model
from medcore.device import AmpPolicy, amp_policy, autocast, device_defaults
from medcore.errors import CheckpointError, TrainingDiverged, UserError
from medcore.logging import RunLogger

StepOutput = torch.Tensor | tuple[torch.Tensor, dict[str, float]]
StepFn = Callable[[nn.Module, Any], StepOutput]


@dataclass
class TrainerConfig:
    """Training-loop settings shared by every package (the ``trainer:`` section of a config)."""

    epochs: int = 10
    batch_size: int | None = None  # None: the device default (CUDA 16, MPS 8, CPU 4)
    num_workers: int | None = None  # None: the device default (CUDA 8, MPS 0, CPU 2)
    max_steps_per_epoch: int | None = None  # cap batches per epoch (CPU-sized demos, --smoke)
    drop_last: bool = False
    grad_accum_steps: int = 1
    grad_clip: float | None = None
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    momentum: float = 0.9
    scheduler: Literal["cosine", "plateau", "step", "none"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    step_size: int = 10  # epochs, for the step scheduler
    gamma: float = 0.1
    plateau_patience: int = 3
    plateau_factor: float = 0.5
    amp: bool = True
    amp_dtype: str = "auto"
    eval_every_steps: int = 0  # 0: evaluate at the end of every epoch
    monitor: list[str] = field(default_factory=lambda: ["val/loss"])  # first present one is used
    monitor_mode: Literal["max", "min"] = "min"
    early_stopping_patience: int = 0  # evaluations without improvement; 0 disables
    checkpoint_prefix: str = "model"
    best_name: str | None = None  # fixed file name for the best checkpoint, e.g. phase1_best.pt
    save_every_steps: int = 0  # extra latest.pt saves inside an epoch (0: epoch ends only)
    log_every_steps: int = 10
    max_nonfinite_steps: int = 5
    channels_last: bool = False
    compile: bool = False
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        if self.grad_accum_steps < 1:
            raise ValueError("grad_accum_steps must be >= 1")
        if self.epochs < 0:
            raise ValueError("epochs must be >= 0")


@dataclass
class EvalContext:
    """What an ``evaluate_fn`` may need besides the model."""

    epoch: int
    global_step: int
    device: torch.device
    amp: AmpPolicy
    logger: RunLogger
    run_dir: Path


@dataclass
class TrainResult:
    best_metric: float | None
    best_metric_name: str | None
    best_path: Path | None
    final_path: Path | None
    global_step: int
    epochs_completed: int
    stopped_early: bool
    history: list[dict[str, float]]


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


class _SkipBatches(Sampler[list[int]]):
    """The batches of ``inner`` after the first ``skip`` (resume inside an epoch, no data read)."""

    def __init__(self, inner: Iterable[list[int]], skip: int, limit: int) -> None:
        self.inner, self.skip, self.limit = inner, skip, limit

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.inner), self.skip, self.limit)

    def __len__(self) -> int:
        return max(0, self.limit - self.skip)


def _seed_worker(worker_id: int) -> None:
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


def rng_state() -> dict[str, Any]:
    """All global RNG states, as tensors and primitives (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _monitor_value(metrics: dict[str, float], names: Sequence[str]) -> tuple[str, float] | None:
    """The first metric of ``names`` present and finite in ``metrics`` (fallback order)."""
    for name in names:
        value = metrics.get(name)
        if value is not None and math.isfinite(float(value)):
            return name, float(value)
    return None


class Trainer:
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
        self.dist = dist_utils.DistInfo(
            rank=dist_utils.get_rank(), local_rank=0, world_size=dist_utils.get_world_size()
        )
        self.is_main = self.dist.is_main
        self.show_progress = show_progress and self.is_main
        self.logger = logger or RunLogger(self.run_dir, enabled=self.is_main)
        self.amp = amp_policy(device, cfg.amp, cfg.amp_dtype)
        defaults = device_defaults(device)
        self.batch_size = cfg.batch_size or defaults.batch_size
        self.num_workers = defaults.num_workers if cfg.num_workers is None else cfg.num_workers

        model = model.to(device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = self._build_optimizer(param_groups)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp.use_scaler)
        self.batches_per_epoch = self._batches_per_epoch()
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum_steps)
        self.total_steps = max(1, self.steps_per_epoch * cfg.epochs)
        self.scheduler = self._build_scheduler()

        train_model: nn.Module = model
        if self.dist.enabled:
            train_model = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )
        if cfg.compile:
            train_model = torch.compile(train_model)
        self.train_model = train_model

        # Loop state (all of it goes into checkpoints).
        self.epoch = 0
        self.batch_in_epoch = 0
        self.global_step = 0
        self.best_value: float | None = None
        self.best_name: str | None = None
        self.best_path: Path | None = None
        self.bad_evals = 0
        self.nonfinite_streak = 0
        self.history: list[dict[str, float]] = []
        self.last_good_checkpoint: Path | None = None
        self._latest_position: tuple[int, int, int] | None = None  # of our last latest.pt

    # -- construction ---------------------------------------------------------------------
    def _build_optimizer(self, param_groups: list[dict[str, Any]] | None) -> torch.optim.Optimizer:
        cfg = self.cfg
        if param_groups is None:
            param_groups = [
                {"params": [p for p in self.model.parameters() if p.requires_grad], "name": "all"}
            ]
        groups = []
        for group in param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            if params:
                groups.append({**group, "params": params})
        if not groups:
            raise UserError("model", "has no trainable parameters")
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adam":
            return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )

    def _build_scheduler(self) -> Any:
        cfg = self.cfg
        if cfg.scheduler == "cosine":
            warmup = cfg.warmup_steps or int(cfg.warmup_ratio * self.total_steps)
            total, floor = self.total_steps, cfg.min_lr_ratio

            def factor(step: int) -> float:
                if warmup and step < warmup:
                    return (step + 1) / warmup
                progress = min(1.0, (step - warmup) / max(1, total - warmup))
                return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

            return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        if cfg.scheduler == "step":
            return torch.optim.lr_scheduler.StepLR(
                self.optimizer, step_size=cfg.step_size, gamma=cfg.gamma
            )
        if cfg.scheduler == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer,
                mode=cfg.monitor_mode,
                factor=cfg.plateau_factor,
                patience=cfg.plateau_patience,
            )
        return None

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
        return BatchSampler(inner, self.batch_size, drop_last=self.cfg.drop_last)

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
        batches = _SkipBatches(self._base_batch_sampler(epoch), skip, self.batches_per_epoch)
        # An explicit generator keeps the loader from drawing on the global RNG (exact resume)
        # and makes worker seeds a function of (seed, epoch).
        gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.utils.data.DataLoader(
            self.train_data,
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_seed_worker,
            generator=gen,
            persistent_workers=False,
        )

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "best": {
                "value": self.best_value,
                "name": self.best_name,
                "path": str(self.best_path) if self.best_path else None,
            },
            "bad_evals": self.bad_evals,
            "history": self.history,
            "saved_at": _dt.datetime.now().isoformat(timespec="seconds"),
            **self.extra_state,
        }

    def _position(self) -> tuple[int, int, int]:
        return (self.global_step, self.epoch, self.batch_in_epoch)

    def _save(self, name: str) -> Path | None:
        if not self.is_main:
            return None
        if (
            name == "final.pt"
            and self.last_good_checkpoint is not None
            and self._latest_position == self._position()
        ):
            # Nothing changed since latest.pt (the end of the last epoch): reuse it, do not
            # serialise the same state again (a full model + optimizer write).
            return copy_checkpoint(self.last_good_checkpoint, self.ckpt_dir / name)
        path = save_checkpoint(self.state_dict(), self.ckpt_dir / name, kind=self.kind)
        if name == "latest.pt":
            self.last_good_checkpoint = path
            self._latest_position = self._position()
        return path

    def load_state(self, path: str | Path) -> None:
        """Restore everything needed to continue a run exactly where ``path`` left it."""
        state = load_checkpoint(path, map_location="cpu", kind=self.kind)
        missing = [
            k for k in ("model", "optimizer", "epoch", "global_step", "rng") if k not in state
        ]
        if missing:
            raise CheckpointError(
                path, f"not a resumable training checkpoint (missing {', '.join(missing)})"
            )
        try:
            unwrap_model(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                path, f"does not match this model/config ({str(exc).splitlines()[0][:160]})"
            ) from None
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.global_step = int(state["global_step"])
        best = state.get("best") or {}
        self.best_value = best.get("value")
        self.best_name = best.get("name")
        self.best_path = Path(best["path"]) if best.get("path") else None
        self.bad_evals = int(state.get("bad_evals", 0))
        self.history = list(state.get("history", []))
        set_rng_state(state["rng"])
        self.last_good_checkpoint = Path(path)

    def _best_filename(self, epoch: int, value: float) -> str:
        if self.cfg.best_name:
            return self.cfg.best_name
        date = _dt.date.today().strftime("%Y%m%d")
        return f"{self.cfg.checkpoint_prefix}_{date}_epoch={epoch:03d}_metric={value:.4f}.pt"

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Run ``evaluate_fn`` on rank 0 and share its metrics with every rank."""
        metrics: dict[str, float] = {}
        if self.evaluate_fn is not None and self.is_main:
            model = unwrap_model(self.model)
            was_training = model.training
            model.eval()
            ctx = EvalContext(
                self.epoch, self.global_step, self.device, self.amp, self.logger, self.run_dir
            )
            with torch.no_grad():
                metrics = {k: float(v) for k, v in self.evaluate_fn(model, ctx).items()}
            model.train(was_training)
        return dist_utils.broadcast_object(metrics)

    def _after_eval(self, metrics: dict[str, float]) -> bool:
        """Log, pick the best checkpoint, step the plateau scheduler; True means stop early."""
        record = {"epoch": self.epoch, "step": self.global_step, **metrics}
        self.history.append(record)
        self.logger.log_scalars(metrics, self.global_step)
        self.logger.log_jsonl({"event": "eval", **record})
        chosen = _monitor_value(metrics, self.cfg.monitor)
        if chosen is None:
            return False
        name, value = chosen
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(value)
        better = (
            self.best_value is None
            or name != self.best_name
            or (
                value > self.best_value
                if self.cfg.monitor_mode == "max"
                else value < self.best_value
            )
        )
        if better:
            self.best_value, self.best_name = value, name
            previous = self.best_path
            self.best_path = self.ckpt_dir / self._best_filename(self.epoch, value)
            self._save(self.best_path.name)
            if (
                self.is_main
                and previous is not None
                and previous != self.best_path
                and previous.exists()
            ):
                previous.unlink()
            self.bad_evals = 0
            return False
        self.bad_evals += 1
        patience = self.cfg.early_stopping_patience
        return bool(patience) and self.bad_evals >= patience

    # -- the loop -------------------------------------------------------------------------
    def _nonfinite_everywhere(self, loss: torch.Tensor) -> bool:
        flag = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=self.device)
        if self.dist.enabled:
            torch.distributed.all_reduce(flag)
        return bool(flag.item() > 0)

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
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            self.scheduler.step()

    def fit(
        self, resume: str | Path | None = None, stop_after_steps: int | None = None
    ) -> TrainResult:
        """Train for ``cfg.epochs``; ``resume`` continues from a checkpoint.

        ``stop_after_steps`` ends the run after that many optimizer steps as if interrupted
        (latest.pt written, no final checkpoint): used to test exact resume.
        """
        if resume is not None:
            self.load_state(resume)
        cfg = self.cfg
        accum = cfg.grad_accum_steps
        stopped_early = False
        interrupted = False
        bar = None
        self.logger.log_jsonl(
            {
                "event": "start",
                "epochs": cfg.epochs,
                "batches_per_epoch": self.batches_per_epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "amp": self.amp.name,
                "batch_size": self.batch_size,
                "world_size": self.dist.world_size,
            }
        )
        try:
            while self.epoch < cfg.epochs and not stopped_early:
                if self.on_epoch_start is not None:
                    self.on_epoch_start(self.epoch)
                self.train_model.train()
                loader = self._loader(self.epoch, self.batch_in_epoch)
                bar = tqdm(
                    total=self.batches_per_epoch,
                    initial=self.batch_in_epoch,
                    disable=not self.show_progress,
                    desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                    dynamic_ncols=True,
                    leave=False,
                )
                window_loss, window_n, window_samples, t0 = 0.0, 0, 0, time.perf_counter()
                micro = 0
                for batch in loader:
                    batch = move_to_device(batch, self.device, cfg.channels_last)
                    last_micro = (
                        micro + 1 == accum or self.batch_in_epoch + 1 == self.batches_per_epoch
                    )
                    sync_ctx = (
                        self.train_model.no_sync()
                        if self.dist.enabled
                        and not last_micro
                        and hasattr(self.train_model, "no_sync")
                        else contextlib.nullcontext()
                    )
                    # Buffers (BatchNorm running stats) are updated by the forward pass itself;
                    # a skipped non-finite step must not leave NaN in them.
                    saved_buffers = [b.detach().clone() for b in self.model.buffers()]
                    with sync_ctx:
                        with autocast(self.device, self.amp):
                            out = self.step_fn(self.train_model, batch)
                        loss, extras = out if isinstance(out, tuple) else (out, {})
                        if self._nonfinite_everywhere(loss):
                            with torch.no_grad():
                                for buf, saved in zip(
                                    self.model.buffers(), saved_buffers, strict=True
                                ):
                                    buf.copy_(saved)
                            self._handle_nonfinite()
                            micro = 0
                            self.batch_in_epoch += 1
                            bar.update(1)
                            continue
                        self.scaler.scale(loss.float() / accum).backward()
                    micro += 1
                    self.batch_in_epoch += 1
                    window_loss += float(loss.detach())
                    window_n += 1
                    window_samples += batch_size_of(batch)
                    bar.update(1)
                    if not last_micro:
                        continue
                    micro = 0
                    self._optimizer_step()
                    self.nonfinite_streak = 0
                    self.global_step += 1
                    if (
                        self.global_step % max(1, cfg.log_every_steps) == 0
                        or self.batch_in_epoch == self.batches_per_epoch
                    ):
                        elapsed = max(time.perf_counter() - t0, 1e-9)
                        mean_loss = float(
                            dist_utils.all_reduce_mean(torch.tensor(window_loss / max(window_n, 1)))
                        )
                        throughput = window_samples * self.dist.world_size / elapsed
                        scalars = {
                            "train/loss": mean_loss,
                            "train/samples_per_s": throughput,
                            **{f"train/{k}": float(v) for k, v in extras.items()},
                        }
                        for i, group in enumerate(self.optimizer.param_groups):
                            scalars[f"lr/{group.get('name', i)}"] = group["lr"]
                        self.logger.log_scalars(scalars, self.global_step)
                        bar.set_postfix(loss=f"{mean_loss:.4f}", samples_s=f"{throughput:.1f}")
                        window_loss, window_n, window_samples, t0 = 0.0, 0, 0, time.perf_counter()
                    if cfg.eval_every_steps and self.global_step % cfg.eval_every_steps == 0:
                        stopped_early = self._after_eval(self.evaluate())
                        self.train_model.train()
                    if cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0:
                        self._save("latest.pt")
                    if stop_after_steps is not None and self.global_step >= stop_after_steps:
                        interrupted = True
                        break
                    if stopped_early:
                        break
                bar.close()
                if interrupted:
                    self._save("latest.pt")
                    break
                if self.batch_in_epoch >= self.batches_per_epoch:
                    if isinstance(self.scheduler, torch.optim.lr_scheduler.StepLR):
                        self.scheduler.step()
                    if not cfg.eval_every_steps and self.evaluate_fn is not None:
                        stopped_early = self._after_eval(self.evaluate())
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    self._save("latest.pt")
        except KeyboardInterrupt:
            # Keep what finished: the state at the last completed optimizer step.
            if self.batch_in_epoch % accum == 0:
                self._save("latest.pt")
            raise
        finally:
            # An error message printed next must start on its own line, not after the bar.
            if bar is not None:
                bar.close()
        final_path = None
        if not interrupted:
            final_path = self._save("final.pt")
            if stopped_early:
                self.logger.log_jsonl(
                    {"event": "early_stop", "epoch": self.epoch, "step": self.global_step}
                )
        dist_utils.barrier()
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
