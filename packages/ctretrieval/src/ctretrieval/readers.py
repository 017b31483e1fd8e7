"""Raw CT studies: a DICOM series (one folder per study) or a NIfTI file, in HU.

Reading is medcore's (:mod:`medcore.volumes.reader`): volumes come back as float32 ``[d, h, w]`` in
Hounsfield units in one canonical orientation for both sources (slices inferior -> superior,
rows anterior -> posterior, columns patient right -> left), with their voxel spacing. Every
reason a study cannot be read is a DataError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medcore.errors import DataError
from medcore.volumes.dicom import read_dicom_series
from medcore.volumes.geometry import Volume
from medcore.volumes.nifti import NIFTI_SUFFIXES, read_nifti


@dataclass(frozen=True)
class Study:
    """One raw study: its id and where it lives (a DICOM folder or a NIfTI file)."""

    id: str
    path: Path
    kind: str  # "dicom" | "nifti"


def _nifti_id(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_studies(root: str | Path) -> list[Study]:
    """Studies under ``root``: every sub-folder is a DICOM study, every ``*.nii[.gz]`` a NIfTI one."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "input directory not found")
    studies = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            studies.append(Study(entry.name, entry, "dicom"))
        elif entry.name.endswith(NIFTI_SUFFIXES):
            studies.append(Study(_nifti_id(entry), entry, "nifti"))
    ids = [s.id for s in studies]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DataError(
            root, f"study id(s) found twice (folder and NIfTI file?): {', '.join(dupes[:5])}"
        )
    return studies


def study_at(path: str | Path) -> Study:
    """The study of one path, with the id ``find_studies`` gives it: a DICOM folder or a NIfTI
    file; anything else is a DataError."""
    path = Path(path)
    if path.is_dir():
        return Study(path.name, path, "dicom")
    if path.name.endswith(NIFTI_SUFFIXES):
        if not path.is_file():
            raise DataError(path, "NIfTI file not found")
        return Study(_nifti_id(path), path, "nifti")
    why = "not found" if not path.exists() else "neither a DICOM folder nor a NIfTI file"
    raise DataError(path, f"{why} (expected a DICOM folder or a .nii / .nii.gz file)")


def read_study(study: Study, min_slices: int = 1) -> Volume:
    """The study as a canonical medcore Volume; a DataError if it has fewer than ``min_slices``."""
    volume = read_dicom_series(study.path) if study.kind == "dicom" else read_nifti(study.path)
    return check_volume(volume, study.id, min_slices)


def check_volume(volume: Volume, study_id: str, min_slices: int = 1) -> Volume:
    """``volume`` when it has at least ``min_slices`` slices and only finite voxels (what every
    study, read from a file or handed over as an array, must have); else a DataError."""
    if volume.shape[0] < min_slices:
        raise DataError(study_id, f"too few slices ({volume.shape[0]} < {min_slices})")
    if not np.isfinite(volume.voxels).all():
        raise DataError(study_id, "NaN or infinite voxel(s) in the volume")
    return volume
