"""``binensemble-train`` that pauses in a chosen training step, to be killed there by test_faults.py.

usage: fault_runner.py MARKER N [binensemble-train arguments]

Pauses in the N-th training step (before its forward pass), so every earlier step's
``latest.pt`` is on disk (with ``trainer.save_every_steps=1``); on pausing it writes its PID to
MARKER and sleeps until the test kills it. The pause changes no number.
"""

import os
import sys
import time
from pathlib import Path

import binensemble.train as train_module
from binensemble.cli import train


def main() -> int:
    marker, at = Path(sys.argv[1]), int(sys.argv[2])
    real_step_fn = train_module._step_fn
    calls = [0]

    def step_fn(cfg):
        step = real_step_fn(cfg)

        def paused(model, batch):
            calls[0] += 1
            if calls[0] == at:
                marker.write_text(str(os.getpid()))
                time.sleep(600)
            return step(model, batch)

        return paused

    train_module._step_fn = step_fn
    return train(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
