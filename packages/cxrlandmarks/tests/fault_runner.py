"""``cxrlandmarks-train`` that pauses in a chosen training step, to be killed there by test_faults.py.

usage: fault_runner.py MARKER N [cxrlandmarks-train arguments]

Pauses in the N-th training step counted over all phases (in the loss, after the forward pass),
so every earlier step's ``latest.pt`` is on disk; on pausing it writes its PID to MARKER and
sleeps until the test kills it. The pause changes no number.
"""

import sys
from pathlib import Path

from medcore.testing import PauseAt


def main() -> int:
    marker, at, argv = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    import cxrlandmarks.train as mod
    from cxrlandmarks.cli import train

    real_build_loss = mod.build_loss
    pause = PauseAt(marker, at)

    def build_loss(*args, **kwargs):
        criterion = real_build_loss(*args, **kwargs)
        forward = criterion.forward

        def paused(*a, **k):
            pause()
            return forward(*a, **k)

        criterion.forward = paused
        return criterion

    mod.build_loss = build_loss
    return train(argv)


if __name__ == "__main__":
    sys.exit(main())
