"""The Trainer's settings, the context an ``evaluate_fn`` receives, and what ``fit`` returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from medcore.batching import shard_bounds
from medcore.device import AmpPolicy
from medcore.runlog import RunLogger

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
    # Epoch-end latest.pt at most every this many seconds of training (0: every epoch). For
    # epochs of a few seconds (laptop demos, small datasets on a GPU), where writing the model
    # and optimizer state every epoch costs a tenth of the run; the last epoch, an early stop,
    # Ctrl-C and SIGTERM (SLURM's time limit and preemption) always write it.
    save_interval_s: float = 0.0
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
