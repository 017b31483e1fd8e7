"""Reading raw CT studies: a DICOM series (one folder per study) or a NIfTI file, in HU.

Volumes come back as float32 ``[d, h, w]`` (``d`` slices) in Hounsfield units. DICOM slices
are ordered by their position along the slice normal (``ImagePositionPatient`` projected on
the cross product of the ``ImageOrientationPatient`` row and column directions), falling back
to ``InstanceNumber`` when a slice lacks the geometry; ``RescaleSlope``/``RescaleIntercept``
are applied per slice. Every reason a study cannot be read is a DataError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medcore.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Far beyond any real CT (a 512 x 512 x 4000 series is ~1e9 voxels): a header claiming more is
# refused before anything is decoded (decompression-bomb protection).
MAX_VOXELS = 2**31
MAX_SLICE_PIXELS = 8192 * 8192
# Files that sit in study folders but are never slices.
_NOT_DICOM = {".txt", ".json", ".csv", ".xml", ".md", ".jpg", ".png", ".log"}


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


def read_study(study: Study, min_slices: int = 1) -> np.ndarray:
    volume = read_dicom_series(study.path) if study.kind == "dicom" else read_nifti(study.path)
    if volume.shape[0] < min_slices:
        raise DataError(study.id, f"too few slices ({volume.shape[0]} < {min_slices})")
    finite = np.isfinite(volume)
    if not finite.all():
        n_nan = int(np.isnan(volume).sum())
        raise DataError(
            study.id, f"{n_nan} NaN and {int((~finite).sum()) - n_nan} inf voxel(s) in the volume"
        )
    return volume


def _slice_files(folder: Path) -> list[Path]:
    files = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and not p.name.startswith(".")
        and p.name.upper() != "DICOMDIR"
        and p.suffix.lower() not in _NOT_DICOM
    ]
    if not files:
        raise DataError(folder, "no DICOM files in the study folder")
    return files


def _position(ds) -> float | None:
    """Slice position along the normal of its plane, or None without the geometry tags."""
    ipp = getattr(ds, "ImagePositionPatient", None)
    iop = getattr(ds, "ImageOrientationPatient", None)
    if ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
        return None
    iop = np.asarray(iop, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    return float(np.dot(normal, np.asarray(ipp, dtype=np.float64)))


def _sop_class_name(ds) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = ds.get("SOPClassUID") or getattr(meta, "MediaStorageSOPClassUID", None)
    return str(getattr(uid, "name", "") or "")


def read_dicom_series(folder: str | Path) -> np.ndarray:
    """The series in ``folder`` as HU ``[d, h, w]`` float32, slices ordered by position.

    A folder holding several series (different ``SeriesInstanceUID``) keeps the largest one.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    headers = []
    for path in _slice_files(folder):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError) as exc:
            raise DataError(
                path,
                f"corrupt or not a DICOM file ({str(exc).splitlines()[0][:100] or type(exc).__name__})",
            ) from None
        if "PixelData" not in ds:
            if len(ds) == 0 or "Image Storage" in _sop_class_name(ds):
                # An image file cut short (or empty) would otherwise vanish from the series.
                raise DataError(path, "image file without pixel data (truncated?)")
            continue  # a structured report or presentation state, not an image slice
        headers.append((path, ds))
    if not headers:
        raise DataError(folder, "no DICOM image slices (no PixelData)")

    series: dict[str, list] = {}
    for item in headers:
        series.setdefault(str(getattr(item[1], "SeriesInstanceUID", "")), []).append(item)
    slices = max(series.values(), key=len)

    positions = [_position(ds) for _, ds in slices]
    if all(p is not None for p in positions):
        keys = positions
    else:
        numbers = [getattr(ds, "InstanceNumber", None) for _, ds in slices]
        if any(n is None for n in numbers):
            raise DataError(
                folder,
                "slices carry neither ImagePositionPatient/ImageOrientationPatient nor InstanceNumber",
            )
        keys = [float(n) for n in numbers]
    order = np.argsort(np.asarray(keys, dtype=np.float64), kind="stable")

    try:
        shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in slices}
    except AttributeError:
        raise DataError(folder, "a slice lacks Rows/Columns") from None
    if len(shapes) > 1:
        raise DataError(folder, f"mixed slice sizes {sorted(shapes)}")
    rows, cols = shapes.pop()
    if rows * cols > MAX_SLICE_PIXELS or rows * cols * len(slices) > MAX_VOXELS:
        raise DataError(
            folder,
            f"header claims {len(slices)} slices of {rows} x {cols} pixels; refusing to decode",
        )

    out = None
    for i, j in enumerate(order):
        path, ds = slices[j]
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:  # pydicom raises many types for undecodable pixel data
            raise DataError(
                path, f"cannot decode pixel data ({str(exc).splitlines()[0][:120]})"
            ) from None
        if pixels.ndim != 2:
            raise DataError(
                path, f"expected a single 2-D slice, got pixel data of shape {pixels.shape}"
            )
        if out is None:
            out = np.empty((len(order), *pixels.shape), dtype=np.float32)
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        out[i] = pixels * slope + intercept
    return out


def read_nifti(path: str | Path) -> np.ndarray:
    """A NIfTI volume as HU ``[d, h, w]`` float32 (reoriented to the closest canonical RAS)."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        shape = tuple(int(v) for v in img.header.get_data_shape())
        if int(np.prod(shape, dtype=np.float64)) > MAX_VOXELS:
            raise DataError(path, f"header claims a volume of shape {shape}; refusing to decode")
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except DataError:
        raise
    except Exception as exc:  # nibabel raises many types for broken files
        raise DataError(
            path,
            f"cannot read NIfTI ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})",
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(path, f"expected a 3-D volume, got shape {data.shape}")
    # RAS (x, y, z) -> (z, y, x): slices first, as the DICOM reader returns them.
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
