"""DICOM CT series: header-first reading, series choice and checks, decoding, into a canonical
:class:`~medcore.volumes.geometry.Volume` (see :mod:`medcore.volumes.reader` for the orientation, the
rules a series must meet and the errors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medcore.errors import DataError
from medcore.volumes.geometry import (
    MAX_VOXELS,
    StoredVolume,
    Volume,
    check_affine,
    first_line,
    to_float32_hu,
)

MAX_SLICE_PIXELS = 8192 * 8192
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
# Tolerances of the series checks: direction cosines, and slice steps (relative + absolute mm).
ORIENTATION_TOL = 1e-3
SPACING_REL_TOL = 0.01
SPACING_ABS_TOL = 0.01
DUPLICATE_TOL = 1e-3  # mm: two slices this close are the same position
# Files that sit in study folders but are never slices.
_NOT_DICOM = {".txt", ".json", ".csv", ".xml", ".md", ".jpg", ".png", ".log", ".nii", ".gz"}


@dataclass
class _Slice:
    path: Path
    frame: int | None  # frame of a multi-frame file, None for a single-frame file
    position: np.ndarray | None  # ImagePositionPatient (LPS mm)
    orientation: np.ndarray | None  # ImageOrientationPatient (row, column direction cosines)
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) mm
    slope: float
    intercept: float
    rows: int
    cols: int


@dataclass
class _Series:
    uid: str
    modality: str
    image_type: tuple[str, ...]
    sop_class: str
    slices: list[_Slice]
    header: Any  # the first file's dataset (without pixel data)
    thickness: float | None


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


def _floats(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.isfinite(arr).all() else None


def _rescale(item: Any) -> tuple[float, float]:
    slope = item.get("RescaleSlope", None)
    inter = item.get("RescaleIntercept", None)
    return (1.0 if slope in (None, "") else float(slope)), (
        0.0 if inter in (None, "") else float(inter)
    )


def _group(item: Any, shared: Any, keyword: str) -> Any:
    """The first item of functional group ``keyword`` (per frame, else shared) or None."""
    for source in (item, shared):
        if source is not None and keyword in source and len(source[keyword].value):
            return source[keyword].value[0]
    return None


def _frames(path: Path, ds: Any) -> list[_Slice]:
    """The slices of one file: one for a classic image, one per frame for enhanced CT."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        if n_frames != 1:
            raise DataError(path, f"{n_frames} frames without per-frame functional groups")
        spacing = _floats(ds.get("PixelSpacing"), 2)
        return [
            _Slice(
                path,
                None,
                _floats(ds.get("ImagePositionPatient"), 3),
                _floats(ds.get("ImageOrientationPatient"), 6),
                None if spacing is None else (float(spacing[0]), float(spacing[1])),
                *_rescale(ds),
                rows,
                cols,
            )
        ]
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    if len(per_frame) != n_frames:
        raise DataError(path, f"{len(per_frame)} per-frame groups for {n_frames} frames")
    out = []
    for k, item in enumerate(per_frame):
        pos = _group(item, shared, "PlanePositionSequence")
        ori = _group(item, shared, "PlaneOrientationSequence")
        measures = _group(item, shared, "PixelMeasuresSequence")
        transform = _group(item, shared, "PixelValueTransformationSequence")
        spacing = None if measures is None else _floats(measures.get("PixelSpacing"), 2)
        out.append(
            _Slice(
                path,
                k,
                None if pos is None else _floats(pos.get("ImagePositionPatient"), 3),
                None if ori is None else _floats(ori.get("ImageOrientationPatient"), 6),
                None if spacing is None else (float(spacing[0]), float(spacing[1])),
                *(_rescale(transform) if transform is not None else _rescale(ds)),
                rows,
                cols,
            )
        )
    return out


def _sop_name(ds: Any) -> str:
    uid = ds.get("SOPClassUID") or getattr(ds.file_meta, "MediaStorageSOPClassUID", None)
    return str(getattr(uid, "name", "") or "")


