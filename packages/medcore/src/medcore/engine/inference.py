"""Checkpoint to model, and one inference loop for every package.

- :func:`load_model`: rebuild a model from one of its checkpoints alone: the identity (``kind``)
  is checked, the package's ``build(state)`` makes the unweighted model from the configs the
  checkpoint carries, the weights load strictly, and every failure is one line.
- :func:`checkpoint_precision`: the precision a checkpoint was trained in, as it runs on a device.
- :class:`PredictOptions`: how :func:`predict` runs (device, autocast, batch size, workers,
  sharding, progress label), made once by a command and handed down to its prediction code.
- :func:`predict`: a model over a dataset through a DataLoader (the device's default workers,
  pinned memory on CUDA), under ``torch.inference_mode`` and the checkpoint's autocast, with a
  progress bar; under DDP each rank predicts its contiguous shard and the outputs are gathered
  in dataset order, so every rank gets what a single process would.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from medcore.engine.batching import move_to_device, shard_bounds
from medcore.errors import CheckpointError
from medcore.runtime import distributed as dist_utils
from medcore.runtime.device import (
    AmpPolicy,
    amp_policy,
    autocast,
    device_defaults,
    precision_policy,
)
from medcore.weights.checkpoint import load_checkpoint

Outputs = dict[str, Any]


def _kind_matches(found: str, kind: str | Collection[str]) -> bool:
    kinds = [kind] if isinstance(kind, str) else list(kind)
    return any(found.startswith(k) if k.endswith(".") else found == k for k in kinds)


def load_model(
    path: str | Path,
    kind: str | Collection[str],
    build: Callable[[dict[str, Any]], nn.Module],
    *,
    device: torch.device | str = "cpu",
    state: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model in eval mode on device, checkpoint dict)`` rebuilt from the checkpoint alone.

    ``kind`` is the expected identity: an exact kind, a prefix ending in ``.`` (``"ctclip."``)
    or a collection of these. ``build`` makes the model from the checkpoint dict (its
    ``model_config`` and whatever else the package stored); a key it misses becomes a one-line
    CheckpointError. ``state``: an already-read checkpoint (e.g. from a safetensors file with
    its metadata), ``path`` then only names it in errors.
    """
    if state is None:
        state = load_checkpoint(path, map_location="cpu")
    found = str(state.get("kind") or "")
    if not _kind_matches(found, kind):
        wanted = kind if isinstance(kind, str) else " or ".join(sorted(kind))
        what = f"a {found}" if found else "an unlabelled"
        raise CheckpointError(path, f"this is {what} checkpoint, not {wanted.rstrip('.')}")
    if "model" not in state:
        raise CheckpointError(path, "holds no model weights")
    try:
        model = build(state)
    except KeyError as exc:
        raise CheckpointError(
            path, f"has no {exc.args[0]} to rebuild the model from (not written by the trainer?)"
        ) from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            path, f"weights do not match the stored config ({str(exc).splitlines()[0][:160]})"
        ) from None
    return model.to(device).eval(), state


def checkpoint_precision(state: Mapping[str, Any], device: torch.device) -> AmpPolicy:
    """The autocast a checkpoint was trained with (its Fabric precision, or its trainer
    config's AMP fields), as it runs on ``device``; fp16 without a GPU runs in fp32."""
    if "precision" in state:
        policy = precision_policy(str(state["precision"]))
    elif isinstance(state.get("trainer_config"), Mapping):
        tcfg = state["trainer_config"]
        policy = amp_policy(device, bool(tcfg.get("amp", True)), str(tcfg.get("amp_dtype", "auto")))
    else:
        policy = amp_policy(device)
        print(
            f"note: the checkpoint records no training precision; predicting in {policy.name}",
            file=sys.stderr,
        )
        return policy
    if policy.enabled and policy.dtype == torch.float16 and device.type == "cpu":
        return AmpPolicy(False, torch.float32, False)
    return AmpPolicy(policy.enabled, policy.dtype, False)


def loader_workers(num_workers: int | None, device: torch.device) -> int:
    """DataLoader workers: the config's when set, else medcore's default for the device."""
    return device_defaults(device).num_workers if num_workers is None else int(num_workers)


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """How :func:`predict` runs.

    ``precision``: the autocast to run under (:func:`checkpoint_precision`); fp32 when None.
    ``num_workers``: DataLoader workers; None: the device's default. ``shard``: under DDP each
    rank predicts its block and every rank gets all outputs; False: this rank predicts all.
    ``desc``: the progress bar's label; None: no bar.
    """

    device: torch.device
    precision: AmpPolicy | None = None
    batch_size: int = 32
    num_workers: int | None = None
    shard: bool = True
    desc: str | None = "predict"

    def but(self, **changes: Any) -> PredictOptions:
        """A copy with ``changes`` (e.g. ``options.but(shard=False, desc=None)``)."""
        return dataclasses.replace(self, **changes)


def predict(
    model: nn.Module,
    data: Dataset,
    forward: Callable[[nn.Module, Any], torch.Tensor | Mapping[str, Any]],
    options: PredictOptions,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    channels_last: bool = False,
) -> torch.Tensor | Outputs:
    """``forward(model, batch)`` over ``data`` in order; tensors are concatenated on the CPU.

    ``forward`` returns a tensor or a mapping of tensors / lists (one entry per sample each).
    With ``options.shard`` and more than one rank, rank ``r`` predicts block ``r`` of the
    dataset and the blocks are gathered (rank order is dataset order): every rank returns all
    outputs.
    """
    device, shard, desc = options.device, options.shard, options.desc
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    part: Dataset = data
    if shard and world > 1:
        lo, hi = shard_bounds(len(data), rank, world)  # type: ignore[arg-type]
        part = Subset(data, range(lo, hi))
    policy = options.precision or AmpPolicy(False, torch.float32, False)
    loader = DataLoader(
        part,
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=loader_workers(options.num_workers, device),
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    show = desc is not None and rank == 0 and len(loader) > 1
    chunks: list[Any] = []
    was_training = model.training
    model.eval()
    # Evaluation never moves the caller's random streams (the loader's base seed included): a
    # training run draws the same augmentations and batches however often it validates.
    forked = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.inference_mode(), autocast(device, policy):
        for batch in tqdm(loader, desc=desc, leave=False, disable=not show):
            chunks.append(_to_cpu(forward(model, move_to_device(batch, device, channels_last))))
    model.train(was_training)
    local = _concat(chunks)
    if shard and world > 1:
        return _concat(dist_utils.all_gather_object(local))
    return local


def _to_cpu(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().float().cpu() if out.is_floating_point() else out.detach().cpu()
    if isinstance(out, Mapping):
        return {k: _to_cpu(v) for k, v in out.items()}
    return list(out)


def _concat(parts: list[Any]) -> Any:
    """One tensor / mapping from per-batch (or per-rank) parts; ``None`` parts are empty shards."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {k: _concat([p[k] for p in parts]) for k in first}
    return [x for p in parts for x in p]
