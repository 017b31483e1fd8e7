"""Shared helpers: DICOM series written with pydicom, tiny label CSVs and HDF5 volume files."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest


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
    """Write ``hu [d, h, w]`` as a CT series: slice i at ``i * spacing`` along the orientation's normal.

    Files get shuffled names so that file order says nothing about slice order.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    iop = np.asarray(orientation, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    series = generate_uid()
    order = np.random.default_rng(seed).permutation(len(hu))
    stored = np.round((hu - intercept) / slope).astype(np.int16)
    paths = []
    for i, plane in enumerate(stored):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice_{order[i]:03d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality = series, generate_uid(), "CT"
        # Instance numbers deliberately run backwards: they must not win over the geometry.
        ds.InstanceNumber = len(hu) - i if geometry else i + 1
        if geometry:
            origin = np.array([-100.0, 50.0, 7.0])
            ds.ImagePositionPatient = [float(v) for v in origin + i * spacing * normal]
            ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = plane.tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


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
