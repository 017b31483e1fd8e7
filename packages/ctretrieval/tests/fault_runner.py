"""A ctretrieval command that pauses at a chosen point, to be killed there by test_faults.py.

usage: fault_runner.py {train,preprocess,append} MARKER N ARGS...

``train``: pauses in the N-th training step (before its forward pass), so every earlier step's
``latest.pt`` is on disk; ``preprocess``: pauses before reading the N-th study; ``append``:
pauses while the staged studies are appended to the existing HDF5 file, before copying the N-th. On
pausing it writes its PID to MARKER and sleeps until the test kills it.
"""

import sys
from pathlib import Path

from medcore.testing import PauseAt


def main() -> int:
    what, marker, at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    argv = sys.argv[4:]
    count = PauseAt(marker, at)

    if what == "train":
        import ctretrieval.train as mod
        from ctretrieval.cli import train as command

        real_step_fn = mod._step_fn

        def step_fn(cfg, augment):
            step = real_step_fn(cfg, augment)

            def paused(model, batch):
                count()
                return step(model, batch)

            return paused

        mod._step_fn = step_fn
    else:
        import ctretrieval.preprocess as mod
        from ctretrieval.cli import preprocess as command

        if what == "preprocess":
            real_one = mod._process_one

            def process_one(study, cfg):
                count()
                return real_one(study, cfg)

            mod._process_one = process_one
        else:
            import h5py

            real_copy = h5py.Group.copy

            def copy(self, *args, **kwargs):
                count()
                return real_copy(self, *args, **kwargs)

            h5py.Group.copy = copy
    return command(argv)


if __name__ == "__main__":
    sys.exit(main())
