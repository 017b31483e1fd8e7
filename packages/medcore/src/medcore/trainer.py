"""One training loop for every task package.

The task supplies a model, a dataset, a ``step_fn(model, batch) -> loss`` and optionally an
``evaluate_fn(model, ctx) -> metrics``; the Trainer owns everything that is the same in every
task: precision, gradient accumulation and clipping, optimiser and scheduler, DDP/FSDP,
evaluation cadence, best/latest/final checkpoints, exact resume, the NaN guard, progress and
logging. Devices, precision, strategies and collectives are Lightning Fabric's
(``fabric.setup``, ``fabric.backward``, ``no_backward_sync``, ``clip_gradients``).

Exact resume: the batch order of an epoch depends only on ``(seed, epoch)``, every rank's
global RNG states are saved with every checkpoint, and the DataLoader never draws from the
global RNG, so on CPU a run resumed from step k ends with the same weights as an uninterrupted
run (with ``num_workers > 0`` and persistent workers, the workers' own random streams restart).

Loop cost: loss and sample counts stay on the device and are synchronised only at logging
steps; the NaN check is one host sync per optimizer step; only normalisation buffers (the ones
a forward pass updates) are copied for the NaN guard, and only when the model has any.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, Sampler, Subset
from tqdm.auto import tqdm

from medcore import distributed as dist_utils
from medcore.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint, unwrap_model
from medcore.device import AmpPolicy, device_defaults, precision_policy
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
    # A last training batch with fewer samples than this (per rank) is dropped, with a note:
    # BatchNorm cannot normalise one sample (e.g. 1393 images at batch 24 leave 1).
    min_batch_size: int = 2
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
    amp_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
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
    # Fabric: "auto" is one device, or DDP over the launched ranks; "fsdp" shards parameters,
    # gradients and optimizer state across GPUs (ctclip's DINOv2 ViT-L/G, binensemble full).
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    devices: int | None = None  # processes on this machine (--devices); None: 1 or the launcher's
    num_nodes: int = 1  # machines of a torchrun / SLURM job (--num-nodes)
    # Fabric precision ("bf16-mixed", "16-mixed", "32-true", ...); None: from amp / amp_dtype.
    precision: (
        Literal["bf16-mixed", "16-mixed", "32-true", "bf16-true", "16-true", "64-true"] | None
    ) = None
    persistent_workers: bool = True  # keep loader workers across epochs (False: fresh per epoch)

    def __post_init__(self) -> None:
        if self.grad_accum_steps < 1:
            raise ValueError("grad_accum_steps must be >= 1")
        if self.devices is not None and self.devices < 1:
            raise ValueError("devices must be >= 1")
        if self.num_nodes < 1:
            raise ValueError("num_nodes must be >= 1")
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
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, dataset: Dataset) -> Dataset:
        """This rank's contiguous block of ``dataset`` (all of it in a single process).

        Every rank runs ``evaluate_fn``; evaluate ``ctx.shard(val_set)`` and gather the
        predictions with ``medcore.metrics.MetricAccumulator`` (rank order = dataset order),
        and the metrics equal a single process's on the whole set.
        """
        if self.world_size == 1:
            return dataset
        lo, hi = shard_bounds(len(dataset), self.rank, self.world_size)  # type: ignore[arg-type]
        return Subset(dataset, range(lo, hi))


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


class _EpochBatches(Sampler[list[int]]):
    """The batches of one epoch after the first ``skip`` (resume inside an epoch, no data read).

    One object for the whole run, repositioned before each epoch, so that one DataLoader (and
    its persistent workers) serves every epoch.
    """

    def __init__(self, batches_of: Callable[[int], Iterable[list[int]]], limit: int) -> None:
        self.batches_of, self.limit = batches_of, limit
        self.epoch, self.skip = 0, 0

    def position(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batches_of(self.epoch)), self.skip, self.limit)

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


def _guarded_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Buffers that a forward pass updates in place (normalisation running statistics): the
    NaN guard must restore them after a skipped step. Other buffers are left uncopied."""
    out: list[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            out += [b for b in module.buffers(recurse=False) if b is not None]
    return out


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
        self._buffers_to_guard = _guarded_buffers(model)
        if self.fsdp:
            # FSDP flattens the parameters: the optimizer is built on the sharded module.
            self.train_model = self.fabric.setup_module(model)
            self.optimizer = self._build_optimizer(param_groups, self.train_model)
            self._step_optimizer = self.fabric.setup_optimizers(self.optimizer)
        else:
            self.optimizer = self._build_optimizer(param_groups)
            self.train_model, self._step_optimizer = self.fabric.setup(model, self.optimizer)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.batches_per_epoch = self._batches_per_epoch()
        self._note_small_last_batch()
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum_steps)
        self.total_steps = max(1, self.steps_per_epoch * cfg.epochs)
        self.scheduler = self._build_scheduler()
        self._epoch_batches = _EpochBatches(self._base_batch_sampler, self.batches_per_epoch)
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
        self.history: list[dict[str, float]] = []
        self.last_good_checkpoint: Path | None = None
        self._latest_position: tuple[int, int, int] | None = None  # of our last latest.pt

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """Fabric's GradScaler under 16-mixed precision, else None."""
        return getattr(self.fabric.strategy.precision, "scaler", None)

    # -- construction ---------------------------------------------------------------------
    def _build_optimizer(
        self, param_groups: list[dict[str, Any]] | None, sharded: nn.Module | None = None
    ) -> torch.optim.Optimizer:
        cfg = self.cfg
        if param_groups is None:
            param_groups = [
                {"params": [p for p in self.model.parameters() if p.requires_grad], "name": "all"}
            ]
        if sharded is not None:
            param_groups = _regroup(self.model, sharded, param_groups)
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
            # resume); without persistent workers, worker seeds are a function of (seed, epoch).
            self._train_loader = torch.utils.data.DataLoader(
                self.train_data,
                batch_sampler=self._epoch_batches,
                num_workers=self.num_workers,
                collate_fn=self.collate_fn,
                pin_memory=self.device.type == "cuda",
                worker_init_fn=_seed_worker,
                generator=torch.Generator(),
                persistent_workers=persistent,
            )
        if not persistent or self._train_loader._iterator is None:
            self._train_loader.generator.manual_seed(self.seed * 7919 + epoch)
        return self._train_loader

    # -- checkpoints ----------------------------------------------------------------------
    def _model_and_optimizer_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.fsdp:
            # Every rank takes part; rank 0 receives the full (unsharded) tensors on the CPU.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            return get_state_dict(
                self.train_model._forward_module,
                self.optimizer,
                options=StateDictOptions(full_state_dict=True, cpu_offload=True),
            )
        return unwrap_model(self.model).state_dict(), self.optimizer.state_dict()

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint payload; every rank must call it (it gathers each rank's RNG state)."""
        model_state, optimizer_state = self._model_and_optimizer_state()
        rngs = dist_utils.all_gather_object(rng_state())
        scaler = self.scaler
        return {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else {},
            "rng": rngs[0],
            "rng_ranks": rngs,
            "world_size": self.dist.world_size,
            "precision": self.precision,
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
        """Write ``checkpoints/name`` on rank 0; every rank calls it (state gathering)."""
        if (
            name == "final.pt"
            and self.last_good_checkpoint is not None
            and self._latest_position == self._position()
        ):
            # Nothing changed since latest.pt (the end of the last epoch): reuse it, do not
            # serialise the same state again (a full model + optimizer write).
            return (
                copy_checkpoint(self.last_good_checkpoint, self.ckpt_dir / name)
                if self.is_main
                else None
            )
        state = self.state_dict()
        path = self.ckpt_dir / name
        if self.is_main:
            save_checkpoint(state, path, kind=self.kind)
        if name == "latest.pt":
            self.last_good_checkpoint = path
            self._latest_position = self._position()
        return path if self.is_main else None

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
            self._load_model_and_optimizer(state["model"], state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                path, f"does not match this model/config ({str(exc).splitlines()[0][:160]})"
            ) from None
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler is not None:
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
        self._restore_rng(state, path)
        self.last_good_checkpoint = Path(path)

    def _load_model_and_optimizer(self, model_state: Any, optimizer_state: Any) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                self.train_model._forward_module,
                self.optimizer,
                model_state_dict=model_state,
                optim_state_dict=optimizer_state,
                options=StateDictOptions(full_state_dict=True),
            )
            return
        unwrap_model(self.model).load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)

    def _restore_rng(self, state: dict[str, Any], path: str | Path) -> None:
        """Each rank continues its own random streams (dropout, augmentation)."""
        ranks = state.get("rng_ranks")
        world = self.dist.world_size
        if ranks is not None and len(ranks) == world:
            set_rng_state(ranks[self.dist.rank])
        elif (world == 1 and ranks is None) or (ranks is not None and len(ranks) == 1):
            set_rng_state(state["rng"])
        else:
            saved = len(ranks) if ranks is not None else 1
            if self.is_main:
                print(
                    f"warning: {path}: saved by {saved} rank(s), resumed on {world}: the random "
                    "streams restart from the seed; the run continues, not bit-identically",
                    file=sys.stderr,
                )
            seed_everything(self.seed + self.dist.rank + 1_000_003 * self.global_step)

    def _best_filename(self, epoch: int, value: float) -> str:
        if self.cfg.best_name:
            return self.cfg.best_name
        date = _dt.date.today().strftime("%Y%m%d")
        return f"{self.cfg.checkpoint_prefix}_{date}_epoch={epoch:03d}_metric={value:.4f}.pt"

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Run ``evaluate_fn`` on every rank and return rank 0's metrics to all of them.

        No rank waits idle in a collective while another evaluates: each evaluates (its shard,
        with ``ctx.shard``; the whole set otherwise) and the metrics are broadcast afterwards.
        """
        if self.evaluate_fn is None:
            return {}
        # FSDP's forward needs every rank's shards: evaluate the wrapped module there.
        model = self.train_model if self.fsdp else unwrap_model(self.model)
        was_training = model.training
        model.eval()
        ctx = EvalContext(
            self.epoch,
            self.global_step,
            self.device,
            self.amp,
            self.logger,
            self.run_dir,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        with torch.no_grad():
            metrics = {k: float(v) for k, v in self.evaluate_fn(model, ctx).items()}
        model.train(was_training)
        return self.fabric.broadcast(metrics) if self.dist.enabled else metrics

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

    # -- one optimizer step -----------------------------------------------------------------
    def _micro_batch(self, batch: Any, sync: bool, window: _Window) -> None:
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

    def _window_was_finite(self, window: _Window) -> bool:
        """Whether every rank's losses of this optimizer step were finite (one host sync)."""
        bad = window.nonfinite.clone()
        if self.dist.enabled:
            bad = self.fabric.all_reduce(bad, reduce_op="sum")
        return not bool(bad.item() > 0)

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
        """
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
            }
        )
        stopped_early = interrupted = False
        try:
            while self.epoch < self.cfg.epochs and not (stopped_early or interrupted):
                stopped_early, interrupted = self._run_epoch(stop_after_steps)
        except KeyboardInterrupt:
            # Keep what finished: the state at the last completed optimizer step.
            if self.batch_in_epoch % self.cfg.grad_accum_steps == 0 and not self.dist.enabled:
                self._save("latest.pt")
            raise
        final_path = None
        if not interrupted:
            final_path = self._save("final.pt")
            if stopped_early:
                self.logger.log_jsonl(
                    {"event": "early_stop", "epoch": self.epoch, "step": self.global_step}
                )
        if self.dist.enabled:
            self.fabric.barrier()
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
            window = _Window(self.device)
            saved = self._save_buffers()
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
                    self._restore_buffers(saved)
                    self._handle_nonfinite()
                window.reset_step()
                saved = self._save_buffers()
                if stopped_early or interrupted:
                    break
        finally:
            # An error message printed next must start on its own line, not after the bar.
            bar.close()
        if interrupted:
            self._save("latest.pt")
        elif self.batch_in_epoch >= self.batches_per_epoch:
            stopped_early = self._end_epoch() or stopped_early
        return stopped_early, interrupted

    def _after_step(
        self, window: _Window, bar: Any, stop_after_steps: int | None
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
            stopped_early = self._after_eval(self.evaluate())
            self.train_model.train()
        if cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0:
            self._save("latest.pt")
        interrupted = stop_after_steps is not None and self.global_step >= stop_after_steps
        return stopped_early, interrupted

    def _log_window(self, window: _Window, bar: Any) -> None:
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
            stopped_early = self._after_eval(self.evaluate())
        self.epoch += 1
        self.batch_in_epoch = 0
        self._save("latest.pt")
        return stopped_early

    def _save_buffers(self) -> list[torch.Tensor]:
        # A skipped non-finite step must not leave NaN in BatchNorm's running statistics.
        return [b.detach().clone() for b in self._buffers_to_guard]

    def _restore_buffers(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for buf, old in zip(self._buffers_to_guard, saved, strict=True):
                buf.copy_(old)


class _Window:
    """Loss, sample and extras totals since the last log, kept on the device (no host sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.nonfinite = torch.zeros((), device=device)
        self.reset_log()

    def reset_log(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.count = torch.zeros((), device=self.device)
        self.samples = 0
        self.extras: dict[str, Any] = {}
        self.extras_n: dict[str, int] = {}
        self.t0 = time.perf_counter()

    def reset_step(self) -> None:
        self.nonfinite = torch.zeros((), device=self.device)

    def add(self, loss: torch.Tensor, extras: dict[str, Any], samples: int) -> None:
        loss = loss.float()
        finite = torch.isfinite(loss).all()
        self.nonfinite = self.nonfinite + (~finite).float()
        self.loss_sum = self.loss_sum + torch.where(finite, loss.sum(), 0.0)
        self.count = self.count + finite.float()
        self.samples += samples
        for key, value in extras.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
            self.extras[key] = self.extras.get(key, 0.0) + value
            self.extras_n[key] = self.extras_n.get(key, 0) + 1

    def extras_means(self) -> dict[str, float]:
        """This rank's mean of each extra over the window (one transfer for all of them)."""
        if not self.extras:
            return {}
        keys = list(self.extras)
        values = torch.stack(
            [torch.as_tensor(self.extras[k], device=self.device).float() for k in keys]
        ).tolist()
        return {k: v / self.extras_n[k] for k, v in zip(keys, values, strict=True)}


def _regroup(
    model: nn.Module, sharded: nn.Module, groups: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``groups`` (over ``model``'s parameters) re-expressed over the FSDP module's parameters,
    matched by name: FSDP replaces the parameter objects the groups were built from."""
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {
        n.replace("_fsdp_wrapped_module.", "").replace("_forward_module.", ""): p
        for n, p in sharded.named_parameters()
    }
    return [
        {**g, "params": [by_name[names[id(p)]] for p in g["params"] if id(p) in names]}
        for g in groups
    ]
