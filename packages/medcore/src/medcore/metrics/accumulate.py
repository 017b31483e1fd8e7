"""Collect per-batch tensors during evaluation and compute metrics on the whole set.

Works in a single process and under ``torch.distributed``: with more than one rank, ``compute``
gathers every rank's rows (ranks may hold different numbers) before computing, so every rank
gets the metric of the union. Rows are concatenated in rank order. A padding distributed sampler
(``DistributedSampler`` with ``drop_last=False``) repeats samples to even out the ranks; use a
non-padding sampler when metrics must count each sample exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from medcore.runtime.distributed import collective_device, get_world_size

__all__ = ["MetricAccumulator"]


def _gather_rows(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's tensors concatenated along the first dimension, in rank order.

    Tensors of different lengths are padded to the longest, all-gathered and trimmed. Lengths,
    trailing shapes and dtypes travel first (as a small object gather) so that a rank that saw no
    batch at all can still take part.
    """
    meta = {name: (t.shape[0], tuple(t.shape[1:]), t.dtype) for name, t in local.items()}
    all_meta: list[dict[str, Any]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(all_meta, meta)
    filled = [m for m in all_meta if m]
    if not filled:
        raise RuntimeError("compute() called before any update() on every rank")
    if any(m.keys() != filled[0].keys() for m in filled):
        raise RuntimeError(
            f"ranks accumulated different tensor names: {[sorted(m) for m in all_meta]}"
        )
    device = collective_device()
    out = {}
    # Iterate in an order every rank agrees on, since each name is a separate collective.
    for name, (_, tail, dtype) in filled[0].items():
        lengths = [m[name][0] if m else 0 for m in all_meta]
        padded = torch.zeros((max(lengths), *tail), dtype=dtype, device=device)
        if name in local:
            padded[: lengths[dist.get_rank()]] = local[name]
        parts = [torch.empty_like(padded) for _ in lengths]
        dist.all_gather(parts, padded)
        out[name] = torch.cat([p[:n].cpu() for p, n in zip(parts, lengths, strict=True)])
    return out


class MetricAccumulator:
    """Accumulates named tensors batch by batch and computes ``fn`` on the concatenation.

    ``update(preds=..., targets=...)`` stores detached CPU copies (numpy arrays are accepted; a
    0-d value counts as one row). ``compute()`` concatenates each name along the first dimension,
    gathers across ranks when ``torch.distributed`` runs with more than one process, and returns
    ``fn(**tensors)``, or the dict of tensors itself when ``fn`` is None. Under
    ``torch.distributed`` every rank must call ``compute()``; a rank without any batch may join.
    """

    def __init__(self, fn: Callable[..., Any] | None = None) -> None:
        self.fn = fn
        self._batches: dict[str, list[torch.Tensor]] = {}

    def update(self, **tensors: torch.Tensor | np.ndarray) -> None:
        """Append one batch; every call must pass the same names."""
        if self._batches and tensors.keys() != self._batches.keys():
            raise ValueError(
                f"update() got names {sorted(tensors)}, earlier batches {sorted(self._batches)}"
            )
        for name, value in tensors.items():
            t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
            # A copy, so that the caller reusing or modifying its buffer cannot alter the history.
            t = t.to("cpu", copy=True)
            self._batches.setdefault(name, []).append(t.reshape(1) if t.ndim == 0 else t)

    def compute(self) -> Any:
        """The metric (or the dict of tensors) over everything accumulated, on all ranks."""
        local = {name: torch.cat(parts) for name, parts in self._batches.items()}
        if get_world_size() > 1:
            local = _gather_rows(local)
        elif not local:
            raise RuntimeError("compute() called before any update()")
        return self.fn(**local) if self.fn is not None else local

    def reset(self) -> None:
        """Forget all accumulated batches."""
        self._batches.clear()
