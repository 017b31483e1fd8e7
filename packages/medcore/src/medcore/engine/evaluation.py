"""The Trainer's evaluations: ``evaluate_fn`` on every rank with rank 0's metrics for all, and
the monitored metric that chooses the best checkpoint and stops early."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from medcore.engine.checkpointing import Best
from medcore.engine.task import EvalContext, EvaluateFn

if TYPE_CHECKING:
    from lightning_fabric import Fabric


def evaluate(
    evaluate_fn: EvaluateFn, model: nn.Module, ctx: EvalContext, fabric: Fabric
) -> dict[str, float]:
    """Run ``evaluate_fn`` on every rank and return rank 0's metrics to all of them.

    No rank waits idle in a collective while another evaluates: each evaluates (its shard,
    with ``ctx.shard``; the whole set otherwise) and the metrics are broadcast afterwards.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        metrics = {k: float(v) for k, v in evaluate_fn(model, ctx).items()}
    model.train(was_training)
    return fabric.broadcast(metrics) if fabric.world_size > 1 else metrics


def monitor_value(metrics: dict[str, float], names: Sequence[str]) -> tuple[str, float] | None:
    """The first metric of ``names`` present and finite in ``metrics`` (fallback order)."""
    for name in names:
        value = metrics.get(name)
        if value is not None and math.isfinite(float(value)):
            return name, float(value)
    return None


def improves(best: Best, name: str, value: float, mode: str) -> bool:
    """Whether ``value`` of metric ``name`` beats ``best`` (a metric other than the best one's,
    after a fallback in the monitor list, starts afresh)."""
    if best.value is None or name != best.name:
        return True
    return value > best.value if mode == "max" else value < best.value
