"""``ctclip-preprocess`` pausing at a chosen point, to be killed there by test_faults.py.

usage: fault_runner.py {preprocess,write} MARKER N ARGS...

``preprocess``: pauses before reading the N-th volume; ``write``: pauses inside the write of the
N-th volume, after its data went into the HDF5 file and before its ``complete`` mark. On pausing
it writes its PID to MARKER and sleeps until the test kills it.
"""

import sys
from pathlib import Path

import h5py

import ctclip.preprocess as mod
from ctclip.cli import preprocess
from medcore.testing import PauseAt


def main() -> int:
    what, marker, at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    count = PauseAt(marker, at)
    if what == "preprocess":
        real_one = mod.preprocess_volume

        def preprocess_volume(*args, **kwargs):
            count()
            return real_one(*args, **kwargs)

        mod.preprocess_volume = preprocess_volume
    else:
        real_create = h5py.Group.create_dataset

        def create_dataset(self, *args, **kwargs):
            ds = real_create(self, *args, **kwargs)
            if count.next_pauses:
                self.file.flush()  # the worst case: the unmarked volume reached the disk
            count()  # the data is in, the complete mark not yet
            return ds

        h5py.Group.create_dataset = create_dataset
    return preprocess(sys.argv[4:])


if __name__ == "__main__":
    sys.exit(main())
