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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcore.errors import DataError

CANONICAL_AXCODES = ("S", "P", "L")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Far beyond any real CT (512 x 512 x 4000 is ~1e9 voxels): a header claiming more is refused
# before anything is decoded (decompression-bomb protection).
MAX_VOXELS = 2**31
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
class Volume:
    """A CT volume in the canonical orientation (see the module docstring)."""

    voxels: np.ndarray  # float32 HU [z, y, x]
    affine: np.ndarray  # 4 x 4: canonical index (z, y, x, 1) -> RAS+ mm
    spacing: tuple[float, float, float]  # mm along z, y, x
    source_axcodes: tuple[str, str, str]  # world directions of the stored axes, before reorienting
    meta: dict[str, Any] = field(default_factory=dict)
    axcodes: tuple[str, str, str] = CANONICAL_AXCODES

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.voxels.shape)


def _first_line(exc: BaseException, limit: int = 120) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def to_canonical(
    data: np.ndarray, affine: np.ndarray, copy: bool = True
) -> tuple[np.ndarray, np.ndarray, tuple[str, str, str]]:
    """(data in the canonical orientation, its affine, the source's axis codes).

    ``affine`` maps ``data``'s indices to RAS+ mm. Without ``copy`` the result may be a strided
    view of ``data``.
    """
    from nibabel import orientations as ornt_mod

    start = ornt_mod.io_orientation(affine)
    codes = tuple(str(c) for c in ornt_mod.ornt2axcodes(start))
    transform = ornt_mod.ornt_transform(start, ornt_mod.axcodes2ornt(CANONICAL_AXCODES))
    out = ornt_mod.apply_orientation(data, transform)
    new_affine = affine @ ornt_mod.inv_ornt_aff(transform, data.shape)
    if copy:
        out = np.ascontiguousarray(out)
    return out, new_affine, codes


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(0)))


def check_affine(what: str | Path, affine: np.ndarray) -> None:
    """A DataError unless ``affine`` is finite and invertible (a usable geometry)."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.isfinite(linear).all():
        raise DataError(what, "affine has NaN or infinite entries")
    scale = float(np.abs(linear).max())
    if scale == 0 or abs(np.linalg.det(linear)) < 1e-9 * scale**3:
        raise DataError(what, "singular affine (a zero voxel size or collinear axes)")


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
            path, f"not a readable NIfTI file (truncated or corrupt: {_first_line(exc)})"
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
            path, f"cannot read the voxels (truncated or corrupt: {_first_line(exc)})"
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
    voxels, canon_affine, codes = to_canonical(data, affine)
    return Volume(
        voxels=voxels,
        affine=canon_affine,
        spacing=_spacing(canon_affine),
        source_axcodes=codes,
        meta={
            "source": "nifti",
            "path": str(path),
            "rescale": applied,
            "rescale_source": source,
            "source_shape": shape,
        },
    )


# -- DICOM --------------------------------------------------------------------------------------


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
            raise DataError(
                path, f"corrupt or not a DICOM file ({_first_line(exc, 100)})"
            ) from None
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
        raise DataError(path, f"cannot decode pixel data ({_first_line(exc)})") from None


def read_dicom_series(folder: str | Path) -> Volume:
    """The axial CT series of a DICOM folder as a canonical :class:`Volume` in HU.

    ``meta["rejected_series"]`` names every other series of the folder with its reason.
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

    out = np.empty((len(slices), rows, cols), dtype=np.float32)
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
        np.multiply(pixels, sl.slope, out=out[i], casting="unsafe")
        out[i] += sl.intercept
    if not np.isfinite(out).all():
        raise DataError(folder, "rescaled voxels contain NaN or infinite values")

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
    voxels, affine, codes = to_canonical(out, ras)
    header = chosen.header
    rescales = {(sl.slope, sl.intercept) for sl in slices}
    return Volume(
        voxels=voxels,
        affine=affine,
        spacing=_spacing(affine),
        source_axcodes=codes,
        meta={
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


def read_volume(path: str | Path, rescale: tuple[float, float] | None = None) -> Volume:
    """A DICOM folder or a NIfTI file (by what ``path`` is) as a canonical :class:`Volume`."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if path.name.endswith(NIFTI_SUFFIXES):
        return read_nifti(path, rescale)
    raise DataError(path, "neither a DICOM folder nor a NIfTI file (.nii, .nii.gz)")
