"""Global random states: save and restore them (checkpoints), seed them, and seed the loading of
one training batch from its place in the run.

``seeded_batch`` is what makes per-sample augmentation resumable: datasets that draw from
torch's, numpy's or Python's global RNG in ``__getitem__`` draw, for a given batch, from
streams seeded by ``(run seed, epoch, rank, batch index)`` alone, so the draws are the same in
the main process or any worker, with persistent workers or fresh ones, and after a resume.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """All global RNG states, as tensors and primitives (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    """A 64-bit seed for loading batch ``batch`` of ``epoch`` on ``rank`` of run ``seed``.

    numpy's ``SeedSequence`` hashes the four numbers, so neighbouring batches, epochs and runs
    get unrelated streams (not ``seed + batch``, whose streams would overlap across runs).
    """
    words = np.random.SeedSequence((seed % 2**64, epoch, rank, batch)).generate_state(2)
    return int(words[0]) << 32 | int(words[1])


@contextlib.contextmanager
def seeded_batch(seed: int) -> Iterator[None]:
    """Seed the CPU global RNGs (torch, numpy, ``random``) from ``seed`` for the block, then put
    back the states they had: the caller's own streams (dropout in the main process when
    ``num_workers`` is 0) are untouched by what the block draws."""
    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])
