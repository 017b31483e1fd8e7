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

from medcore.dicom import choose_series, read_dicom_series
from medcore.errors import DataError
from medcore.volume_geometry import (
    CANONICAL_AXCODES,
    MAX_VOXELS,
    Volume,
    check_affine,
    first_line,
    to_canonical,
)

__all__ = [
    "CANONICAL_AXCODES",
    "HU_AIR",
    "HU_SOFT_TISSUE",
    "MAX_VOXELS",
    "NIFTI_SUFFIXES",
    "HUEvidence",
    "Volume",
    "center_in_box",
    "check_affine",
    "choose_series",
    "hu_evidence",
    "read_dicom_series",
    "read_nifti",
    "read_volume",
    "to_canonical",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
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


def hu_evidence(values: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> HUEvidence:
    """How ``values * slope + intercept`` reads as Hounsfield units (see :class:`HUEvidence`).

    The windows are mapped back through the rescale, so no rescaled copy is made; a volume of
    more than 2**23 voxels is counted on every second voxel along each axis.
    """
    if slope == 0 or not np.isfinite([slope, intercept]).all():
        raise ValueError(f"not a usable rescale: slope {slope}, intercept {intercept}")
    stride = 2 if values.size > 2**23 else 1
    sample = values[tuple(slice(None, None, stride) for _ in range(values.ndim))]

    def fraction(window: tuple[float, float]) -> float:
        lo, hi = sorted(((window[0] - intercept) / slope, (window[1] - intercept) / slope))
        return float(np.count_nonzero((sample >= lo) & (sample <= hi))) / max(sample.size, 1)

    return HUEvidence(fraction(HU_AIR), fraction(HU_SOFT_TISSUE))


def center_in_box(
    vol: np.ndarray, target: tuple[int, int, int], fill: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``vol`` centred in an array of shape ``target``: (array, pad, crop).

    ``pad`` and ``crop`` are ``[3, 2]`` int64 voxel counts added / removed before and after
    along each axis; an axis is cropped (symmetrically) only where ``vol`` is larger.
    """
    out = np.full(target, fill, dtype=vol.dtype)
    pad = np.zeros((3, 2), dtype=np.int64)
    crop = np.zeros((3, 2), dtype=np.int64)
    src, dst = [], []
    for axis, (n, t) in enumerate(zip(vol.shape, target, strict=True)):
        if n >= t:
            start = (n - t) // 2
            crop[axis] = (start, n - t - start)
            src.append(slice(start, start + t))
            dst.append(slice(0, t))
        else:
            start = (t - n) // 2
            pad[axis] = (start, t - n - start)
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[tuple(dst)] = vol[tuple(src)]
    return out, pad, crop


# -- NIfTI --------------------------------------------------------------------------------------


def read_nifti(path: str | Path, rescale: tuple[float, float] | None = None) -> Volume:
    """A 3-D NIfTI-1/NIfTI-2 file as a canonical :class:`Volume` in HU.

    The header's ``scl_slope``/``scl_inter`` are applied by nibabel; when the header does not
    scale, ``rescale`` (slope, intercept), e.g. from a metadata table, is applied instead. A 4-D
    file with one volume is taken as 3-D; a real 4-D file is refused.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes)")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for a corrupt header
        raise DataError(
            path, f"not a readable NIfTI file (truncated or corrupt: {first_line(exc)})"
        ) from None
    shape = tuple(int(v) for v in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(path, f"expected a 3D volume, found shape {shape} (one volume per file)")
    if int(np.prod(shape, dtype=np.float64)) > MAX_VOXELS:
        raise DataError(path, "header claims {}x{}x{} voxels; refusing to decode".format(*shape))
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(path, affine)
    proxy = img.dataobj
    header_slope = float(getattr(proxy, "slope", 1.0))
    header_inter = float(getattr(proxy, "inter", 0.0))
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))  # applies the header's scaling
    except Exception as exc:  # EOFError, zlib.error, OSError, ValueError ... for a cut file
        raise DataError(
            path, f"cannot read the voxels (truncated or corrupt: {first_line(exc)})"
        ) from None
    data = data.reshape(shape, order="A")
    if (header_slope, header_inter) != (1.0, 0.0):
        applied, source = (header_slope, header_inter), "nifti header"
    elif rescale is not None:
        applied, source = (float(rescale[0]), float(rescale[1])), "given"
        data *= applied[0]  # in place: a CT volume is ~200 MB of float32
        data += applied[1]
    else:
        applied, source = (1.0, 0.0), "none"
    # Integer voxels with finite scaling cannot be NaN/inf: only float data needs the scan.
    if (img.get_data_dtype().kind == "f" or not np.isfinite(applied).all()) and not np.isfinite(
        data
    ).all():
        raise DataError(path, "contains NaN or infinite values")
    # nibabel's array is in the file's (Fortran) order; the one contiguous copy is made here.
    return Volume.canonical(
        data,
        affine,
        {
            "source": "nifti",
            "path": str(path),
            "rescale": applied,
            "rescale_source": source,
            "source_shape": shape,
        },
    )


def read_volume(path: str | Path, rescale: tuple[float, float] | None = None) -> Volume:
    """A DICOM folder or a NIfTI file (by what ``path`` is) as a canonical :class:`Volume`."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if path.name.endswith(NIFTI_SUFFIXES):
        return read_nifti(path, rescale)
    raise DataError(path, "neither a DICOM folder nor a NIfTI file (.nii, .nii.gz)")
