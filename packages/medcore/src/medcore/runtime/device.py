"""Device selection, the AMP policy a device supports, and device-dependent defaults."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from medcore.errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """Return the device for ``name``; ``auto`` prefers CUDA, then MPS, then CPU.

    Under torchrun each process takes the CUDA device of its ``local_rank``.
    """
    if name not in DEVICE_CHOICES:
        raise UserError(
            "--device", f"unknown device {name!r} (choose from {', '.join(DEVICE_CHOICES)})"
        )
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                "--device cuda", "CUDA is not available on this machine (use --device auto or cpu)"
            )
        index = local_rank if local_rank is not None else torch.cuda.current_device()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if name == "mps" and not mps_available():
        raise UserError(
            "--device mps", "MPS is not available on this machine (use --device auto or cpu)"
        )
    return torch.device(name)


@dataclass(frozen=True)
class AmpPolicy:
    """How mixed precision runs on a device: autocast dtype and whether a GradScaler is needed."""

    enabled: bool
    dtype: torch.dtype
    use_scaler: bool

    @property
    def name(self) -> str:
        if not self.enabled:
            return "fp32"
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, str(self.dtype))


def amp_policy(device: torch.device, enabled: bool = True, dtype: str = "auto") -> AmpPolicy:
    """Pick the autocast dtype: bf16 where the device supports it, else fp16 with a GradScaler.

    On CPU autocast is off unless ``dtype`` asks for bf16 explicitly: CPU bf16 autocast is
    slower than fp32 on most laptops, so it is opt-in.
    """
    if dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(
            "trainer.amp_dtype", f"unknown AMP dtype {dtype!r} (auto, bf16, fp16, fp32)"
        )
    if not enabled or dtype == "fp32":
        return AmpPolicy(False, torch.float32, False)
    if device.type == "cuda":
        if dtype == "fp16" or (dtype == "auto" and not torch.cuda.is_bf16_supported()):
            return AmpPolicy(True, torch.float16, True)
        return AmpPolicy(True, torch.bfloat16, False)
    if device.type == "mps":
        # fp16 on MPS needs loss scaling like on CUDA (Fabric's 16-mixed brings the scaler).
        return AmpPolicy(True, torch.float16, True)
    if dtype == "bf16":
        return AmpPolicy(True, torch.bfloat16, False)
    return AmpPolicy(False, torch.float32, False)


def precision_policy(precision: str) -> AmpPolicy:
    """The AmpPolicy (what evaluate_fns autocast with) of a Fabric precision string."""
    if precision in ("bf16-mixed", "bf16-true", "bf16"):
        return AmpPolicy(True, torch.bfloat16, False)
    if precision in ("16-mixed", "16-true", "16"):
        return AmpPolicy(True, torch.float16, precision == "16-mixed")
    if precision in ("32-true", "32", "64-true", "64"):
        return AmpPolicy(False, torch.float32, False)
    raise UserError(
        "trainer.precision",
        f"unknown precision {precision!r} (bf16-mixed, 16-mixed, 32-true, bf16-true, 16-true)",
    )


def autocast(device: torch.device, policy: AmpPolicy) -> contextlib.AbstractContextManager:
    """An autocast context for ``policy`` (a no-op context when AMP is off)."""
    if not policy.enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=policy.dtype)


@dataclass(frozen=True)
class DeviceDefaults:
    batch_size: int
    num_workers: int


_DEFAULTS = {
    "cuda": DeviceDefaults(16, 8),
    "mps": DeviceDefaults(8, 0),
    "cpu": DeviceDefaults(4, 2),
}


def device_defaults(device: torch.device) -> DeviceDefaults:
    """Batch size and loader workers that suit ``device``; configs override them when set."""
    return _DEFAULTS.get(device.type, _DEFAULTS["cpu"])


def describe_device(device: torch.device) -> str:
    """A short human description, e.g. for logs and benchmark tables."""
    if device.type == "cuda":
        return f"cuda:{device.index} ({torch.cuda.get_device_name(device)})"
    return device.type
