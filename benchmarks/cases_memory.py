"""Case 10 (``memory_full``): peak memory of one training step of binensemble's ``full`` research
model (ConvNeXt-Large + ViT-Large/16 at 448 px), with and without activation checkpointing.

The model is the research config's (``binensemble.config.ModelConfig`` defaults: the last 2
ConvNeXt stages and 8 ViT blocks trained), built with random initialisation (no weights needed).
One step is forward, the package's batch-hard triplet loss, backward and an AdamW step over the
trained parameters. Memory is what the step adds to the built model: on CUDA
``torch.cuda.max_memory_allocated``, on CPU the peak RSS of a fresh process per mode.
"""

from __future__ import annotations

import functools
import os
import time

import torch
from common import Row, ab_comparison, added_peak_memory, fmt_bytes, peak_rss_in_child, sync

BATCH = 3  # the smallest batch with a triplet (two of one class, one of the other)


def _one_step(checkpointing: bool, device_type: str) -> tuple[float, float, int, float]:
    """(loss, grad checksum, bytes the step adds, step seconds) of one training step."""
    from binensemble.config import BinEnsembleConfig, DataConfig, ModelConfig
    from binensemble.losses import batch_hard_triplet_loss
    from binensemble.model import build_model

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(device_type)
    cfg = BinEnsembleConfig(
        model=ModelConfig(pretrained=False, grad_checkpointing=checkpointing),
        data=DataConfig(img_size=448),
    )
    torch.manual_seed(0)
    model = build_model(cfg, load_weights=False).to(device).train()
    opt = torch.optim.AdamW(model.param_groups(5e-6, 1e-3), weight_decay=1e-3)
    x = torch.rand(BATCH, 3, 448, 448, generator=torch.Generator().manual_seed(1)).to(device)
    labels = torch.tensor([0, 0, 1], device=device)
    with added_peak_memory(device) as memory:
        torch.manual_seed(2)  # dropout and drop-path draw the same in both modes
        start = time.perf_counter()
        loss, _ = batch_hard_triplet_loss(model(x), labels, margin=0.5)
        loss.backward()
        opt.step()
        sync(device)
        seconds = time.perf_counter() - start
    step_bytes = memory["bytes"]
    checksum = float(
        sum(p.grad.double().abs().sum() for p in model.parameters() if p.grad is not None)
    )
    return float(loss.detach()), checksum, step_bytes, seconds


def case_memory_full(device: torch.device, quick: bool) -> list[Row]:
    results = {}
    for checkpointing in (False, True):
        if device.type == "cuda":
            results[checkpointing] = _one_step(checkpointing, "cuda")
            torch.cuda.empty_cache()
        else:  # a fresh process per mode: a CPU high-water mark never goes down
            results[checkpointing] = peak_rss_in_child(
                functools.partial(_one_step, checkpointing, "cpu")
            )[1]
    (*plain, s_a), (*saving, s_c) = results[False], results[True]
    mem_a, mem_c = plain[2], saving[2]
    ratio, loss_diff, grad_rel, what = ab_comparison(tuple(plain), tuple(saving), device)
    return [
        Row(
            f"10 binensemble full step memory, ConvNeXt-L + ViT-L/16 at 448, batch {BATCH}",
            f"{fmt_bytes(mem_c)} (activation checkpointing)",
            f"{fmt_bytes(mem_a)} (no checkpointing)",
            ratio,
            "report, same loss to 1e-4",
            None if loss_diff <= 1e-4 else False,
            f"{what} the step adds to the built model; |loss diff| {loss_diff:.1e}, "
            f"grad-sum rel diff {grad_rel:.1e}; step {s_a:.1f} s without, {s_c:.1f} s with",
        )
    ]


CASES = {"memory_full": case_memory_full}
