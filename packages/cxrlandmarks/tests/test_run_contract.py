"""The run contract (medcore.testing.run_contract) on ``cxrlandmarks-train``: kill -9 inside
phase 2 and resume (phase 1 kept, the other phases and the final model the same as an
uninterrupted run), a second job refused, a full disk, unsafe and foreign checkpoints (also for
predict, eval and ``--init-from``), broken data directories, nothing to resume, NaN batches."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrlandmarks.data import HEADED_COLUMNS, LandmarkDataset
from medcore.testing.run_contract import CheckpointUse, RunContract, RunSpec, Where

pytestmark = pytest.mark.filterwarnings("ignore:cannot stratify:UserWarning")

CSV = "coordenadas/coordenadas_maestro.csv"
# Phase 1 trains 2 epochs of 2 steps, phase 2 one epoch of 2 (killed in its middle), phases 3
# and 4 one step each. Augmented per sample (the CPU path), so that NaN can be put in a sample.
TINY = [
    "num_threads=1",
    "data.image_size=32",
    "data.eval_batch_size=32",
    "eval.grid_images=2",
    "trainer.num_workers=0",
    "augment.batched=false",
    *(f"phases.phase{p}.batch_size=4" for p in range(1, 5)),
    *(f"phases.phase{p}.epochs={2 if p == 1 else 1}" for p in range(1, 5)),
    *(f"phases.phase{p}.max_steps_per_epoch={2 if p <= 2 else 1}" for p in range(1, 5)),
]
BATCH = 4


def _argv(data: Path, out: Path, phase: str) -> list[str]:
    sets = [arg for item in TINY for arg in ("--set", item)]
    return [
        *("--data-dir", str(data), "--output-dir", str(out)),
        *("--config", "default", "--device", "cpu", "--phase", phase, *sets),
    ]


def tiny_argv(data: Path, out: Path) -> list[str]:
    return _argv(data, out, "all")


def nan_in(monkeypatch: pytest.MonkeyPatch, steps: Callable[[int], bool]) -> None:
    """NaN pixels in the first sample of the training steps ``steps`` accepts (from 1): the
    training sets' samples are drawn batch by batch, ``BATCH`` to a step."""
    original = LandmarkDataset.__getitem__
    calls = [0]

    def getitem(self: LandmarkDataset, index: int) -> dict:
        item = original(self, index)
        if self.augment is not None:  # a training set
            calls[0] += 1
            if calls[0] % BATCH == 1 and steps(calls[0] // BATCH + 1):
                item["image"] = torch.full_like(item["image"], float("nan"))
        return item

    monkeypatch.setattr(LandmarkDataset, "__getitem__", getitem)


def _copy(data: Path, root: Path) -> Path:
    shutil.copytree(data, root)
    return root


def _write_csv(content: Callable[[str], str | bytes]) -> Callable[[Path, Path], Path]:
    """A copy of the tiny data whose CSV is ``content(original CSV text)``."""

    def make(data: Path, root: Path) -> Path:
        _copy(data, root)
        text = content((data / CSV).read_text(encoding="utf-8"))
        (root / CSV).write_bytes(text if isinstance(text, bytes) else text.encode())
        return root

    return make


def _headed(columns: Callable[[list[str]], list[str]]) -> Callable[[str], str]:
    def content(text: str) -> str:
        frame = pd.DataFrame(
            [[*(line.split(",")[-1:]), *line.split(",")[1:-1]] for line in text.splitlines()],
            columns=["image_name", *HEADED_COLUMNS],
        )
        return frame[columns(["image_name", *HEADED_COLUMNS])].to_csv(index=False)

    return content


def _each_line(change: Callable[[list[str]], list[str]]) -> Callable[[str], str]:
    return lambda text: "\n".join(",".join(change(x.split(","))) for x in text.splitlines())


def _no_images(data: Path, root: Path) -> Path:
    _copy(data, root)
    shutil.rmtree(root / "dataset")
    (root / "dataset").mkdir()
    return root


def _no_csv(data: Path, root: Path) -> Path:
    _copy(data, root)
    (root / CSV).unlink()
    return root


def _data_file(data: Path, root: Path) -> Path:
    root.mkdir()
    pixels = np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "data.png")
    return root / "data.png"


