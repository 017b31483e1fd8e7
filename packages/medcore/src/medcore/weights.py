"""Pretrained weights from a local file only: timm, torchvision, plain or wrapped state dicts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from medcore.checkpoint import load_checkpoint
from medcore.errors import CheckpointError, UserError

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "teacher", "weights")
_PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.")


def missing_weights_error(what: str, hint: str) -> UserError:
    """The error for "pretrained weights asked for, no file named": says how to supply one."""
    return UserError(
        what,
        "pretrained weights need a local file (no downloads at run time): pass --pretrained-weights PATH. "
        + hint,
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file (.pt/.pth/.bin/.safetensors), unwrapped from common containers."""
    state = load_checkpoint(path)
    for _ in range(3):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(path, "contains no weight tensors")
    return tensors


def _strip_prefixes(
    state: dict[str, torch.Tensor], model_keys: set[str]
) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``backbone.`` ...) when that makes keys match."""
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in state) and not any(
            k.startswith(prefix) for k in model_keys
        ):
            stripped = {
                k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()
            }
            if len(model_keys & set(stripped)) > len(model_keys & set(state)):
                state = stripped
    return state


def load_pretrained(
    module: nn.Module,
    path: str | Path,
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    min_match: float = 0.5,
) -> tuple[list[str], list[str]]:
    """Load a local weights file into ``module``; return (missing, unexpected) key lists.

    ``convert`` maps another layout's keys to the module's (e.g. DINOv2 torch.hub -> timm).
    Tensors whose shape differs (a classifier head for other classes) are left out, reported
    as missing. Fewer than ``min_match`` of the module's tensors matched is an error: the
    file is almost certainly for another architecture.
    """
    state = read_state_dict(path)
    if convert is not None:
        state = convert(state)
    target = module.state_dict()
    state = _strip_prefixes(state, set(target))
    usable = {k: v for k, v in state.items() if k in target and target[k].shape == v.shape}
    if len(usable) < min_match * len(target):
        raise CheckpointError(
            path,
            f"only {len(usable)} of the model's {len(target)} tensors match this file: "
            "wrong architecture or layout",
        )
    result = module.load_state_dict(usable, strict=False)
    unexpected = sorted(set(state) - set(usable))
    return list(result.missing_keys), unexpected
