"""The run contract (medcore.testing.run_contract) on ``binensemble-train --model metric``: kill
-9 and resume (the same weights, saved KNN and predictions), a second job refused, a full disk,
unsafe and foreign checkpoints (also for ``binensemble-predict``), broken data directories,
nothing to resume, NaN batches."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

import binensemble.train as train_mod
from medcore.testing import random_image
from medcore.testing.run_contract import CheckpointUse, RunContract, RunSpec

TINY = [
    "num_threads=1",
    "device=cpu",
    "data.img_size=32",
    "data.eval_batch_size=16",
    "model.convnext_name=test_convnext",
    "model.vit_name=test_vit",
    "model.hidden_dim=32",
    "model.embed_dim=16",
    "trainer.batch_size=8",
    "trainer.num_workers=0",
    "trainer.epochs=2",
    "trainer.max_steps_per_epoch=2",
    "knn.ks=[1,3,5]",
]


def tiny_argv(data: Path, out: Path) -> list[str]:
    sets = [arg for item in TINY for arg in ("--set", item)]
    return ["--model", "metric", "--data-dir", str(data), "--output-dir", str(out), *sets]


def nan_in(monkeypatch: pytest.MonkeyPatch, steps: Callable[[int], bool]) -> None:
    """NaN images in the training steps ``steps`` accepts (counted from 1)."""
    real = train_mod.make_step_fn
    count = [0]

    def step_fn(cfg):
        step = real(cfg)

        def poisoned(model, batch):
            count[0] += 1
            if steps(count[0]):
                # float NaN pixels in place of the store's uint8 ones (step_fn augments either)
                nan = torch.full_like(batch["image"], torch.nan, dtype=torch.float32)
                batch = {**batch, "image": nan}
            return step(model, batch)

        return poisoned

    monkeypatch.setattr(train_mod, "make_step_fn", step_fn)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def _emptied_class(src: Path, dst: Path) -> Path:
    for f in (_copy(src, dst) / "TrainSet" / "disease").iterdir():
        f.unlink()
    return dst


def _broken_class(src: Path, dst: Path) -> Path:
    for f in (_copy(src, dst) / "TrainSet" / "disease").iterdir():
        f.write_bytes(f.read_bytes()[:100])
    return dst


def _second_image_of_an_id(src: Path, dst: Path) -> Path:
    Image.fromarray(random_image((40, 40), seed=3)).save(
        _copy(src, dst) / "TrainSet" / "normal" / "normal_0001.jpg"
    )
    return dst


def _labels(edit: Callable[[pd.DataFrame], pd.DataFrame | bytes]) -> Callable[[Path, Path], Path]:
    """A copy of the data with TestSet_labels.csv edited."""

    def make(src: Path, dst: Path) -> Path:
        path = _copy(src, dst) / "TestSet_labels.csv"
        frame = edit(pd.read_csv(path, dtype={"image_id": str}))
        if isinstance(frame, bytes):
            path.write_bytes(frame)
        else:
            frame.to_csv(path, index=False)
        return dst

    return make


def _label_twice(frame: pd.DataFrame) -> bytes:
    rows = "".join(f"{i},{y},{y}\n" for i, y in zip(frame["image_id"], frame["label"], strict=True))
    return ("image_id,label,label\n" + rows).encode()


def _latin1(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).replace("label", "l\u00e1bel").encode("latin-1")


DATA_ERRORS = {
    "empty_data_dir": (
        lambda src, r: (r.mkdir(), r)[1],
        "TrainSet: not found (expected TrainSet/{normal,disease}/",
    ),
    "class_folder_missing": (
        lambda src, r: (shutil.rmtree(_copy(src, r) / "TrainSet" / "normal"), r)[1],
        "class folder not found",
    ),
    "class_folder_empty": (_emptied_class, "class folder has no images"),
    "class_folder_only_broken_images": (_broken_class, "no readable image in this class folder"),
    "two_images_one_id": (_second_image_of_an_id, "two images share the id 'normal/normal_0001'"),
    "test_labels_missing_column": (
        _labels(lambda f: f.drop(columns="label")),
        "missing column(s) label",
    ),
    "test_labels_duplicated_column": (_labels(_label_twice), "duplicated column(s)"),
    "test_labels_duplicated_ids": (
        _labels(lambda f: pd.concat([f, f.iloc[:1]])),
        "duplicated image_id value(s): 1",
    ),
    "test_labels_not_utf8": (_labels(_latin1), "not UTF-8"),
    "test_labels_zero_byte": (_labels(lambda f: b""), "the CSV is empty"),
    "test_labels_outside_0_1": (
        _labels(lambda f: f.assign(label=2)),
        "labels must be class ids 0..1",
    ),
    "test_labels_not_covering_test_images": (
        _labels(lambda f: f.iloc[1:]),
        "no label for 1 test image(s) (e.g. '1')",
    ),
}


class TestRunContract(RunContract):
    spec = RunSpec(
        entry="binensemble.cli:train",
        kind="binensemble.MetricModel",
        argv=tiny_argv,
        poison=nan_in,
        compare=(
            "checkpoints/final.pt",
            "model.pt",
            "predictions/metric_probs.csv",
            "predictions/metric_val_probs.csv",
        ),
        outputs=("model.pt", "predictions"),
        summary="metric",
        checkpoint_uses={
            # a model directory holding model.pt
            "predict": CheckpointUse(
                lambda ckpt, w: [str(ckpt.parent), "--data-dir", str(w.data)],
                command="binensemble.cli:predict",
            ),
        },
        data_errors=DATA_ERRORS,
    )

    @pytest.fixture(scope="class")
    def data_dir(self, tiny_data: Path) -> Path:
        return tiny_data