DATA_ERRORS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "empty_data_dir": (lambda d, r: r.mkdir() or r, "image directory not found"),
    "data_dir_is_a_file": (_data_file, "data directory not found"),
    "csv_missing": (_no_csv, "file not found"),
    "zero_byte_csv": (_write_csv(lambda t: ""), "the CSV is empty"),
    "non_utf8_csv": (
        _write_csv(lambda t: t.replace("Normal-1\n", "Normal-1\xe9\n").encode("latin-1")),
        "not UTF-8",
    ),
    "headerless_wrong_number_of_coordinates": (
        _write_csv(_each_line(lambda f: [*f[:-2], f[-1]])),
        "expected 32 columns (id, 15 x/y pairs, image name), found 31",
    ),
    "headerless_extra_column": (
        _write_csv(_each_line(lambda f: [*f, "extra"])),
        "expected 32 columns (id, 15 x/y pairs, image name), found 33",
    ),
    "headerless_row_with_extra_fields": (
        _write_csv(lambda t: t.replace("Normal-1\n", "Normal-1,7\n")),
        "cannot parse CSV",
    ),
    "headed_missing_column": (
        _write_csv(_headed(lambda cols: [c for c in cols if c != "L15_y"])),
        "missing column(s) L15_y",
    ),
    "headed_duplicated_column": (
        _write_csv(_headed(lambda cols: [*cols, "L7_x"])),
        "duplicated column(s): L7_x.1",
    ),
    "header_only": (
        _write_csv(lambda t: "image_name," + ",".join(HEADED_COLUMNS) + "\n"),
        "no usable rows",
    ),
    "every_row_broken": (
        _write_csv(_each_line(lambda f: [f[0], "nan", *f[2:]])),
        "no usable rows",
    ),
    # Every annotated row without its image: far over the 2% bar, counted per category.
    "image_folder_empty": (_no_images, "18 of 18 annotated rows (100.0%) have no image file"),
    "too_few_images_to_split": (
        _write_csv(lambda t: "\n".join(t.splitlines()[:2]) + "\n"),
        "data.split_ratios: cannot split 2 samples into train, val, test",
    ),
}


def _predict_argv(ckpt: Path, w: Where) -> list[str]:
    image = w.data / "dataset" / "COVID" / "COVID-1.png"
    return [str(image), "--checkpoint", str(ckpt), "--output-dir", str(w.out), "--device", "cpu"]


USES = {
    "predict": CheckpointUse(_predict_argv, command="cxrlandmarks.cli:predict"),
    "eval": CheckpointUse(
        lambda ckpt, w: [
            *("--checkpoint", str(ckpt), "--data-dir", str(w.data), "--output-dir", str(w.out))
        ],
        command="cxrlandmarks.cli:evaluate",
    ),
    "train --init-from": CheckpointUse(
        lambda ckpt, w: [*_argv(w.data, w.run, "2"), "--init-from", str(ckpt)]
    ),
}


class TestRunContract(RunContract):
    spec = RunSpec(
        entry="cxrlandmarks.cli:train",
        kind="cxrlandmarks.ResNetLandmarkRegressor",
        argv=tiny_argv,
        poison=nan_in,
        stage="phase1",
        kill_stage="phase2",
        finished_before=("phase1",),
        compare=(
            "checkpoints/phase1_best.pt",
            "checkpoints/phase2_best.pt",
            "phase2/checkpoints/final.pt",
            "phase3/checkpoints/final.pt",
            "phase4/checkpoints/final.pt",
            "checkpoints/geometric_complete.pt",
        ),
        outputs=("checkpoints",),
        summary="final (phase4)",
        checkpoint_uses=USES,
        data_errors=DATA_ERRORS,
    )

    @pytest.fixture(scope="class")
    def data_dir(self, tiny_radiographs: Path) -> Path:
        return tiny_radiographs
