"""Per-batch seeded loading: a dataset that augments from the global RNGs inside loader workers
gives the same draws whatever the worker count, and a resumed run with persistent workers ends
bit-identical to an uninterrupted one."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medcore.config import TrainerConfig
from medcore.engine.batching import EpochBatches, SeededFetch, collated
from medcore.engine.rng import batch_seed
from medcore.engine.trainer import Trainer
from medcore.runtime.distributed import make_fabric
from medcore.runtime.interrupts import Interrupted
from medcore.testing import stopping_in_call

X = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] - X[:, 2] > 0).float()


class NoisyData(Dataset):
    """Augments with all three global RNGs, as package datasets do."""

    def __len__(self) -> int:
        return len(X)

    def __getitem__(self, i: int):
        noise = 0.3 * torch.rand(6) + float(np.random.rand()) + random.random()
        return X[i] + noise, Y[i]


def step(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)


def make(run_dir: Path, workers: int, persistent: bool = True, step_fn=step) -> Trainer:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))
    cfg = TrainerConfig(
        epochs=2,
        batch_size=8,
        num_workers=workers,
        persistent_workers=persistent,
        lr=1e-2,
        log_every_steps=1,
    )
    return Trainer(
        model,
        cfg,
        fabric=make_fabric(torch.device("cpu"), cfg),
        train_data=NoisyData(),
        step_fn=step_fn,
        run_dir=run_dir,
        kind="test.MLP",
        seed=11,
        show_progress=False,
    )


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def batches(workers: int, epoch: int, skip: int = 0) -> list[torch.Tensor]:
    sampler = EpochBatches(lambda e: [list(range(i, i + 4)) for i in range(0, 40, 4)], 10, 5)
    sampler.position(epoch, skip)
    loader = DataLoader(
        SeededFetch(NoisyData(), None),
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collated,
        generator=torch.Generator(),  # else the loader's start draws from the global RNG
    )
    return [x for x, _ in loader]


def test_draws_depend_on_the_batch_position_only() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    main = batches(0, epoch=1)
    # Loading in the main process leaves its own RNG where it was (dropout is unaffected).
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(main, batches(2, epoch=1), strict=True))
    # Resuming at batch 3 reads the same batches 3.. as the whole epoch did.
    assert all(torch.equal(a, b) for a, b in zip(main[3:], batches(0, 1, skip=3), strict=True))
    # Another epoch (same indices) draws other noise.
    assert not torch.equal(main[0], batches(0, epoch=2)[0])
    # By hand: batch 0 of epoch 1 is its four samples drawn in order under batch_seed(5, 1, 0, 0).
    torch.manual_seed(batch_seed(5, 1, 0, 0))
    np.random.seed(batch_seed(5, 1, 0, 0) % 2**32)
    random.seed(batch_seed(5, 1, 0, 0))
    expected = torch.stack([NoisyData()[i][0] for i in range(4)])
    assert torch.equal(main[0], expected)


def test_batch_seeds_differ_by_run_epoch_rank_and_batch() -> None:
    seeds = {batch_seed(s, e, r, b) for s in (0, 1) for e in (0, 1) for r in (0, 1) for b in (0, 1)}
    assert len(seeds) == 16


@pytest.mark.parametrize("stop_at", [3, 7])
def test_resume_with_persistent_workers_is_bit_identical(tmp_path: Path, stop_at: int) -> None:
    full = make(tmp_path / "full", workers=2)
    full.fit()
    part = make(tmp_path / "part", workers=2, step_fn=stopping_in_call(step, stop_at))
    with pytest.raises(Interrupted):
        part.fit()
    torch.manual_seed(999)
    np.random.seed(999)
    resumed = make(tmp_path / "part", workers=2)
    result = resumed.fit(resume=tmp_path / "part/checkpoints/latest.pt")
    assert result.global_step == full.state.global_step == 10
    for key, value in weights(full).items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_worker_count_and_persistence_do_not_change_the_run(tmp_path: Path) -> None:
    runs = []
    for name, workers, persistent in (("w2", 2, True), ("w0", 0, True), ("w1", 1, False)):
        runs.append(make(tmp_path / name, workers, persistent))
        runs[-1].fit()
    reference = weights(runs[0])
    for run in runs[1:]:
        for key, value in reference.items():
            assert torch.equal(value, run.model.state_dict()[key]), key
