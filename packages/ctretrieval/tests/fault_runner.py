"""``ctretrieval-preprocess`` pausing at a chosen point, to be killed there by test_faults.py.

usage: fault_runner.py {preprocess,append} MARKER N ARGS...

``preprocess``: pauses before reading the N-th study; ``append``: pauses while the staged studies
are appended to the existing HDF5 file, before copying the N-th. On pausing it writes its PID to
MARKER and sleeps until the test kills it.
"""

import sys
from pathlib import Path

import h5py

import ctretrieval.preprocess as mod
from ctretrieval.cli import preprocess
from medcore.testing import PauseAt


def main() -> int:
    what, marker, at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    count = PauseAt(marker, at)
    if what == "preprocess":
        real_one = mod._process_one

        def process_one(study, cfg):
            count()
            return real_one(study, cfg)

        mod._process_one = process_one
    else:
        real_copy = h5py.Group.copy

        def copy(self, *args, **kwargs):
            count()
            return real_copy(self, *args, **kwargs)

        h5py.Group.copy = copy
    return preprocess(sys.argv[4:])


if __name__ == "__main__":
    sys.exit(main())
