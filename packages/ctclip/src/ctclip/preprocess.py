"""NIfTI CT volumes + metadata CSV -> one HDF5 file of uint8 volumes ``[D, H, W]``.

Per volume: reorient to RAS (closest canonical), Hounsfield units from the header's
scl_slope/scl_inter or, when the header does not scale, from the metadata's RescaleSlope /
RescaleIntercept, clip to [-1000, 1000], resize preserving the physical aspect ratio (the
in-plane field of view fits H x W; the same mm per voxel along z), centre pad/crop to the
target shape, store as uint8. Stored orientation: slices inferior -> superior (``slide_b2u``),
rows anterior -> posterior, columns patient's right -> left (the radiological view).

HDF5 layout: ``/volumes/<VolumeName>`` one dataset per volume, chunked as a whole volume, with
attributes ``name``, ``source``, ``spacing`` (input mm, z y x), ``out_spacing``, ``source_shape``
and ``complete``. File attributes: ``format``, ``target_shape``, ``slide_b2u``, ``hu_range``.

Crash safety: h5py writes are not atomic, so the job writes into ``<out>.partial``, flushes after
each volume and marks it ``complete`` only after its data is written; reopening drops volumes
without the mark. Only a finished job renames the partial file to ``<out>``. Extending an existing
file works on a copy, so the finished file is never opened for writing.
"""

from __future__ import annotations

import ast
import concurrent.futures as cf
import datetime as _dt
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medcore.errors import DataError
from medcore.io import RunLock, read_csv

FORMAT = "ctclip.volumes/1"
HU_RANGE = (-1000.0, 1000.0)
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# A CT-RATE volume has ~1e8 voxels; a header claiming more than this is refused before any
# voxel is decoded (a 100-byte file must not make the job allocate terabytes).
MAX_VOXELS = 2_000_000_000


class BadVolume(ValueError):
    """A NIfTI file that cannot be preprocessed: the message is the reason shown to the user."""


@dataclass
class VolumeMeta:
    """What the metadata CSV says about one volume (None where it says nothing)."""

    slope: float | None = None
    intercept: float | None = None
    spacing_zyx: tuple[float, float, float] | None = None


@dataclass
class PreprocessResult:
    written: list[str] = field(default_factory=list)
    skipped_existing: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    output: Path | None = None


def volume_name(path: Path) -> str:
    """The CT-RATE VolumeName of a file: its file name (``train_1_a_1.nii.gz``)."""
    return path.name


