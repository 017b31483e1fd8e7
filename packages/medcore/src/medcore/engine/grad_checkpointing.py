"""Memory switches for large backbones: activation (gradient) checkpointing."""

from __future__ import annotations

from torch import nn

from medcore.errors import ConfigError


def set_grad_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Switch timm's activation checkpointing on every backbone inside ``model``.

    Calls ``set_grad_checkpointing(enabled)`` on each outermost submodule that has it (timm
    models do; their blocks are then recomputed in the backward pass instead of stored).
    Returns how many backbones were switched. Asking for it on a model without any such
    backbone is an error, not a silently ignored setting.
    """
    switched = 0
    seen: set[int] = set()
    for module in model.modules():
        if id(module) in seen or not callable(getattr(module, "set_grad_checkpointing", None)):
            continue
        module.set_grad_checkpointing(enabled)
        switched += 1
        seen.update(id(m) for m in module.modules())  # its children are covered by it
    if enabled and switched == 0:
        raise ConfigError(
            "model.grad_checkpointing",
            f"{type(model).__name__} has no timm backbone that supports activation checkpointing",
        )
    return switched
