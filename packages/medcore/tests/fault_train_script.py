"""A training run driven from the fault tests under torchrun, one rank of which fails.

usage: fault_train_script.py RUN_DIR [--raise-on-rank R]
"""

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from medcore.config import TrainerConfig
from medcore.engine.trainer import Trainer
from medcore.runtime.distributed import make_fabric


def main() -> None:
    run_dir = Path(sys.argv[1])
    raise_rank = (
        int(sys.argv[sys.argv.index("--raise-on-rank") + 1])
        if "--raise-on-rank" in sys.argv
        else -1
    )
    cfg = TrainerConfig(
        epochs=3, batch_size=4, num_workers=0, lr=1e-2, save_every_steps=1, amp=False
    )
    fabric = make_fabric(torch.device("cpu"), cfg)  # joins torchrun's process group, if any
    rank = fabric.global_rank
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=gen)
    data = TensorDataset(x, x.sum(1, keepdim=True))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.1), nn.Linear(8, 1))

    def step(m, batch):
        if rank == raise_rank:
            raise RuntimeError(f"rank {rank} failed")
        xb, yb = batch
        return ((m(xb) - yb) ** 2).mean()

    trainer = Trainer(
        model,
        cfg,
        fabric=fabric,
        train_data=data,
        step_fn=step,
        run_dir=run_dir,
        kind="faults.MLP",
        seed=2,
        show_progress=False,
    )
    trainer.fit()
    if rank == 0:
        torch.save(trainer.model.state_dict(), run_dir / "weights.pt")


if __name__ == "__main__":
    main()
