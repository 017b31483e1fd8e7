from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
