"""The run contract (medcore.testing.run_contract) on ``histommnet-train --fold 0``: kill -9 and
resume, a second job refused, a full disk, unsafe and foreign checkpoints (also for
``histommnet-gradcam``), broken data directories, nothing to resume, NaN batches."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import histommnet.train as train_mod
from medcore.testing.run_contract import CheckpointUse, RunContract, RunSpec

TINY = [
    "num_threads=1",
    "model.backbone=test_efficientnet",
    "model.embed_dim=32",
    "model.attention_scales=[1,3]",
    "data.image_size=32",
    "data.eval_max_draws=2",
    "trainer.epochs=2",
    "trainer.max_steps_per_epoch=2",
    "trainer.batch_size=4",
    "trainer.num_workers=0",
    "cv.folds=2",
]


def tiny_argv(data: Path, out: Path) -> list[str]:
    sets = [arg for item in TINY for arg in ("--set", item)]
    return ["--data-dir", str(data), "--output-dir", str(out), "--fold", "0", *sets]


def nan_in(monkeypatch: pytest.MonkeyPatch, steps: Callable[[int], bool]) -> None:
    """One NaN image in the batches of the training steps ``steps`` accepts (from 1)."""
    real = train_mod.make_step_fn
    count = [0]

    def make_step_fn(*args, **kwargs):
        step = real(*args, **kwargs)

        def poisoned(model, batch):
            count[0] += 1
            if steps(count[0]):
                images = batch["images"].clone()
                images[0] = torch.nan
                batch = {**batch, "images": images}
            return step(model, batch)

        return poisoned

    monkeypatch.setattr(train_mod, "make_step_fn", make_step_fn)


def _file(src: Path, dst: Path) -> Path:
    """A PNG file where the data directory should be."""
    tile = next(src.rglob("*.png"))
    dst.write_bytes(tile.read_bytes())
    return dst


class TestRunContract(RunContract):
    spec = RunSpec(
        entry="histommnet.cli:train",
        kind="histommnet.MMNet",
        argv=tiny_argv,
        poison=nan_in,
        stage="fold_0",
        outputs=("fold_0/result.json",),
        summary="mean ± std",
        checkpoint_uses={
            "gradcam": CheckpointUse(
                lambda ckpt, w: ["--checkpoint", str(ckpt), "--output-dir", str(w.out)],
                command="histommnet.cli:gradcam",
            ),
        },
        data_errors={
            "empty_data_dir": (lambda src, r: (r.mkdir(), r)[1], "no usable BreakHis images"),
            "data_dir_is_a_file": (_file, "not a directory"),
        },
    )

    @pytest.fixture(scope="class")
    def data_dir(self, tiny_tree: Path) -> Path:
        return tiny_tree
