"""The Trainer's evaluations: ``evaluate_fn`` on every rank, the monitored metric, the best
checkpoint, the plateau scheduler and early stopping.

A mixin of :class:`medcore.engine.trainer.Trainer`, split out so the loop reads on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from medcore.engine.task import EvalContext
from medcore.weights.checkpoint import unwrap_model


def monitor_value(metrics: dict[str, float], names: Sequence[str]) -> tuple[str, float] | None:
    """The first metric of ``names`` present and finite in ``metrics`` (fallback order)."""
    for name in names:
        value = metrics.get(name)
        if value is not None and math.isfinite(float(value)):
            return name, float(value)
    return None


class Evaluation:
    """``evaluate`` and what follows an evaluation, for the Trainer."""

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
        chosen = monitor_value(metrics, self.cfg.monitor)
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
