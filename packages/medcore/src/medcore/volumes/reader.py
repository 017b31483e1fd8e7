"""CT volumes from a DICOM series or a NIfTI file, in one canonical orientation and in HU.

Canonical orientation (both sources, every patient position):

- array axes ``[z, y, x]`` = ``[slices, rows, columns]``;
- slices run inferior -> superior, rows anterior -> posterior, columns patient right -> left:
  each slice looks like an axial image on a radiology workstation (viewed from the feet, the
  patient's right on the viewer's left, anterior at the top);
- in nibabel's axis codes (RAS+ world) the array axes are ``("S", "P", "L")``.

Supine, prone, head-first and feet-first acquisitions of the same anatomy therefore give the same
array, and a DICOM series and the NIfTI file of the same geometry give identical arrays. The
reorientation is nibabel's (``io_orientation`` / ``ornt_transform`` / ``apply_orientation``):
each array axis goes to the world axis it is closest to; an oblique acquisition is not
resampled. DICOM patient coordinates are LPS, NIfTI world coordinates RAS; DICOM geometry is
turned into a RAS affine first, then both take the same path.

``Volume.affine`` maps a canonical index ``(z, y, x, 1)`` to RAS+ millimetres; ``spacing`` is the
voxel size along ``(z, y, x)`` in mm. Voxels are float32 Hounsfield units (rescale applied).

DICOM: files are grouped by ``SeriesInstanceUID``; headers are read without pixel data first,
and a series is used only if it is CT (``Modality``), an image (not a ``LOCALIZER``, not a dose
report), of one orientation, axial, and uniformly spaced along its normal (no gap, no duplicate
position). Slices are ordered by ``ImagePositionPatient`` projected on the normal, never by
``InstanceNumber``. Enhanced (multi-frame) CT is read from its per-frame functional groups.
Compressed transfer syntaxes (JPEG Lossless, JPEG-LS, JPEG 2000, RLE, deflate) are decoded by
pydicom through the pylibjpeg plugins.

Every reason a volume cannot be read is a one-line :class:`~medcore.errors.DataError` naming
the file or folder, so batch jobs can skip it and count it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medcore.errors import DataError
from medcore.volumes.dicom import read_dicom_series
from medcore.volumes.geometry import (
    Volume,
)
from medcore.volumes.nifti import NIFTI_SUFFIXES, read_nifti

# Where a body CT in Hounsfield units has most of its voxels: air and aerated lung, and water,
# soft tissue and blood. A reading off by a CT rescale (raw stored values read as HU, or HU
# rescaled a second time) moves both by about 1000 HU, out of these windows.
HU_AIR = (-1100.0, -900.0)


HU_SOFT_TISSUE = (-150.0, 150.0)


@dataclass(frozen=True)
class HUEvidence:
    """Fractions of a volume's voxels near air and near soft tissue under one reading."""

    air: float
    soft_tissue: float

    @property
    def score(self) -> float:
        """How well the reading looks like HU: a body CT has plenty of both, a reading off by a
        rescale has at most one of them in place."""
        return min(self.air, self.soft_tissue)

    def __str__(self) -> str:
        return f"{self.air:.1%} near air, {self.soft_tissue:.1%} near soft tissue"


def evidence_sample(values: np.ndarray) -> np.ndarray:
    """The voxels :func:`hu_evidence` counts (a view): all of them, or every second voxel along
    each axis of a volume of more than 2**23 voxels."""
    stride = 2 if values.size > 2**23 else 1
    return values[tuple(slice(None, None, stride) for _ in range(values.ndim))]


def hu_evidence(
    values: np.ndarray, slope: float = 1.0, intercept: float = 0.0, sampled: bool = False
) -> HUEvidence:
    """How ``values * slope + intercept`` reads as Hounsfield units (see :class:`HUEvidence`).

    The windows are mapped back through the rescale, so no rescaled copy is made. ``values`` is
    a whole volume, counted on its :func:`evidence_sample`, or (``sampled``) that sample already.
    """
    if slope == 0 or not np.isfinite([slope, intercept]).all():
        raise ValueError(f"not a usable rescale: slope {slope}, intercept {intercept}")
    sample = values if sampled else evidence_sample(values)

    def fraction(window: tuple[float, float]) -> float:
        lo, hi = sorted(((window[0] - intercept) / slope, (window[1] - intercept) / slope))
        return float(np.count_nonzero((sample >= lo) & (sample <= hi))) / max(sample.size, 1)

    return HUEvidence(fraction(HU_AIR), fraction(HU_SOFT_TISSUE))


def read_volume(path: str | Path, rescale: tuple[float, float] | None = None) -> Volume:
    """A DICOM folder or a NIfTI file (by what ``path`` is) as a canonical :class:`Volume`."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if path.name.endswith(NIFTI_SUFFIXES):
        return read_nifti(path, rescale)
    raise DataError(path, "neither a DICOM folder nor a NIfTI file (.nii, .nii.gz)")
