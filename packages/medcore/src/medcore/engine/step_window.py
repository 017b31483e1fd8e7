"""Per-step bookkeeping of the Trainer's loop, kept on the device: the loss, sample and extras
totals since the last log (:class:`StepWindow`) and the NaN guard's copy of the buffers that a
forward pass updates (:class:`BufferGuard`)."""

from __future__ import annotations

import time

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
        self.extras: dict[str, torch.Tensor] = {}
        self.extras_n: dict[str, int] = {}
        self.t0 = time.perf_counter()

    def reset_step(self) -> None:
        self.nonfinite = torch.zeros((), device=self.device)

    def add(self, loss: torch.Tensor, extras: dict[str, torch.Tensor], samples: int) -> None:
        loss = loss.float()
        finite = torch.isfinite(loss).all()
        self.nonfinite = self.nonfinite + (~finite).float()
        self.loss_sum = self.loss_sum + torch.where(finite, loss.sum(), 0.0)
        self.count = self.count + finite.float()
        self.samples += samples
        for key, value in extras.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"step_fn extra {key!r} is a {type(value).__name__}, not a tensor: "
                    "return it as a tensor (a float() costs a host sync per micro-batch)"
                )
            total = self.extras.get(key)
            value = value.detach().float().reshape(())  # one number per micro-batch
            self.extras[key] = value if total is None else total + value
            self.extras_n[key] = self.extras_n.get(key, 0) + 1

    def extras_means(self) -> dict[str, float]:
        """This rank's mean of each extra over the window (one host transfer for all)."""
        if not self.extras:
            return {}
        keys = list(self.extras)
        values = torch.stack([self.extras[k].to(self.device) for k in keys]).tolist()
        return {k: v / self.extras_n[k] for k, v in zip(keys, values, strict=True)}
