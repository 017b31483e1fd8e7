"""The task's side of the Trainer: the step and evaluation functions' types, the context an
``evaluate_fn`` receives, and what ``fit`` returns (the settings, ``TrainerConfig``, are in
:mod:`medcore.config`)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from medcore.engine.batching import shard_bounds
from medcore.engine.run_log import RunLogger
from medcore.runtime.device import AmpPolicy

StepOutput = torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]
"""The loss of a micro-batch, or the loss and extras to log (``train/<name>``): tensors left on
the device, summed there and read once per logging step (a ``float()`` here would cost a host
sync per micro-batch)."""

StepFn = Callable[[nn.Module, Any], StepOutput]


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


EvaluateFn = Callable[[nn.Module, EvalContext], dict[str, float]]


class Stop(enum.Enum):
    """Why a training ended."""

    COMPLETED = "completed"  # every epoch ran
    EARLY_STOP = "early_stop"  # the monitored metric stopped improving
    INTERRUPTED = "interrupted"  # a signal or a stop request: ``fit`` raises Interrupted


@dataclass
class TrainResult:
    """What ``fit`` returns once training ended (an interrupted ``fit`` raises instead)."""

    stop: Stop
    best_metric: float | None
    best_metric_name: str | None
    best_path: Path | None
    final_path: Path | None
    global_step: int
    epochs_completed: int
    history: list[dict[str, float]]
