"""Case 9: the 2-D loader alone, decode-once store against decoding every image every epoch.

A BreakHis-sized tree of 700x460 RGB PNGs (the real slides' size) is written once; both loaders
then feed 224 px tensors through the same DataLoader (batch 32, shuffled), each at its better
worker count of {0, medcore's device default}; every count's rates are in the note. The
store's first epoch (which builds it) is reported apart from the epochs after it. The loader's
rate is also set against the bare step of histommnet's EfficientNet-B1 at 224 px, so a GPU step
could be fed.
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from common import Row, best_time, fmt_bytes, peak_rss_in_child
from PIL import Image

from medcore.data.image_store import StoreSpec, open_store
from medcore.io import load_image
from medcore.runtime.device import device_defaults

SOURCE_HW = (460, 700)
STORE_HW = (224, 341)  # 224 px short side, the slides' aspect ratio kept
MEAN = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)


def _write_tree(root: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (*SOURCE_HW, 3), dtype=np.uint8)
    paths = []
    for i in range(count):
        # A shifted texture per file: real PNG compression work, distinct content.
        image = np.roll(base, shift=(i * 7) % SOURCE_HW[1], axis=1)
        path = root / f"SOB_B_A-14-{i // 40}-40-{i:04d}.png"
        Image.fromarray(image).save(path, compress_level=6)
        paths.append(path)
    return paths


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """A uint8 [3, H, W] tensor: conversion to float and normalisation happen per batch, on the
    training device (as the batched augmentation does), on both sides of the comparison."""
    return torch.from_numpy(np.array(image[:, :224])).permute(2, 0, 1)


def _normalise(batch: torch.Tensor) -> torch.Tensor:
    return (batch.float() / 255.0 - MEAN) / 0.5


class _Decoded(torch.utils.data.Dataset):
    """Today's path: decode and resize each PNG whenever it is read."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = Image.fromarray(load_image(self.paths[i])).resize(
            (STORE_HW[1], STORE_HW[0]), Image.BILINEAR
        )
        return _to_tensor(np.asarray(image))


class _Stored(torch.utils.data.Dataset):
    def __init__(self, store) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _to_tensor(self.store[i])

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        # One read of the batch's crops from the map (the DataLoader's batched fetch).
        return torch.from_numpy(self.store.batch(indices, cols=slice(0, 224))).permute(0, 3, 1, 2)


def _collate(batch: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    return batch if isinstance(batch, torch.Tensor) else torch.stack(batch)


def _rate(dataset: torch.utils.data.Dataset, workers: int, epochs: int = 2) -> float:
    """Samples/s of the last of ``epochs`` epochs (persistent workers: start-up not counted)."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=32,
        collate_fn=_collate,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    rate = 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        n = sum(_normalise(batch).shape[0] for batch in loader)
        rate = n / (time.perf_counter() - start)
    return rate


def _read_store(directory: str, paths: list[Path]) -> int:
    store = open_store(paths, directory, StoreSpec(size=STORE_HW), progress=False)
    total = 0
    for i in range(len(store)):
        total += int(_to_tensor(store[i]).shape[0])
    return total


def case_loader(device: torch.device, quick: bool) -> list[Row]:
    count = 240 if quick else 2000
    # Each path at its better worker count of {0, the device default}: decoding wants worker
    # processes; reading the store is cheaper than handing its batches between processes.
    choices = sorted({0, device_defaults(device).num_workers})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        paths = _write_tree(root / "src", count)
        decoded = {w: _rate(_Decoded(paths), w) for w in choices}

        start = time.perf_counter()
        store = open_store(paths, root / "store", StoreSpec(size=STORE_HW), progress=False)
        build_rate = count / (time.perf_counter() - start)
        stored = {w: _rate(_Stored(store), w, epochs=3) for w in choices}
        store_bytes = store.nbytes
        rss, _ = peak_rss_in_child(partial(_read_store, str(root / "store"), paths))
    decode_workers, store_workers = max(decoded, key=decoded.get), max(stored, key=stored.get)
    decoded_rate, stored_rate = decoded[decode_workers], stored[store_workers]
    by_workers = "; ".join(
        f"{w} workers: store {stored[w]:.0f}, decode {decoded[w]:.0f} ({stored[w] / decoded[w]:.1f}x)"
        for w in choices
    )

    import timm

    model = timm.create_model("efficientnet_b1", pretrained=False, num_classes=2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randn(8, 3, 224, 224, device=device)
    target = torch.randint(0, 2, (8,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(batch), target).backward()
        optimizer.step()

    step_rate = 8 / best_time(step, device, repeats=3, warmup=1)
    per_breakhis = store_bytes / count * 7909
    return [
        Row(
            f"9 2-D loader, {count} PNGs 700x460 -> 224 px",
            f"store {stored_rate:.0f} samples/s, {store_workers} workers (first epoch builds: "
            f"{build_rate:.0f}/s)",
            f"decode every epoch {decoded_rate:.0f} samples/s, {decode_workers} workers",
            stored_rate / decoded_rate,
            ">= 10x",
            stored_rate / decoded_rate >= 10,
            f"each at its better worker count; {by_workers}",
        ),
        Row(
            "9 2-D loader vs bare step (EfficientNet-B1, 224 px, batch 8)",
            f"store {stored_rate:.0f} samples/s",
            f"bare step {step_rate:.1f} samples/s on {device.type}",
            stored_rate / step_rate,
            ">= 3x",
            stored_rate / step_rate >= 3,
        ),
        Row(
            "9 2-D store memory",
            f"peak RSS reading it all {fmt_bytes(rss)}",
            f"store file {fmt_bytes(store_bytes)} ({fmt_bytes(per_breakhis)} for BreakHis' 7909)",
            rss / store_bytes,
            "reported",
            None,
            "memory-mapped: pages are the OS page cache's, shared by every worker",
        ),
    ]


CASES = {"loader": case_loader}
