"""Shared fixtures: tiny synthetic BreakHis trees written with Pillow in the real layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from histommnet.config import MAGNIFICATIONS, DataConfig, HistoConfig, ModelConfig
from histommnet.synthetic import generate_breakhis
from medcore.testing import random_image, write_png

NORM = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}

# Small enough to run in seconds on a CI CPU, with the same classes as the real configs.
TINY_SET = [
    "num_threads=1",
    "model.backbone=test_efficientnet",
    "model.embed_dim=32",
    "model.attention_scales=[1,3]",
    "data.image_size=32",
    "data.eval_max_draws=2",
    "trainer.epochs=1",
    "trainer.max_steps_per_epoch=2",
    "trainer.batch_size=4",
    "trainer.num_workers=0",
    "cv.folds=2",
]


def _tiny_args(*extra: str) -> list[str]:
    args: list[str] = []
    for item in [*TINY_SET, *extra]:
        args += ["--set", item]
    return args


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The medcore cache (demo data, decoded image stores) under the session's temp dir."""
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def tiny_args():
    """``tiny_args(*extra_set_items)`` -> the ``--set`` flags of the tiny training config."""
    return _tiny_args


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 patients (2 per subtype), 2-3 tiles of 32 px per magnification."""
    root = tmp_path_factory.mktemp("breakhis")
    generate_breakhis(
        root, patients_per_subtype=2, images_per_magnification=(2, 3), size=32, seed=1
    )
    return root


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
    return ModelConfig(
        backbone="test_efficientnet",
        pretrained=False,
        embed_dim=32,
        num_heads=4,
        attention_scales=[1, 3],
        dropout=0.1,
        drop_path_rate=0.0,
    )


@pytest.fixture
def histo_config():
    """``histo_config(model_cfg, magnifications)``: the package config ``build_model`` takes."""

    def make(model: ModelConfig, magnifications: list[str] = MAGNIFICATIONS) -> HistoConfig:
        return HistoConfig(model=model, data=DataConfig(magnifications=list(magnifications)))

    return make


@pytest.fixture
def tiny_data_cfg() -> DataConfig:
    # square tiles; normalisation as a backbone's pretrained config would give it
    return DataConfig(image_size=32, aspect_ratio=1.0, **NORM)


def _write_tile(root: Path, cls: str, folder: str, patient: str, mag: str, name: str) -> Path:
    return write_png(
        root / cls / "SOB" / folder / patient / mag / name, random_image((16, 16), seed=len(name))
    )


@pytest.fixture
def write_tile():
    """``write_tile(root, class, tumour_folder, patient_folder, mag, file_name)`` writes a PNG tile."""
    return _write_tile
