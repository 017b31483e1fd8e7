"""NIfTI CT volumes (``.nii`` / ``.nii.gz``, written by nibabel, dcm2niix or the CT-RATE release)
read into the canonical :class:`~medcore.volumes.geometry.Volume` in HU (see
:mod:`medcore.volumes.reader` for the orientation and the rules both readers share)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medcore.errors import DataError
from medcore.volumes.geometry import (
    MAX_VOXELS,
    Volume,
    check_affine,
    first_line,
)

NIFTI_SUFFIXES = (".nii.gz", ".nii")


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
