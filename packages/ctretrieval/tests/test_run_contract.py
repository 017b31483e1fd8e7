"""The run contract (medcore.testing.run_contract) on ``ctretrieval-train``: kill -9 and resume,
a second job refused, a full disk, unsafe and foreign checkpoints (also for eval / index /
search), broken data directories, nothing to resume, NaN batches."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

import ctretrieval.train as train_mod
from ctretrieval.cli import index
from medcore.testing.run_contract import CheckpointUse, RunContract, RunSpec, Where

FINDINGS = ["condensacion", "nodulos", "quistes"]
TINY = [
    "num_threads=1",
    "device=cpu",
    "model.num_slices=6",
    "model.image_size=[16,16]",
    "model.embedding_size=8",
    "model.fc_hidden=8",
    "model.reduce_channels=[4,4,4]",
    "data.train_eval_frac=1.0",
    "eval.ks=[1,3]",
    "eval.batch_size=16",
    "trainer.batch_size=4",
    "trainer.epochs=2",
    "trainer.max_steps_per_epoch=2",
    "trainer.num_workers=0",
]


def tiny_argv(data: Path, out: Path) -> list[str]:
    sets = [arg for item in TINY for arg in ("--set", item)]
    return ["--data-dir", str(data), "--output-dir", str(out), *sets]


def nan_in(monkeypatch: pytest.MonkeyPatch, steps: Callable[[int], bool]) -> None:
    """NaN volumes in the training steps ``steps`` accepts (counted from 1)."""
    real = train_mod.make_step_fn
    count = [0]

    def step_fn(cfg, augment):
        step = real(cfg, augment)

        def poisoned(model, batch):
            count[0] += 1
            if steps(count[0]):
                batch = {**batch, "volume": torch.full(batch["volume"].shape, torch.nan)}
            return step(model, batch)

        return poisoned

    monkeypatch.setattr(train_mod, "make_step_fn", step_fn)


def _index(w: Where) -> Path:
    """An index of the good data by the uninterrupted run's model (made once)."""
    path = w.reference.parent / "index.npz"
    if not path.exists():
        ckpt = w.reference / "checkpoints" / "final.pt"
        argv = ["--checkpoint", str(ckpt), "--data-dir", str(w.data), "--output", str(path)]
        assert index(argv) == 0
    return path


def _query(w: Where) -> Path:
    path = w.tmp / "query.nii.gz"
    vol = np.linspace(-900, 300, 10 * 10 * 6, dtype=np.float32).reshape(10, 10, 6)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
    return path


USES = {
    "eval": CheckpointUse(
        lambda ckpt, w: ["--checkpoint", str(ckpt), "--split", "all", "--data-dir", str(w.data)],
        command="ctretrieval.cli:evaluate",
    ),
    "index": CheckpointUse(
        lambda ckpt, w: [
            *("--checkpoint", str(ckpt), "--data-dir", str(w.data)),
            *("--output", str(w.out / "i.npz")),
        ],
        command="ctretrieval.cli:index",
    ),
    "search": CheckpointUse(
        lambda ckpt, w: [
            *("--index", str(_index(w)), "--query", str(_query(w))),
            *("--checkpoint", str(ckpt), "--output", str(w.out / "r.csv")),
        ],
        command="ctretrieval.cli:search",
    ),
}


def _broken(case: str) -> Callable[[Path, Path], Path]:
    """A copy of the good data dir with its labels or volumes broken as ``case`` says."""

    def make(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst)
        csv, h5 = dst / "labels.csv", dst / "volumes.h5"
        frame = pd.read_csv(src / "labels.csv", dtype={"CT": str})
        if case == "labels missing column":
            frame.drop(columns="nodulos").to_csv(csv, index=False)
        elif case == "labels duplicated column":
            rows = [
                f"{r.CT},{r.condensacion},{r.nodulos},{r.quistes},0\n" for r in frame.itertuples()
            ]
            csv.write_text("CT,condensacion,nodulos,quistes,nodulos\n" + "".join(rows))
        elif case == "labels duplicated ids":
            pd.concat([frame, frame.iloc[:1]]).to_csv(csv, index=False)
        elif case == "labels not UTF-8":
            text = frame.to_csv(index=False).replace("condensacion", "condensaci\u00f3n")
            csv.write_bytes(text.encode("latin-1"))
        elif case == "labels zero-byte":
            csv.write_bytes(b"")
        elif case == "labels all outside {0,1}":
            frame[FINDINGS] = 2
            frame.to_csv(csv, index=False)
        elif case == "no study id in common":
            frame.assign(CT=[f"x{i}" for i in range(len(frame))]).to_csv(csv, index=False)
        elif case == "volumes zero-byte":
            h5.write_bytes(b"")
        elif case == "volumes not HDF5":
            h5.write_bytes(b"this is not an HDF5 file" * 10)
        elif case == "volumes truncated":
            h5.write_bytes(h5.read_bytes()[:3000])
        else:  # one volume replaced: of another shape, 2-D, or float
            data = {
                "volumes of mixed shapes": np.zeros((5, 16, 16), np.uint8),
                "volume 2-D": np.zeros((16, 16), np.uint8),
                "volumes float": np.zeros((6, 16, 16), np.float32),
            }[case]
            with h5py.File(h5, "a") as f:
                del f["volumes/s03"]
                f["volumes"].create_dataset("s03", data=data)
        return dst

    return make


DATA_ERRORS = {
    "labels missing column": "missing column(s) nodulos",
    "labels duplicated column": "duplicated column(s)",
    "labels duplicated ids": "duplicated CT value(s): s00",
    "labels not UTF-8": "not UTF-8",
    "labels zero-byte": "the CSV is empty",
    "labels all outside {0,1}": "no row has 0/1 values",
    "no study id in common": "no study id in common",
    "volumes zero-byte": "not a readable HDF5 file",
    "volumes not HDF5": "not a readable HDF5 file",
    "volumes truncated": "volumes.h5",
    "volumes of mixed shapes": "s03",
    "volume 2-D": "s03",
    "volumes float": "uint8",
}


class TestRunContract(RunContract):
    spec = RunSpec(
        entry="ctretrieval.cli:train",
        kind="ctretrieval.Proximity100x100",
        argv=tiny_argv,
        poison=nan_in,
        summary="queries ranked against",
        checkpoint_uses=USES,
        data_errors={case: (_broken(case), message) for case, message in DATA_ERRORS.items()},
    )

    @pytest.fixture(scope="class")
    def data_dir(self, tiny_volumes: Path) -> Path:
        return tiny_volumes
