"""A minimal training command on medcore's CLI conventions, for the ``--devices N`` tests.

Run as ``python -m medcore.cli.launch devices_cmd:main ARGS`` (this directory on PYTHONPATH) or
called as ``main([...])``; ``DEVICES_CMD_SLOW=1`` makes every step slow (kill -9 tests);
``DEVICES_CMD_PIDS=DIR`` has each rank write its pid to ``DIR/rank<r>.pid``;
``DEVICES_CMD_SIGNAL=RANK:N:SIGNAL[:eval]`` has rank RANK send itself SIGNAL in its N-th
training step (its N-th evaluation with ``:eval``), as a cluster's signal would arrive.
"""

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from medcore.cli.command import Command
from medcore.cli.run_setup import resolve_run, start_run
from medcore.config import RunConfig
from medcore.engine.rng import seed_everything
from medcore.engine.trainer import Trainer


@dataclass
class Cfg(RunConfig):
    pass


def train(args) -> int:
    with start_run(resolve_run(args, Cfg, "devicescmd")) as ctx:
        return _train(ctx)


def _train(ctx) -> int:
    if os.environ.get("DEVICES_CMD_PIDS"):
        pids = Path(os.environ["DEVICES_CMD_PIDS"])
        (pids / f"rank{ctx.dist.rank}.pid").write_text(str(os.getpid()))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=gen)
    data = TensorDataset(x, x.sum(1, keepdim=True))
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 1)
    )
    seed_everything(ctx.cfg.seed + ctx.dist.rank)  # the same weights, a dropout stream per rank
    slow = os.environ.get("DEVICES_CMD_SLOW") == "1"
    rank, at, name, *where = (os.environ.get("DEVICES_CMD_SIGNAL") or "-1:0:SIGTERM").split(":")
    calls = {"step": 0, "eval": 0}

    def maybe_signal(kind: str) -> None:
        calls[kind] += 1
        if int(rank) == ctx.dist.rank and calls[kind] == int(at) and kind == (where or ["step"])[0]:
            os.kill(os.getpid(), getattr(signal, name))

    def step(m: nn.Module, batch) -> torch.Tensor:
        maybe_signal("step")
        if slow:
            time.sleep(0.2)
        if os.environ.get("DEVICES_CMD_FAIL_RANK") == str(ctx.dist.rank):
            raise RuntimeError(f"rank {ctx.dist.rank} failed")
        xb, yb = batch
        return ((m(xb) - yb) ** 2).mean()

    def evaluate(m: nn.Module, ectx) -> dict[str, float]:
        maybe_signal("eval")
        return {"val/loss": float(((m(x) - x.sum(1, keepdim=True)) ** 2).mean())}

    trainer = Trainer(
        model,
        ctx.cfg.trainer,
        fabric=ctx.fabric,
        train_data=data,
        step_fn=step,
        run_dir=ctx.run_dir,
        kind="devicescmd.MLP",
        evaluate_fn=evaluate,
        seed=ctx.cfg.seed,
        show_progress=False,
    )
    result = trainer.fit(resume=ctx.resume)
    if ctx.dist.is_main:
        torch.save(trainer.model.state_dict(), ctx.run_dir / "weights.pt")
        (ctx.run_dir / "result.json").write_text(
            json.dumps({"world_size": ctx.dist.world_size, "global_step": result.global_step})
        )
    return 0


# Its own entry point as prog: the ranks it starts run ``medcore.cli.launch devices_cmd:main``.
main = Command("devices_cmd:main", "a tiny training command", "devices_cmd:train", common=True)
