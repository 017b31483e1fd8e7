from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histommnet.breakhis import draws_per_patient, scan_breakhis
from histommnet.config import DataConfig
from histommnet.data import MultiMagDataset, WorkingImages, adjust_batch_size
from medcore.errors import DataError
from medcore.testing import write_png


@pytest.fixture
def patients(tiny_tree: Path):
    return scan_breakhis(tiny_tree, verbose=False).patients


def test_epoch_sampling_is_deterministic_and_varies(patients, tiny_data_cfg: DataConfig) -> None:
    a = MultiMagDataset(patients, tiny_data_cfg, train=True, seed=7)
    b = MultiMagDataset(patients, tiny_data_cfg, train=True, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    assert a.draws == b.draws
    first = list(a.draws)
    a.set_epoch(4)
    assert a.draws != first and len(a.draws) == len(first)  # new draws, same epoch length
    a.set_epoch(3)
    assert a.draws == first
    c = MultiMagDataset(patients, tiny_data_cfg, train=True, seed=8)
    c.set_epoch(3)
    assert c.draws != first


def test_sampling_follows_adaptive_rule(patients, tiny_data_cfg: DataConfig) -> None:
    ds = MultiMagDataset(patients, tiny_data_cfg, train=True, seed=0)
    per_patient = Counter(p_idx for p_idx, _ in ds.draws)
    for i, patient in enumerate(patients):
        n = min(patient.counts(tiny_data_cfg.magnifications))
        assert per_patient[i] == draws_per_patient(n) == max(3, math.ceil(0.6 * n))
    # A patient's images of one magnification are not repeated before all were used.
    for i, patient in enumerate(patients):
        draws = [paths for p_idx, paths in ds.draws if p_idx == i]
        for j, mag in enumerate(tiny_data_cfg.magnifications):
            pool = len(patient.images[mag])
            used = [d[j] for d in draws][:pool]
            assert len(set(used)) == len(used)
            assert all(f"/{mag}/" in path for path in used)
    capped = MultiMagDataset(
        patients, dataclasses.replace(tiny_data_cfg, max_draws_per_patient=2), train=True
    )
    assert len(capped) == 2 * len(patients)


def test_eval_draws_cover_every_image(patients, tiny_data_cfg: DataConfig) -> None:
    ds = MultiMagDataset(patients, tiny_data_cfg, train=False)
    ds.set_epoch(5)  # evaluation draws do not depend on the epoch
    again = MultiMagDataset(patients, tiny_data_cfg, train=False)
    assert ds.draws == again.draws
    seen = {path for _, paths in ds.draws for path in paths}
    every = {path for p in patients for m in tiny_data_cfg.magnifications for path in p.images[m]}
    assert seen == every


def test_item_shapes_and_labels(patients, tiny_data_cfg: DataConfig) -> None:
    ds = MultiMagDataset(patients, tiny_data_cfg, train=True, seed=0)
    item = ds[0]
    assert item["images"].shape == (4, 3, 32, 32) and item["images"].dtype == torch.float32
    p_idx = int(item["patient"])
    assert (
        int(item["label"]) == patients[p_idx].label
        and int(item["subtype"]) == patients[p_idx].subtype
    )


def test_unreadable_image_at_load_is_replaced_and_named(
    patients, tiny_data_cfg: DataConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    patient = dataclasses.replace(
        patients[0], images={m: list(v) for m, v in patients[0].images.items()}
    )
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    patient.images["40X"] = [str(broken), *patient.images["40X"]]
    ds = MultiMagDataset([patient], tiny_data_cfg, train=False)
    for i in range(len(ds)):
        assert ds[i]["images"].shape == (4, 3, 32, 32)
    assert str(broken) in capsys.readouterr().err
    patient.images["40X"] = [str(broken)]
    only_bad = MultiMagDataset([patient], tiny_data_cfg, train=False)
    with pytest.raises(DataError, match="no readable image at 40X"):
        only_bad[0]


@pytest.mark.parametrize(
    ("requested", "n", "expected"),
    [
        (16, 400, (16, False)),  # plenty of data: as requested
        (16, 40, (10, False)),  # shrinks to keep 4 batches per epoch
        (16, 9, (2, True)),  # 9 % 2 == 1: the single-sample batch is dropped
        (8, 13, (3, True)),
        (4, 3, (2, True)),
    ],
)
def test_adjust_batch_size(requested: int, n: int, expected: tuple[int, bool]) -> None:
    assert adjust_batch_size(requested, n, min_batches=4) == expected


def test_adjust_batch_size_too_small() -> None:
    with pytest.raises(DataError):
        adjust_batch_size(8, 1)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_working_images_resize_with_the_backbones_interpolation(
    tmp_path: Path, interpolation: str
) -> None:
    tile = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = write_png(tmp_path / "tile.png", tile)
    cfg = DataConfig(
        image_size=32,
        aspect_ratio=1.0,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        interpolation=interpolation,
    )
    got = WorkingImages([str(path)], cfg, progress=False).get(str(path))
    pil = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
    reference = np.asarray(Image.fromarray(tile).resize((32, 32), pil))
    assert torch.equal(got, torch.from_numpy(reference).permute(2, 0, 1).float() / 255.0)
