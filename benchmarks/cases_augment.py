"""Case 6: ctretrieval's kornia 3-D augmentation, one batched call against a per-sample loop."""

from __future__ import annotations

import torch
from common import Row, best_time, fmt_s

from ctretrieval.augment import VolumeAugmentation
from ctretrieval.config import AugmentConfig


def case_augment(device: torch.device, quick: bool) -> list[Row]:
    batch, shape = 8, (300, 270, 270)  # the spec's volume size, slices first
    # Every sample transformed, so both sides do the full work whatever the random draws.
    cfg = AugmentConfig(affine_p=1.0, noise_p=1.0)
    augment = VolumeAugmentation(cfg).to(device)
    gen = torch.Generator().manual_seed(0)
    volumes = torch.rand((batch, *shape), generator=gen).to(device)

    def batched() -> None:
        augment(volumes)

    def loop() -> None:
        for i in range(batch):
            augment(volumes[i : i + 1])

    # On CPU one call takes tens of seconds and needs no warm-up; on a GPU, warm up and repeat.
    repeats, warmup = (1, 0) if device.type == "cpu" else (3, 1)
    with torch.no_grad():
        t_batch = best_time(batched, device, repeats=repeats, warmup=warmup)
        t_loop = best_time(loop, device, repeats=repeats, warmup=warmup)
    ratio = t_loop / t_batch
    note = (
        "CPU: both sides do the same grid-sampling work on the same cores; the 3x is a GPU "
        "target (kernel launches and occupancy), see BENCHMARKS.md"
        if device.type == "cpu"
        else "RandomAffine3D + Gaussian noise, p=1"
    )
    return [
        Row(
            f"6 kornia 3-D augmentation, batch {batch} of {'x'.join(map(str, shape))}",
            f"batched {fmt_s(t_batch)}",
            f"per-sample loop {fmt_s(t_loop)}",
            ratio,
            ">= 3x",
            ratio >= 3,
            note,
        )
    ]


CASES = {"augment3d": case_augment}
