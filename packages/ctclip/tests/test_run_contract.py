"""The run contract (medcore.testing.run_contract) on ``ctclip-train``: kill -9 and resume, a
second job refused, a full disk, unsafe and foreign checkpoints (also for ``ctclip-eval``),
broken data directories, nothing to resume, NaN losses."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import ctclip.train as train_mod
from medcore.testing.run_contract import CheckpointUse, RunContract, RunSpec, Where

# conftest is not importable under --import-mode=importlib: load its tiny settings by file.
_spec = importlib.util.spec_from_file_location(
    "_ctclip_conftest", Path(__file__).parent / "conftest.py"
)
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)

# On top of conftest's tiny model: 8 training volumes, batch 4 -> 2 steps per epoch, 2 epochs.
RUN = [
    *_conftest.TINY_SETS,
    "num_threads=1",
    "device=cpu",
    "trainer.epochs=2",
    "trainer.num_workers=0",
    "trainer.warmup_steps=1",
    "validation.do_validate=false",
]


def tiny_argv(data: Path, out: Path) -> list[str]:
    sets = [arg for item in RUN for arg in ("--set", item)]
    return ["--data-dir", str(data), "--output-dir", str(out), *sets]


def nan_in(monkeypatch: pytest.MonkeyPatch, steps: Callable[[int], bool]) -> None:
    """NaN image features in the training steps ``steps`` accepts (counted from 1)."""
    count = [0]
    real = train_mod.ClipLoss

    class PoisonedLoss(real):
        def forward(self, image, text, scale):
            count[0] += 1
            if steps(count[0]):
                image = image * torch.nan
            return super().forward(image, text, scale)

    monkeypatch.setattr(train_mod, "ClipLoss", PoisonedLoss)


def _eval_argv(ckpt: Path, w: Where) -> list[str]:
    return [
        *("--model-path", str(ckpt), "--test-data", str(w.data / "ct_volumes.h5")),
        *("--test-labels", str(w.data / "ct_rate" / "valid_predicted_labels.csv")),
        *("--output-dir", str(w.out), "--n-boot", "10", "--device", "cpu"),
    ]


def _broken(case: str) -> Callable[[Path, Path], Path]:
    """A copy of the good data dir (HDF5 + CSVs) with one thing broken as ``case`` says."""

    def make(src: Path, dst: Path) -> Path:
        dst.mkdir(parents=True)
        if case == "empty data directory":
            return dst
        shutil.copytree(src / "ct_rate", dst / "ct_rate")
        shutil.copy(src / "ct_volumes.h5", dst / "ct_volumes.h5")
        h5, reports = dst / "ct_volumes.h5", dst / "ct_rate" / "train_reports.csv"
        rep = pd.read_csv(reports)
        first = rep["VolumeName"][0]
        if case == "reports missing column":
            rep.drop(columns="Findings_EN").to_csv(reports, index=False)
        elif case == "reports duplicated ids":
            pd.concat([rep, rep.iloc[:1]]).to_csv(reports, index=False)
        elif case == "reports not UTF-8":
            text = rep.assign(Technique_EN="Tórax").to_csv(index=False)
            reports.write_bytes(text.encode("latin-1"))
        elif case == "reports all texts empty":
            rep.assign(Findings_EN="  ").to_csv(reports, index=False)
        elif case == "reports name climbing out with ../":
            rep.loc[0, "VolumeName"] = "../../etc/passwd"
            rep.to_csv(reports, index=False)
        elif case == "volumes file zero-byte":
            h5.write_bytes(b"")
        elif case == "volumes file truncated":
            h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
        elif case == "volumes file not HDF5":
            h5.write_bytes(b"this is not an HDF5 file" * 40)
        else:
            with h5py.File(h5, "a") as f:
                if case == "volumes file of another tool":
                    del f.attrs["format"]
                elif case == "volume missing from the HDF5":
                    del f["volumes"][first]
                elif case == "volume never marked complete":
                    f["volumes"][first].attrs["complete"] = 0
                else:  # a volume of another shape
                    del f["volumes"][first]
                    f["volumes"].create_dataset(first, data=np.zeros((8, 28), np.uint8))
                    f["volumes"][first].attrs["complete"] = 1
        return dst

    return make


DATA_ERRORS = {
    "empty data directory": "train_reports.csv: file not found",
    "reports missing column": "missing column(s) Findings_EN",
    "reports duplicated ids": "duplicated VolumeName value(s)",
    "reports not UTF-8": "not UTF-8",
    "reports all texts empty": "no report has text in Findings_EN",
    "reports name climbing out with ../": "../../etc/passwd",
    "volumes file zero-byte": "not a readable HDF5 file",
    "volumes file truncated": "not a readable HDF5 file",
    "volumes file not HDF5": "not a readable HDF5 file",
    "volumes file of another tool": "not a ctclip volume file",
    "volume missing from the HDF5": "1 of 8 volumes are not in",
    "volume never marked complete": "1 of 8 volumes are not in",
    "volume of another shape": "shape (8, 28)",
}


class TestRunContract(RunContract):
    spec = RunSpec(
        entry="ctclip.cli:train",
        kind="ctclip.CTCLIP",
        argv=tiny_argv,
        poison=nan_in,
        checkpoint_uses={"eval": CheckpointUse(_eval_argv, command="ctclip.cli:evaluate")},
        data_errors={case: (_broken(case), message) for case, message in DATA_ERRORS.items()},
    )

    @pytest.fixture(scope="class")
    def data_dir(self, tiny_demo: Path) -> Path:
        return tiny_demo