def _read_headers(folder: Path) -> dict[str, _Series]:
    """Series of ``folder`` by SeriesInstanceUID, from headers only (no pixel data read)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, _Series] = {}
    images = 0
    for path in _slice_files(folder):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError) as exc:
            raise DataError(path, f"corrupt or not a DICOM file ({first_line(exc, 100)})") from None
        if len(ds) == 0:
            raise DataError(path, "empty DICOM data set (truncated?)")
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        modality = str(ds.get("Modality", "") or "")
        sop = str(ds.get("SOPClassUID", "") or getattr(ds.file_meta, "MediaStorageSOPClassUID", ""))
        image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or ()))
        if "Rows" not in ds:
            if "Image Storage" in _sop_name(ds):
                # An image cut short (or empty) would otherwise vanish from its series.
                raise DataError(path, "image file without pixel data (truncated?)")
            # A structured report, dose report or presentation state: no image, its own series.
            series.setdefault(uid, _Series(uid, modality, image_type, sop, [], ds, None))
            continue
        images += 1
        entry = series.setdefault(
            uid,
            _Series(
                uid,
                modality,
                image_type,
                sop,
                [],
                ds,
                None if ds.get("SliceThickness") in (None, "") else float(ds.SliceThickness),
            ),
        )
        entry.slices.extend(_frames(path, ds))
    if not images:
        raise DataError(folder, "no DICOM image slices")
    return series


def _normal(iop: np.ndarray) -> np.ndarray:
    return np.cross(iop[:3], iop[3:])


def _check_series(s: _Series) -> str | None:
    """Why ``s`` is not a usable axial CT image series, or None."""
    if not s.slices:
        return f"not an image (no pixel rows; SOP class {s.sop_class or '?'})"
    if s.modality != "CT":
        return f"modality {s.modality or 'missing'}, not CT"
    if "LOCALIZER" in s.image_type:
        return "a localizer (ImageType LOCALIZER)"
    if any(sl.position is None or sl.orientation is None for sl in s.slices):
        return "slices without ImagePositionPatient/ImageOrientationPatient (geometry unknown)"
    if any(sl.pixel_spacing is None for sl in s.slices):
        return "slices without PixelSpacing"
    iops = np.stack([sl.orientation for sl in s.slices])
    if np.abs(iops - iops[0]).max() > ORIENTATION_TOL:
        return f"mixed orientations ({len(np.unique(iops.round(3), axis=0))} image planes)"
    normal = _normal(iops[0])
    if np.argmax(np.abs(normal)) != 2:
        plane = "sagittal" if np.argmax(np.abs(normal)) == 0 else "coronal"
        return f"{plane}, not axial (slice normal {np.round(normal, 3).tolist()})"
    shapes = {(sl.rows, sl.cols) for sl in s.slices}
    if len(shapes) > 1:
        return f"mixed slice sizes {sorted(shapes)}"
    spacings = np.asarray([sl.pixel_spacing for sl in s.slices])
    if np.abs(spacings - spacings[0]).max() > SPACING_ABS_TOL:
        return "mixed pixel spacings"
    along = np.sort([float(np.dot(normal, sl.position)) for sl in s.slices])
    steps = np.diff(along)
    if len(steps) and steps.min() < DUPLICATE_TOL:
        k = int(np.argmin(steps))
        return f"duplicate slice position {along[k]:.2f} mm ({int((steps < DUPLICATE_TOL).sum())} duplicate(s))"
    if len(steps) > 1:
        step = float(np.median(steps))
        off = np.abs(steps - step)
        if off.max() > SPACING_REL_TOL * step + SPACING_ABS_TOL:
            k = int(np.argmax(off))
            kind = "gap" if steps[k] > step else "uneven spacing"
            return (
                f"{kind} of {steps[k]:.2f} mm between slices at {along[k]:.2f} and "
                f"{along[k + 1]:.2f} mm (spacing {step:.2f} mm)"
            )
    return None


def _describe(s: _Series) -> str:
    desc = str(s.header.get("SeriesDescription", "") or "").strip()
    return f"series {s.uid or '?'}" + (f" ({desc})" if desc else "")


def choose_series(folder: str | Path) -> tuple[_Series, dict[str, str]]:
    """The axial CT image series of ``folder`` and the reason each other series was rejected.

    Several usable series (e.g. two reconstructions): the one with the most slices is taken and
    the others are reported as rejected with that reason.
    """
    folder = Path(folder)
    series = _read_headers(folder)
    rejected: dict[str, str] = {}
    usable = []
    for s in series.values():
        reason = _check_series(s)
        if reason is None:
            usable.append(s)
        else:
            rejected[_describe(s)] = reason
    if not usable:
        why = "; ".join(f"{k}: {v}" for k, v in rejected.items())
        raise DataError(folder, f"no axial CT image series ({why})")
    usable.sort(key=lambda s: (-len(s.slices), s.uid))
    for other in usable[1:]:
        rejected[_describe(other)] = (
            f"another axial CT series with more slices was used ({len(other.slices)} < "
            f"{len(usable[0].slices)})"
        )
    return usable[0], rejected


def _decode(path: Path) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            raise DataError(path, "image file without pixel data (truncated?)")
        return ds.pixel_array
    except DataError:
        raise
    except Exception as exc:  # pydicom and its plugins raise many types for undecodable data
        raise DataError(path, f"cannot decode pixel data ({first_line(exc)})") from None


def _decode_slices(slices: list[_Slice], rows: int, cols: int) -> tuple[np.ndarray, float, float]:
    """The slices' pixel data, each file decoded once, in one array: the stored values with
    the series' one rescale, or float32 HU when the rescale changes from slice to slice:
    (array, slope, intercept)."""
    rescales = {(sl.slope, sl.intercept) for sl in slices}
    uniform = len(rescales) == 1
    out: np.ndarray | None = None
    decoded: dict[Path, np.ndarray] = {}
    for i, sl in enumerate(slices):
        if sl.frame is None:
            pixels = _decode(sl.path)
        else:  # enhanced CT: decode the file once, take its frames
            if sl.path not in decoded:
                decoded[sl.path] = _decode(sl.path)
            pixels = decoded[sl.path]
            pixels = pixels[sl.frame] if pixels.ndim == 3 else pixels
        if pixels.shape != (rows, cols):
            raise DataError(
                sl.path, f"pixel data of shape {pixels.shape}, header says {rows} x {cols}"
            )
        if out is None:
            dtype = pixels.dtype if uniform else np.float32
            out = np.empty((len(slices), rows, cols), dtype=dtype)
        elif uniform and not np.can_cast(pixels.dtype, out.dtype, "safe"):
            out = out.astype(np.result_type(out.dtype, pixels.dtype))  # e.g. int16 and uint16
        if uniform:
            out[i] = pixels
        else:
            to_float32_hu(pixels, sl.slope, sl.intercept, out[i])
    slope, inter = rescales.pop() if uniform else (1.0, 0.0)
    return out, float(slope), float(inter)


def read_dicom_stored(folder: str | Path) -> StoredVolume:
    """The axial CT series of a DICOM folder as a canonical :class:`StoredVolume`.

    The stored values keep the pixel type when every slice has the same RescaleSlope and
    RescaleIntercept (the usual CT series); otherwise each slice is made float32 HU as it is
    decoded. ``meta["rejected_series"]`` names every other series of the folder with its reason.
    """
    folder = Path(folder)
    chosen, rejected = choose_series(folder)
    slices = chosen.slices
    rows, cols = slices[0].rows, slices[0].cols
    if rows * cols > MAX_SLICE_PIXELS or rows * cols * len(slices) > MAX_VOXELS:
        raise DataError(
            folder,
            f"header claims {len(slices)} slices of {rows} x {cols} pixels; refusing to decode",
        )
    iop = slices[0].orientation
    normal = _normal(iop)
    order = np.argsort([float(np.dot(normal, sl.position)) for sl in slices], kind="stable")
    slices = [slices[i] for i in order]
    stored, slope, inter = _decode_slices(slices, rows, cols)

    # Affine of the stored array (slice k, row j, column i) in LPS: columns step along the row
    # direction cosines (IOP[:3]) by PixelSpacing[1], rows along IOP[3:] by PixelSpacing[0].
    row_mm, col_mm = slices[0].pixel_spacing
    first, last = slices[0].position, slices[-1].position
    if len(slices) > 1:
        step = (last - first) / (len(slices) - 1)
    else:
        step = normal * (chosen.thickness or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = step
    lps[:3, 1] = iop[3:] * row_mm
    lps[:3, 2] = iop[:3] * col_mm
    lps[:3, 3] = first
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    check_affine(folder, ras)
    header = chosen.header
    rescales = {(sl.slope, sl.intercept) for sl in slices}
    return StoredVolume.canonical(
        stored,
        ras,
        slope,
        inter,
        {
            "source": "dicom",
            "path": str(folder),
            "patient_id": str(header.get("PatientID", "") or ""),
            "study_uid": str(header.get("StudyInstanceUID", "") or ""),
            "series_uid": chosen.uid,
            "patient_position": str(header.get("PatientPosition", "") or ""),
            "enhanced": chosen.sop_class == ENHANCED_CT,
            "transfer_syntax": str(getattr(header.file_meta, "TransferSyntaxUID", "")),
            "rescale": rescales.pop() if len(rescales) == 1 else "per slice",
            "rescale_source": "dicom",
            "rejected_series": rejected,
            "source_shape": (len(slices), rows, cols),
        },
    )


def read_dicom_series(folder: str | Path) -> Volume:
    """The axial CT series of a DICOM folder as a canonical float32 :class:`Volume` in HU.

    HU are ``stored * RescaleSlope + RescaleIntercept`` of each slice, rounded once to float32.
    ``meta["rejected_series"]`` names every other series of the folder with its reason.
    """
    volume = read_dicom_stored(folder).to_volume()
    if not np.isfinite(volume.voxels).all():
        raise DataError(folder, "rescaled voxels contain NaN or infinite values")
    return volume
