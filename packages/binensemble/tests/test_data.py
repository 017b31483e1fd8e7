from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from binensemble.config import DataConfig
from binensemble.data import (
    BalancedBatchSampler,
    ImageDataset,
    scan_labelled,
    scan_unlabelled,
    train_augmentation,
)
from medcore.errors import DataError
from medcore.testing import write_png


def test_scan_labels_ids_and_natural_order(tiny_data: Path) -> None:
    cfg = DataConfig()
    images = scan_labelled(tiny_data, cfg)
    assert len(images) == 24 and images.labels.tolist() == [0] * 14 + [1] * 10
    assert images.ids[0] == "normal/normal_0001" and images.ids[-1] == "disease/disease_0010"
    test = scan_unlabelled(tiny_data, cfg)
    assert test.ids == [str(i) for i in range(1, 7)]  # "10" would sort after "9"


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    write_png(tmp_path / "TrainSet" / "normal" / "a.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "TrainSet" / "disease").mkdir()
    with pytest.raises(DataError, match="no images"):
        scan_labelled(tmp_path, DataConfig())


def test_unreadable_image_is_a_named_skip(tiny_data: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    (root / "TrainSet" / "disease" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    images = scan_labelled(root, DataConfig())
    err = capsys.readouterr().err
    assert "broken.png" in err and "skipped 1 unreadable" in err
    assert len(images) == 24 and not any("broken" in i for i in images.ids)


def test_training_transform_output(tiny_data: Path) -> None:
    cfg = DataConfig(img_size=32)
    item = ImageDataset(scan_labelled(tiny_data, cfg))[0]
    # The store's working size (img_size * resize_scale) in uint8; crops are cut on the device.
    assert item["image"].shape == (3, 35, 35) and item["image"].dtype == torch.uint8
    batch = torch.stack([item["image"], item["image"]]).float() / 255
    image = train_augmentation(cfg)(batch)
    assert image.shape == (2, 3, 32, 32) and image.dtype == torch.float32
    # [0, 1] pixels: each branch of the model normalises them with its own statistics.
    assert item["label"] == 0 and 0 <= image.min() < image.max() <= 1
    assert not torch.equal(image[0], image[1])  # each image of the batch its own draw


def test_balanced_sampler_batches() -> None:
    labels = np.array([0] * 30 + [1] * 7)
    sampler = BalancedBatchSampler(labels, batch_size=8, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    for batch in batches:
        assert sorted(labels[batch].tolist()) == [0] * 4 + [1] * 4
    assert batches == list(BalancedBatchSampler(labels, batch_size=8, seed=1))  # same (seed, epoch)
    sampler.set_epoch(1)
    assert list(sampler) != batches
    ranks = [list(BalancedBatchSampler(labels, 8, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert ranks[0][0] == batches[0] and ranks[1][0] == batches[1]
    with pytest.raises(DataError):
        BalancedBatchSampler(labels, batch_size=3)
