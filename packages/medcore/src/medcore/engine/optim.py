"""The Trainer's optimizer and learning-rate schedule, built from ``TrainerConfig``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from medcore.config import TrainerConfig
from medcore.errors import UserError


def build_optimizer(
    cfg: TrainerConfig,
    model: nn.Module,
    param_groups: list[dict[str, Any]] | None,
    sharded: nn.Module | None = None,
) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``param_groups`` (all trainable parameters of ``model`` when None);
    with ``sharded`` (the FSDP module) the groups are re-expressed over its parameters."""
    if param_groups is None:
        param_groups = [
            {"params": [p for p in model.parameters() if p.requires_grad], "name": "all"}
        ]
    if sharded is not None:
        param_groups = regroup(model, sharded, param_groups)
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
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@dataclass(frozen=True)
class Schedule:
    """A learning-rate scheduler and when it steps: after every optimizer step (``"step"``), at
    every epoch's end (``"epoch"``), or on every evaluation's monitored value (``"metric"``).
    ``scheduler`` None: a constant learning rate."""

    scheduler: Any = None
    interval: Literal["step", "epoch", "metric"] | None = None

    def step(self, at: Literal["step", "epoch", "metric"], value: float | None = None) -> None:
        """Step the scheduler if it steps ``at`` this point (``value``: the monitored metric)."""
        if self.scheduler is None or at != self.interval:
            return
        if at == "metric":
            self.scheduler.step(value)
        else:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any] | None:
        return self.scheduler.state_dict() if self.scheduler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scheduler is not None and state is not None:
            self.scheduler.load_state_dict(state)


def build_scheduler(
    cfg: TrainerConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> Schedule:
    """``cfg.scheduler``: cosine (per optimizer step, with warmup), step (per epoch), plateau
    (per evaluation) or none."""
    if cfg.scheduler == "cosine":
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
        floor = cfg.min_lr_ratio

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        return Schedule(torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "step")
    if cfg.scheduler == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=cfg.step_size, gamma=cfg.gamma
        )
        return Schedule(scheduler, "epoch")
    if cfg.scheduler == "plateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode=cfg.monitor_mode,
            factor=cfg.plateau_factor,
            patience=cfg.plateau_patience,
        )
        return Schedule(plateau, "metric")
    return Schedule()


def regroup(
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
