"""``cxrlandmarks-train`` that pauses in a chosen training step, to be killed there by test_faults.py.

usage: fault_runner.py MARKER N [cxrlandmarks-train arguments]

Pauses in the N-th training step counted over all phases (in the loss, after the forward pass),
so every earlier step's ``latest.pt`` is on disk; on pausing it writes its PID to MARKER and
sleeps until the test kills it. The pause changes no number.
"""

import os
import sys
import time
from pathlib import Path


def main() -> int:
    marker, at, argv = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    import cxrlandmarks.train as mod
    from cxrlandmarks.cli import train

    real_build_loss = mod.build_loss
    calls = [0]

    def build_loss(*args, **kwargs):
        criterion = real_build_loss(*args, **kwargs)
        forward = criterion.forward

        def paused(*a, **k):
            calls[0] += 1
            if calls[0] == at:
                marker.write_text(str(os.getpid()))
                time.sleep(600)
            return forward(*a, **k)

        criterion.forward = paused
        return criterion

    mod.build_loss = build_loss
    return train(argv)


if __name__ == "__main__":
    sys.exit(main())
