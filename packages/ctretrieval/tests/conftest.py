"""Shared helpers: DICOM series written with pydicom, tiny label CSVs and HDF5 volume files."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from ctretrieval.synthetic import write_dicom_series


def write_series(
    folder: Path,
    hu: np.ndarray,
    *,
    slope: float = 1.0,
    intercept: float = -1024.0,
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    spacing: float = 2.0,
    geometry: bool = True,
    seed: int = 0,
) -> list[Path]:
    """Write ``hu [d, h, w]`` as a signed CT series with the demo's writer (pydicom).

    Files get shuffled names, so that file order says nothing about slice order, and instance
    numbers run backwards, so that they must not win over the geometry.
    """
    return write_dicom_series(
        folder,
        hu,
        np.random.default_rng(seed),
        slope=slope,
        intercept=intercept,
        spacing=(spacing, 1.0, 1.0),
        orientation=orientation,
        geometry=geometry,
        signed=True,
        reverse_instance_numbers=geometry,
    )


def ramp_volume(d: int = 6, h: int = 8, w: int = 8) -> np.ndarray:
    """HU volume whose slice i is constant ``-1000 + 100 i`` plus a small in-plane gradient."""
    base = -1000.0 + 100.0 * np.arange(d)[:, None, None]
    return (base + np.arange(w)[None, None, :] * 2.0 + np.zeros((d, h, w))).astype(np.float32)


def write_volumes(path: Path, volumes: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "w") as f:
        group = f.create_group("volumes")
        for key, vol in volumes.items():
            group.create_dataset(key, data=vol.astype(np.uint8))
    return path


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests run on one torch thread: tiny tensors gain nothing from more, and on a shared
    machine two spinning threads per test are many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    """A data dir with volumes.h5 (30 studies, 6 x 32 x 32) and labels.csv (findings in the pixels)."""
    rng = np.random.default_rng(0)
    vols, rows = {}, []
    for i in range(30):
        f = [int(v) for v in rng.integers(0, 2, 3)]
        vol = rng.integers(0, 40, (6, 32, 32)).astype(np.uint8)
        for j, on in enumerate(f):
            if on:
                vol[:, 4 + 9 * j : 10 + 9 * j, 4:12] = 220
        vols[f"s{i:02d}"] = vol
        rows.append(
            {"CT": f"s{i:02d}.nii.gz", "condensacion": f[0], "nodulos": f[1], "quistes": f[2]}
        )
    write_volumes(tmp_path / "volumes.h5", vols)
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path


@pytest.fixture
def helpers() -> SimpleNamespace:
    """The writers above, for tests (conftest is not importable under --import-mode=importlib)."""
    return SimpleNamespace(
        write_series=write_series, ramp_volume=ramp_volume, write_volumes=write_volumes
    )


FINDINGS = ["condensacion", "nodulos", "quistes"]


@pytest.fixture(scope="session")
def tiny_volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir of 16 studies: volumes.h5 (6 x 16 x 16 uint8, findings drawn in) and
    labels.csv."""
    root = tmp_path_factory.mktemp("volumes")
    rng = np.random.default_rng(0)
    rows = []
    with h5py.File(root / "volumes.h5", "w") as f:
        group = f.create_group("volumes")
        for i in range(16):
            found = [int(v) for v in rng.integers(0, 2, 3)]
            vol = rng.integers(0, 40, (6, 16, 16)).astype(np.uint8)
            for j, on in enumerate(found):
                if on:
                    vol[:, 2 + 4 * j : 5 + 4 * j, 3:8] = 220
            group.create_dataset(f"s{i:02d}", data=vol)
            rows.append({"CT": f"s{i:02d}", **dict(zip(FINDINGS, found, strict=True))})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root
