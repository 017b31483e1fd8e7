"""``binensemble-train`` that pauses in a chosen training step, to be killed there by test_faults.py.

usage: fault_runner.py MARKER N [binensemble-train arguments]

Pauses in the N-th training step (before its forward pass), so every earlier step's
``latest.pt`` is on disk (with ``trainer.save_every_steps=1``); on pausing it writes its PID to
MARKER and sleeps until the test kills it. The pause changes no number.
"""

import sys
from pathlib import Path

import binensemble.train as train_module
from binensemble.cli import train
from medcore.testing import PauseAt


def main() -> int:
    marker, at = Path(sys.argv[1]), int(sys.argv[2])
    real_step_fn = train_module._step_fn
    pause = PauseAt(marker, at)

    def step_fn(cfg):
        step = real_step_fn(cfg)

        def paused(model, batch):
            pause()
            return step(model, batch)

        return paused

    train_module._step_fn = step_fn
    return train(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
