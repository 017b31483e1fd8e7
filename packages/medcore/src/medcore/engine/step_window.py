"""Per-step bookkeeping of the Trainer's loop, kept on the device: the loss, sample and extras
totals since the last log (:class:`StepWindow`) and the NaN guard's copy of the buffers that a
forward pass updates (:class:`BufferGuard`)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


class BufferGuard:
    """Buffers that a forward pass updates in place (normalisation running statistics): a
    skipped non-finite step must not leave NaN in them. Other buffers are never copied, and a
    model without such buffers costs nothing."""

    def __init__(self, model: nn.Module) -> None:
        self.buffers: list[torch.Tensor] = []
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
                self.buffers += [b for b in module.buffers(recurse=False) if b is not None]

    def save(self) -> list[torch.Tensor]:
        return [b.detach().clone() for b in self.buffers]

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for buf, old in zip(self.buffers, saved, strict=True):
                buf.copy_(old)


class StepWindow:
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
