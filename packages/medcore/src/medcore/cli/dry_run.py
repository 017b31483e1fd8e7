"""``<pkg>-train --dry-run``: build a config's model on the meta device and report its size.

No data, no weights and no network are touched: the model is built with ``torch.device("meta")``
as the default device, so even a billion-parameter backbone costs no memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medcore.io import atomic_write_json


def count_parameters(module: nn.Module) -> dict[str, int]:
    """``total``, ``trainable`` and one count per top-level child module (shared tensors once)."""
    seen: set[int] = set()
    total = trainable = 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    counts: dict[str, int] = {"total": total, "trainable": trainable}
    for name, child in module.named_children():
        counts[name] = sum(p.numel() for p in child.parameters())
    return counts


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """Call ``build`` with the meta device as default: shapes and counts, no storage."""
    with torch.device("meta"):
        return build()


def dry_run(
    build: Callable[[], nn.Module],
    run_dir: str | Path,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build on meta, write ``model_summary.json`` into ``run_dir``, print the parameter table.

    ``extra`` adds entries to the JSON (e.g. the backbone's name or input normalisation).
    Returns the summary written.
    """
    model = build_on_meta(build)
    counts = count_parameters(model)
    summary: dict[str, Any] = {"model": type(model).__name__, "parameters": counts, **(extra or {})}
    atomic_write_json(Path(run_dir) / "model_summary.json", summary)
    width = max(len(k) for k in counts)
    print(f"dry run: {type(model).__name__} built on the meta device (no data, no weights)")
    for key, value in counts.items():
        print(f"  {key.ljust(width)}  {value:>14,d}")
    print(f"wrote {Path(run_dir) / 'config.yaml'} and {Path(run_dir) / 'model_summary.json'}")
    return summary
