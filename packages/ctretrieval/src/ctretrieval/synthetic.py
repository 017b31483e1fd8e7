"""The built-in demo: synthetic chest CT studies as real DICOM series plus a labels CSV.

Each study is a small thorax phantom in HU (air, an elliptic body, two lungs, a spine) with
any combination of three findings inside the lungs: consolidation (dense patches), nodules
(small bright spheres) and cysts (dark round spaces with a thin wall). Slices are written in
shuffled file order with CT geometry tags, a rescale intercept and a per-study slice count, so
the demo exercises the same reading path as real data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medcore.io import atomic_write_csv

FINDINGS = ("condensacion", "nodulos", "quistes")
# (consolidation, nodules, cysts) patterns and their weights: a quarter of the studies normal.
_PATTERNS = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
_WEIGHTS = [0.25, 0.15, 0.15, 0.15, 0.08, 0.08, 0.08, 0.06]


def phantom(
    findings: tuple[int, int, int], n_slices: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """A HU volume ``[n_slices, size, size]`` with the given (consolidation, nodules, cysts)."""
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, n_slices),
        np.linspace(-1, 1, size),
        np.linspace(-1, 1, size),
        indexing="ij",
    )
    vol = np.full((n_slices, size, size), -1000.0, dtype=np.float32)
    bx, by = rng.uniform(0.78, 0.9), rng.uniform(0.6, 0.7)
    body = (x / bx) ** 2 + (y / by) ** 2 <= 1
    vol[body] = 40.0
    lungs = np.zeros_like(body)
    centres = []
    for side in (-1, 1):
        cx, cy = side * rng.uniform(0.36, 0.42), rng.uniform(-0.08, 0.02)
        ax, ay = rng.uniform(0.24, 0.3), rng.uniform(0.4, 0.48)
        taper = 1 - 0.25 * np.clip(z, 0, None)  # narrower towards the apex
        lungs |= ((x - cx) / (ax * taper)) ** 2 + ((y - cy) / ay) ** 2 <= 1
        centres.append((cx, cy, ax, ay))
    vol[lungs] = -850.0
    vol[(x**2 + (y - 0.45) ** 2) <= 0.1**2] = 400.0  # spine

    def spot() -> tuple[float, float, float]:
        cx, cy, ax, ay = centres[rng.integers(2)]
        return (
            rng.uniform(-0.6, 0.6),
            cy + rng.uniform(-0.5, 0.5) * ay,
            cx + rng.uniform(-0.45, 0.45) * ax,
        )

    def ellipsoid(c: tuple[float, float, float], r: tuple[float, float, float]) -> np.ndarray:
        return ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1

    consolidation, nodules, cysts = findings
    if consolidation:
        for _ in range(rng.integers(1, 3)):
            patch = ellipsoid(
                spot(), (rng.uniform(0.3, 0.5), rng.uniform(0.15, 0.25), rng.uniform(0.12, 0.18))
            )
            vol[patch & lungs] = rng.uniform(0.0, 40.0)
    if nodules:
        for _ in range(rng.integers(4, 8)):
            r = rng.uniform(0.07, 0.1)
            vol[ellipsoid(spot(), (3.0 * r, r, r)) & lungs] = rng.uniform(80.0, 160.0)
    if cysts:
        for _ in range(rng.integers(2, 5)):
            centre, r = spot(), rng.uniform(0.12, 0.17)
            outer = ellipsoid(centre, (3.0 * r, r, r))
            inner = ellipsoid(centre, (3.0 * (r - 0.04), r - 0.04, r - 0.04))
            vol[outer & lungs] = -300.0  # the wall
            vol[inner & lungs] = -1000.0
    vol += rng.normal(0.0, 15.0, vol.shape).astype(np.float32)
    return vol


def write_dicom_series(
    folder: str | Path,
    hu: np.ndarray,
    rng: np.random.Generator,
    slope: float = 1.0,
    intercept: float = -1024.0,
    spacing: tuple[float, float, float] = (2.5, 5.0, 5.0),
    patient_id: str = "DEMO",
    *,
    orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    geometry: bool = True,
    signed: bool = False,
    reverse_instance_numbers: bool = False,
) -> list[Path]:
    """Write ``hu [d, h, w]`` as a CT DICOM series, one file per slice in shuffled file order.

    Stored values are ``(hu - intercept) / slope``, as uint16 (int16 with ``signed``). Slice
    ``i`` sits at ``i * spacing[0]`` along the normal of ``orientation`` (axial by default).
    Without ``geometry`` the files carry no position or orientation, only instance numbers;
    ``reverse_instance_numbers`` numbers the slices backwards, so that a reader can be checked
    to order by geometry, not by instance number.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    dtype, low, high = (np.int16, -32768, 32767) if signed else (np.uint16, 0, 65535)
    stored = np.clip(np.round((hu - intercept) / slope), low, high).astype(dtype)
    iop = np.asarray(orientation, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    names = rng.permutation(len(hu))
    paths = []
    for i, plane in enumerate(stored):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{names[i]:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality, ds.PatientID = "CT", patient_id
        ds.InstanceNumber = len(hu) - i if reverse_instance_numbers else i + 1
        if geometry:
            ds.ImagePositionPatient = [float(v) for v in i * spacing[0] * normal]
            ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.SliceThickness = spacing[0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = int(signed)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = plane.tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def generate_demo(
    root: str | Path,
    n_studies: int = 80,
    slices: tuple[int, int] = (24, 36),
    size: int = 64,
    seed: int = 0,
) -> None:
    """Write ``root/dicom/<id>/*.dcm`` and ``root/labels.csv`` (columns CT + the findings)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_studies):
        findings = _PATTERNS[rng.choice(len(_PATTERNS), p=_WEIGHTS)]
        study_id = f"demo_{i:03d}"
        hu = phantom(findings, int(rng.integers(slices[0], slices[1] + 1)), size, rng)
        write_dicom_series(root / "dicom" / study_id, hu, rng, patient_id=study_id)
        rows.append({"CT": study_id, **dict(zip(FINDINGS, findings, strict=True))})
    atomic_write_csv(root / "labels.csv", pd.DataFrame(rows))
