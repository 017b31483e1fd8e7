"""Training learns: a seeded tiny run beats the mean-shape baseline on the test split."""

import json

import numpy as np

from cxrlandmarks.cli import train
from cxrlandmarks.config import DataConfig
from cxrlandmarks.data import load_records, resolve_data_dir
from medcore.splits import load_splits

IMAGES_PER_CATEGORY = 40
# One phase, trunk trained (from scratch), no augmentation, 32 px input: 10 epochs of 11 steps.
SETS = [
    "num_threads=1",
    "data.image_size=32",
    f"data.demo_images_per_category={IMAGES_PER_CATEGORY}",
    "augment.enabled=false",
    "eval.grid_images=2",
    "phases.phase1.freeze_trunk=false",
    "phases.phase1.trunk_lr=1e-3",
    "phases.phase1.head_lr=HEAD_LR",
    "phases.phase1.epochs=10",
    "phases.phase1.batch_size=8",
]
MARGIN = 0.15  # the model's test error is at least 15% below the mean shape's


def test_seeded_tiny_run_beats_the_mean_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    argv = ["--config", "default", "--device", "cpu", "--seed", "0", "--phase", "1"]
    argv += ["--output-dir", str(run)]
    for item in SETS:
        argv += ["--set", item]
    assert train(argv) == 0
    model_px = json.loads((run / "metrics.json").read_text())["mean_px"]

    cfg = DataConfig(demo_images_per_category=IMAGES_PER_CATEGORY)
    records = load_records(cfg, resolve_data_dir(cfg))
    splits = load_splits(run / "splits.json", ids=[r.name for r in records])
    train_t = np.stack([records[i].normalised for i in splits["train"]])
    test_t = np.stack([records[i].normalised for i in splits["test"]])
    mean_shape_px = np.linalg.norm(train_t.mean(0) - test_t, axis=-1).mean() * 224
    assert model_px < (1 - MARGIN) * mean_shape_px, (model_px, mean_shape_px)