def find_volumes(root: Path) -> list[Path]:
    """NIfTI files under ``root`` (recursive), sorted by name."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(root, "volume directory not found")
    found = [p for p in root.rglob("*") if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)]
    return sorted(found, key=lambda p: p.name)


def _parse_spacing(value: Any) -> list[float] | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (int, float)):
        return [float(value)]
    try:
        parsed = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        return None
    parsed = parsed if isinstance(parsed, (list, tuple)) else [parsed]
    try:
        return [float(v) for v in parsed]
    except (TypeError, ValueError):
        return None


def read_metadata(paths: list[Path]) -> dict[str, VolumeMeta]:
    """VolumeName -> VolumeMeta from CT-RATE metadata CSVs (other columns are kept but unused)."""
    out: dict[str, VolumeMeta] = {}
    for path in paths:
        frame = read_csv(
            path, required=["VolumeName", "RescaleSlope", "RescaleIntercept"], unique="VolumeName"
        )
        for row in frame.to_dict("records"):
            xy = _parse_spacing(row.get("XYSpacing"))
            z = _parse_spacing(row.get("ZSpacing"))
            spacing = None
            if xy and z:
                spacing = (z[0], xy[0], xy[1] if len(xy) > 1 else xy[0])
            slope, inter = row.get("RescaleSlope"), row.get("RescaleIntercept")
            out[str(row["VolumeName"])] = VolumeMeta(
                slope=None if slope is None or np.isnan(float(slope)) else float(slope),
                intercept=None if inter is None or np.isnan(float(inter)) else float(inter),
                spacing_zyx=spacing,
            )
    return out


def load_hu_ras(path: Path, meta: VolumeMeta | None) -> tuple[np.ndarray, np.ndarray]:
    """(HU array with axes x->R, y->A, z->S, voxel spacing x y z in mm) of one NIfTI file.

    The array may be a strided view (no copy); :func:`ras_to_view` makes it contiguous.
    """
    if path.stat().st_size == 0:
        raise BadVolume("empty file (0 bytes)")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for a corrupt header
        raise BadVolume(
            f"not a readable NIfTI file (truncated or corrupt: {_first_line(exc)})"
        ) from None
    if len(img.shape) != 3:
        raise BadVolume(f"expected a 3D volume, found shape {tuple(img.shape)}")
    if int(np.prod(img.shape, dtype=np.float64)) > MAX_VOXELS:
        raise BadVolume("header claims {}x{}x{} voxels; refusing to decode".format(*img.shape))
    proxy = img.dataobj
    header_scales = (float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))) != (
        1.0,
        0.0,
    )
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))  # applies the header's scaling
    except Exception as exc:  # EOFError, zlib.error, OSError, ValueError ... for a cut file
        raise BadVolume(
            f"cannot read the voxels (truncated or corrupt: {_first_line(exc)})"
        ) from None
    scaling = [float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))]
    if not header_scales and meta is not None:
        slope, inter = (meta.slope if meta.slope is not None else 1.0), (meta.intercept or 0.0)
        data *= slope  # in place: a CT volume is ~200 MB of float32
        data += inter
        scaling += [slope, inter]
    # Integer voxels with finite scaling cannot be NaN/inf: only float data needs the scan.
    if (img.get_data_dtype().kind == "f" or not np.isfinite(scaling).all()) and not np.isfinite(
        data
    ).all():
        raise BadVolume("contains NaN or infinite values")
    ornt = nib.orientations.io_orientation(img.affine)
    # A strided view, no copy: nibabel's array is in the file's (Fortran) order, and ras_to_view
    # makes the one contiguous copy, in an order close to that memory layout (fast).
    ras = nib.orientations.apply_orientation(data, ornt)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    return ras, spacing


def ras_to_view(ras: np.ndarray, slide_b2u: bool = True) -> np.ndarray:
    """RAS array (x, y, z) -> (D, H, W): slices along z, rows anterior->posterior, columns right->left."""
    view = ras.transpose(2, 1, 0)[:, ::-1, ::-1]
    if not slide_b2u:
        view = view[::-1]
    return np.ascontiguousarray(view)


def resize_preserving_aspect(
    vol: np.ndarray, spacing_zyx: tuple[float, float, float], target: tuple[int, int, int]
) -> tuple[np.ndarray, float]:
    """Resample to isotropic voxels of the size that fits the in-plane field of view into H x W.

    Returns (resampled volume, output voxel size in mm). Antialiased bilinear resampling, done
    in-plane then along z, because torch's antialiasing covers 2D resizes only.
    """
    d, h, w = vol.shape
    sz, sy, sx = spacing_zyx
    out_mm = max(h * sy / target[1], w * sx / target[2])
    size = (
        max(1, round(d * sz / out_mm)),
        max(1, round(h * sy / out_mm)),
        max(1, round(w * sx / out_mm)),
    )
    x = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))
    if (size[1], size[2]) != (h, w):
        x = F.interpolate(
            x[:, None], size=size[1:], mode="bilinear", antialias=True, align_corners=False
        )[:, 0]
    if size[0] != d:
        flat = x.reshape(1, 1, d, -1)
        x = F.interpolate(
            flat,
            size=(size[0], flat.shape[-1]),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        ).reshape(size[0], size[1], size[2])
    return x.numpy(), out_mm


def center_pad_crop(vol: np.ndarray, target: tuple[int, int, int], fill: float) -> np.ndarray:
    """Centre ``vol`` in an array of shape ``target``: pad with ``fill`` or crop symmetrically."""
    out = np.full(target, fill, dtype=vol.dtype)
    src, dst = [], []
    for n, t in zip(vol.shape, target, strict=True):
        if n >= t:
            start = (n - t) // 2
            src.append(slice(start, start + t))
            dst.append(slice(0, t))
        else:
            start = (t - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[tuple(dst)] = vol[tuple(src)]
    return out


def hu_to_uint8(hu: np.ndarray) -> np.ndarray:
    lo, hi = HU_RANGE
    return np.round((np.clip(hu, lo, hi) - lo) / (hi - lo) * 255.0).astype(np.uint8)


def preprocess_volume(
    path: Path, meta: VolumeMeta | None, target: tuple[int, int, int], slide_b2u: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    """One NIfTI file -> (uint8 [D, H, W], attributes to store with it)."""
    hu, spacing_xyz = load_hu_ras(path, meta)
    np.clip(hu, *HU_RANGE, out=hu)  # the array is ours: clip in place
    view = ras_to_view(hu, slide_b2u)
    spacing = (
        meta.spacing_zyx
        if meta is not None and meta.spacing_zyx
        else (float(spacing_xyz[2]), float(spacing_xyz[1]), float(spacing_xyz[0]))
    )
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        raise BadVolume(f"voxel size {tuple(float(v) for v in spacing)} mm (z y x) is not positive")
    resized, out_mm = resize_preserving_aspect(view, spacing, target)
    volume = hu_to_uint8(center_pad_crop(resized, target, HU_RANGE[0]))
    attrs = {
        "name": volume_name(path),
        "source": str(path),
        "spacing": np.asarray(spacing, dtype=np.float64),
        "out_spacing": np.full(3, out_mm, dtype=np.float64),
        "source_shape": np.asarray(view.shape, dtype=np.int64),
    }
    return volume, attrs


def _work(args: tuple[Path, VolumeMeta | None, tuple[int, int, int], bool]) -> tuple[str, Any, Any]:
    path = args[0]
    try:
        volume, attrs = preprocess_volume(*args)
    except BadVolume as exc:
        return volume_name(path), None, str(exc)
    except Exception as exc:
        return volume_name(path), None, f"{type(exc).__name__}: {_first_line(exc)}"
    return volume_name(path), volume, attrs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def complete_names(h5: h5py.File) -> set[str]:
    group = h5.get("volumes")
    if group is None:
        return set()
    return {name for name, ds in group.items() if ds.attrs.get("complete", 0) == 1}


def _check_layout(h5: h5py.File, path: Path, target: tuple[int, int, int], slide_b2u: bool) -> None:
    stored = tuple(int(v) for v in h5.attrs.get("target_shape", target))
    if stored != tuple(target):
        raise DataError(
            path,
            f"holds volumes of shape {stored}, not {tuple(target)} (use another output "
            "file or the same --target-shape)",
        )
    if bool(h5.attrs.get("slide_b2u", slide_b2u)) != slide_b2u:
        raise DataError(
            path, "was written with the other slice order (--slide-b2u); use another output file"
        )


def _open_partial(
    out: Path, partial: Path, target: tuple[int, int, int], slide_b2u: bool
) -> h5py.File:
    """Open (creating or repairing) the partial file; drop volumes not marked complete."""
    if partial.exists():
        try:
            h5 = h5py.File(partial, "a")
        except OSError as exc:
            aside = partial.with_name(partial.name + f".corrupt-{_dt.datetime.now():%Y%m%d-%H%M%S}")
            os.replace(partial, aside)
            print(
                f"warning: {partial}: unreadable after an interruption ({str(exc)[:80]}); "
                f"moved to {aside.name}, starting again",
                file=sys.stderr,
            )
            return _open_partial(out, partial, target, slide_b2u)
        try:
            _check_layout(h5, partial, target, slide_b2u)
        except DataError:
            h5.close()
            raise
        group = h5.require_group("volumes")
        for name in [n for n, ds in group.items() if ds.attrs.get("complete", 0) != 1]:
            del group[name]  # half-written before an interruption
        return h5
    if out.exists():
        shutil.copyfile(out, partial)  # extend a copy; the finished file stays readable and intact
        return _open_partial(out, partial, target, slide_b2u)
    h5 = h5py.File(partial, "w")
    h5.attrs["format"] = FORMAT
    h5.attrs["target_shape"] = np.asarray(target, dtype=np.int64)
    h5.attrs["slide_b2u"] = slide_b2u
    h5.attrs["hu_range"] = np.asarray(HU_RANGE)
    h5.create_group("volumes")
    return h5


def _init_worker() -> None:
    torch.set_num_threads(1)  # one volume per process; the processes share the cores


def _results(
    jobs: list[tuple[Path, VolumeMeta | None, tuple[int, int, int], bool]], num_workers: int
) -> Iterator[tuple[str, Any, Any]]:
    """Results of ``_work`` in completion order, at most 2 x workers volumes in flight (memory)."""
    if num_workers <= 1:
        yield from map(_work, jobs)
        return
    # spawn, not fork: a forked child inheriting torch's OpenMP state can hang.
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(
        max_workers=num_workers, mp_context=ctx, initializer=_init_worker
    ) as pool:
        pending: set[cf.Future] = set()
        queue = iter(jobs)
        for job in queue:
            pending.add(pool.submit(_work, job))
            if len(pending) >= 2 * num_workers:
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                yield from (f.result() for f in done)
        for fut in cf.as_completed(pending):
            yield fut.result()


def run_preprocess(
    ct_data_path: Path,
    out: Path,
    metadata_paths: list[Path],
    target_shape: tuple[int, int, int] = (160, 224, 224),
    slide_b2u: bool = True,
    num_workers: int = 4,
    compression: str | None = "lzf",
    show_progress: bool = True,
) -> PreprocessResult:
    """Preprocess every NIfTI file under ``ct_data_path`` into ``out`` (resumable)."""
    out = Path(out)
    target = tuple(int(v) for v in target_shape)
    if len(target) != 3 or min(target) < 1:
        raise DataError(
            "--target-shape", f"expected three positive sizes D H W, got {target_shape}"
        )
    files = find_volumes(ct_data_path)
    if not files:
        raise DataError(ct_data_path, "no NIfTI files (*.nii.gz, *.nii) found")
    metadata = read_metadata(metadata_paths) if metadata_paths else {}
    names = [volume_name(p) for p in files]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(ct_data_path, f"volume names occur more than once: {', '.join(dupes[:5])}")
    result = PreprocessResult(output=out)
    if metadata_paths and not any(n in metadata for n in names):
        raise DataError(
            metadata_paths[0], f"none of the {len(files)} volumes is listed in the metadata CSV(s)"
        )
    unlisted = [n for n in names if metadata_paths and n not in metadata]
    for name in unlisted:
        result.failed[name] = "not in the metadata CSV (slope/intercept and spacing unknown)"
        print(f"skipped {name}: not in the metadata CSV", file=sys.stderr)
    # Metadata names are only matched against the names of files found under ct_data_path,
    # never used as paths: a name like ../x.nii.gz matches nothing and is named here.
    without_file = sorted(set(metadata) - set(names))
    if without_file:
        print(
            f"note: {len(without_file)} metadata rows have no volume under {ct_data_path} "
            f"(first: {', '.join(without_file[:3])})",
            file=sys.stderr,
        )

    partial = out.with_name(out.name + ".partial")
    with RunLock(out):
        if out.exists() and not partial.exists():
            with h5py.File(out, "r") as h5:
                _check_layout(h5, out, target, slide_b2u)
                done = complete_names(h5)
        else:
            done = set()
        todo = [
            p for p in files if volume_name(p) not in done and volume_name(p) not in result.failed
        ]
        if not todo and out.exists() and not partial.exists():
            result.skipped_existing = len(done)
            return result
        h5 = _open_partial(out, partial, target, slide_b2u)
        try:
            done = complete_names(h5)
            todo = [p for p in todo if volume_name(p) not in done]
            result.skipped_existing = len(done & set(names))
            jobs = [(p, metadata.get(volume_name(p)), target, slide_b2u) for p in todo]
            bar = tqdm(
                total=len(jobs),
                desc="preprocess",
                unit="vol",
                disable=not show_progress,
                dynamic_ncols=True,
            )
            group = h5["volumes"]
            for name, volume, info in _results(jobs, num_workers):
                bar.update(1)
                if volume is None:
                    result.failed[name] = info
                    tqdm.write(f"skipped {name}: {info}", file=sys.stderr)
                    continue
                ds = group.create_dataset(
                    name,
                    data=volume,
                    chunks=volume.shape,
                    compression=None if compression in (None, "none") else compression,
                )
                for key, value in info.items():
                    ds.attrs[key] = value
                ds.attrs["complete"] = 1  # last: a volume without this mark is redone on resume
                h5.flush()
                result.written.append(name)
            bar.close()
        finally:
            h5.close()
        os.replace(partial, out)
    return result


def read_volume_names(path: Path) -> set[str]:
    """Names of the complete volumes in a ctclip HDF5 file."""
    path = Path(path)
    if not path.is_file():
        partial = path.with_name(path.name + ".partial")
        hint = (
            f" (an unfinished {partial.name} exists: rerun ctclip-preprocess)"
            if partial.exists()
            else ""
        )
        raise DataError(path, "HDF5 file not found" + hint)
    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("format") != FORMAT:
                raise DataError(path, "not a ctclip volume file (write it with ctclip-preprocess)")
            return complete_names(h5)
    except OSError as exc:
        raise DataError(path, f"not a readable HDF5 file ({str(exc)[:120]})") from None


def volume_shape(path: Path) -> tuple[int, int, int]:
    with h5py.File(path, "r") as h5:
        shape = h5.attrs.get("target_shape")
        if shape is None or len(shape) != 3:
            raise DataError(path, "has no target_shape attribute (write it with ctclip-preprocess)")
        return tuple(int(v) for v in shape)
