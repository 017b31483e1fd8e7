from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import resnet18

from cxrlandmarks.anatomy import CATEGORIES
from cxrlandmarks.synthetic import render_case


def _write_headerless(path: Path, rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def write_headerless():
    """Write rows as a headerless CSV (the original coordinates layout)."""
    return _write_headerless


@pytest.fixture
def small_dataset(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Six synthetic images (2 per category) in the original layout; returns (root, rows)."""
    rng = np.random.default_rng(0)
    rows, meta = [], []
    for category in CATEGORIES:
        for i in range(2):
            img, lm = render_case(rng, category)
            name = f"{category}-{i + 1}"
            folder = tmp_path / "dataset" / category
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="L").save(folder / f"{name}.png")
            coords = np.round(lm).astype(int)
            rows.append([len(rows), *coords.ravel().tolist(), name])
            meta.append({"name": name, "category": category, "coords": coords})
    _write_headerless(tmp_path / "coordenadas" / "coordenadas_maestro.csv", rows)
    return tmp_path, meta


class OriginalRegressor(nn.Module):
    """The original code's layout, built here independently: its trunk is
    ``nn.Sequential(*resnet18.children()[:-1])`` and its head ``regression_head``."""

    def __init__(self, rate: float = 0.5) -> None:
        super().__init__()
        self.backbone = nn.Sequential(*list(resnet18(weights=None).children())[:-1])
        self.regression_head = nn.Sequential(
            nn.Dropout(rate), nn.Linear(512, 512), nn.ReLU(), nn.Dropout(rate / 2),
            nn.Linear(512, 256), nn.ReLU(), nn.Dropout(rate / 4), nn.Linear(256, 30), nn.Sigmoid(),
        )  # fmt: skip

    def forward(self, x):
        return self.regression_head(torch.flatten(self.backbone(x), 1))


def _write_original_checkpoint(path, seed: int = 0) -> OriginalRegressor:
    """A checkpoint as the original code saves it (``model_state_dict`` + its model_config)."""
    torch.manual_seed(seed)
    original = OriginalRegressor().eval()
    for m in original.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(
        {
            "epoch": 12,
            "model_state_dict": original.state_dict(),
            "model_config": {"num_landmarks": 15, "pretrained": True, "dropout_rate": 0.5},
            "optimizer_state_dict": {},
            "loss": 0.01,
        },
        path,
    )
    return original


@pytest.fixture(scope="session")
def write_original_checkpoint():
    """``write(path, seed=0) -> OriginalRegressor``: an original-code checkpoint at ``path``."""
    return _write_original_checkpoint


def _small_case(
    rng: np.random.Generator, category: str, size: int
) -> tuple[Image.Image, np.ndarray]:
    """A synthetic radiograph shrunk to ``size`` px and its landmarks (int pixels, inside)."""
    img, landmarks = render_case(rng, category)
    small = Image.fromarray(img, mode="L").resize((size, size), Image.BILINEAR)
    coords = np.clip(np.floor(landmarks * size / img.shape[1]), 0, size - 1).astype(int)
    return small, coords


@pytest.fixture(scope="session")
def tiny_radiographs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """18 images (6 per category, 64 x 64) in the original layout: the headerless
    ``coordenadas/coordenadas_maestro.csv`` and ``dataset/<category>/`` folders."""
    root = tmp_path_factory.mktemp("radiographs")
    rng = np.random.default_rng(0)
    lines = []
    for category in CATEGORIES:
        for i in range(6):
            img, coords = _small_case(rng, category, 64)
            name = f"{category}-{i + 1}"
            (root / "dataset" / category).mkdir(parents=True, exist_ok=True)
            img.save(root / "dataset" / category / f"{name}.png")
            lines.append(",".join(map(str, [len(lines), *coords.ravel().tolist(), name])))
    csv = root / "coordenadas" / "coordenadas_maestro.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
