"""``histommnet-train`` with a slowed training step, so that a fault test can kill it mid-epoch.

usage: python slow_train.py SECONDS_PER_STEP [histommnet-train arguments]
The sleep changes no number: a run killed and resumed must end with the same weights.
"""

import sys
import time

import histommnet.train as train_module
from histommnet.cli import train

_make_step_fn = train_module._make_step_fn


def _slow_step_fn(*args, **kwargs):
    step_fn = _make_step_fn(*args, **kwargs)
    pause = float(sys.argv[1])

    def step(model, batch):
        time.sleep(pause)
        return step_fn(model, batch)

    return step


if __name__ == "__main__":
    train_module._make_step_fn = _slow_step_fn
    raise SystemExit(train(sys.argv[2:]))
