"""NIfTI CT volumes + metadata CSV -> one HDF5 volume store of uint8 volumes ``[D, H, W]``.

Per volume: read with medcore's reader (:func:`medcore.volumes.read_nifti`: reoriented to the
canonical orientation, slices inferior -> superior, rows anterior -> posterior, columns
patient's right -> left, the radiological view), Hounsfield units from the header's
scl_slope/scl_inter or, when the header does not scale, from the metadata's RescaleSlope /
RescaleIntercept, clip to [-1000, 1000], resize preserving the physical aspect ratio so that
the whole volume fits the target (the same mm per voxel on every axis), centre it and pad the
rest with air. Nothing is cropped: a long scan keeps its first and last slice. With
``--no-slide-b2u`` slices are stored superior -> inferior.

The file is medcore's volume store (:mod:`medcore.volume_store`, kind ``ctclip.volumes``):
``/volumes/<VolumeName>`` one dataset per volume, chunked as a whole volume, with attributes
``name``, ``source``, ``spacing`` (input mm, z y x), ``out_spacing``, ``source_shape``, ``pad``
(``[3, 2]`` voxels of padding before/after along D, H, W) and ``complete``. File attributes:
``format``, ``format_version``, ``kind``, ``settings`` and the settings ``target_shape``,
``slide_b2u``, ``hu_range``, ``orientation``.

Crash safety and appending: finished volumes are staged in ``<out>.partial`` (flushed, each
marked ``complete`` last; unmarked ones are dropped on reopening). A finished job renames the
staging file to ``<out>``, or appends its volumes to an existing ``<out>`` in place: the archive
is never copied, and the finished file is not opened for writing while volumes are computed.
"""

from __future__ import annotations

import ast
import concurrent.futures as cf
import multiprocessing
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ctclip.notes import name_left_out
from medcore.errors import DataError
from medcore.io import read_csv
from medcore.volume_store import FORMAT as STORE_FORMAT
from medcore.volume_store import VolumeStoreWriter, complete_names
from medcore.volumes import CANONICAL_AXCODES, NIFTI_SUFFIXES, center_in_box, read_nifti

KIND = "ctclip.volumes"
HU_RANGE = (-1000.0, 1000.0)


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

    def counts(self) -> str:
        """The one line ctclip-preprocess ends with."""
        return (
            f"{self.output}: {len(self.written)} written, {self.skipped_existing} already "
            f"present, {len(self.failed)} skipped"
        )


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


def resize_preserving_aspect(
    vol: np.ndarray, spacing_zyx: tuple[float, float, float], target: tuple[int, int, int]
) -> tuple[np.ndarray, float]:
    """Resample to isotropic voxels of the size at which the whole volume fits ``target``.

    Returns (resampled volume, output voxel size in mm); the larger of the physical extents
    (relative to the target) sets the voxel size, so no axis exceeds its target and nothing
    needs cropping. Antialiased bilinear resampling, done in-plane then along z, because
    torch's antialiasing covers 2D resizes only.
    """
    d, h, w = vol.shape
    sz, sy, sx = spacing_zyx
    out_mm = max(d * sz / target[0], h * sy / target[1], w * sx / target[2])
    size = (
        min(target[0], max(1, round(d * sz / out_mm))),  # min: rounding never exceeds it
        min(target[1], max(1, round(h * sy / out_mm))),
        min(target[2], max(1, round(w * sx / out_mm))),
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


def hu_to_uint8(hu: np.ndarray) -> np.ndarray:
    lo, hi = HU_RANGE
    return np.round((np.clip(hu, lo, hi) - lo) / (hi - lo) * 255.0).astype(np.uint8)


def preprocess_volume(
    path: Path, meta: VolumeMeta | None, target: tuple[int, int, int], slide_b2u: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    """One NIfTI file -> (uint8 [D, H, W], attributes to store with it)."""
    rescale = None
    if meta is not None:
        rescale = (meta.slope if meta.slope is not None else 1.0, meta.intercept or 0.0)
    volume = read_nifti(path, rescale)
    view = volume.voxels
    np.clip(view, *HU_RANGE, out=view)  # the array is ours: clip in place
    if not slide_b2u:
        view = view[::-1]
    spacing = meta.spacing_zyx if meta is not None and meta.spacing_zyx else volume.spacing
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        raise DataError(
            path, f"voxel size {tuple(float(v) for v in spacing)} mm (z y x) is not positive"
        )
    resized, out_mm = resize_preserving_aspect(view, spacing, target)
    boxed, pad, _ = center_in_box(resized, target, HU_RANGE[0])  # never cropped (see above)
    attrs = {
        "name": volume_name(path),
        "source": str(path),
        "spacing": np.asarray(spacing, dtype=np.float64),
        "out_spacing": np.full(3, out_mm, dtype=np.float64),
        "source_shape": np.asarray(view.shape, dtype=np.int64),
        "pad": pad,
    }
    return hu_to_uint8(boxed), attrs


def store_settings(target: tuple[int, int, int], slide_b2u: bool) -> dict[str, Any]:
    """The settings a ctclip store records (and training checks)."""
    return {
        "target_shape": [int(v) for v in target],
        "slide_b2u": bool(slide_b2u),
        "hu_range": [float(v) for v in HU_RANGE],
        "orientation": "".join(CANONICAL_AXCODES),
    }


def _work(args: tuple[Path, VolumeMeta | None, tuple[int, int, int], bool]) -> tuple[str, Any, Any]:
    path = args[0]
    try:
        volume, attrs = preprocess_volume(*args)
    except DataError as exc:
        return volume_name(path), None, exc.why
    except Exception as exc:
        return volume_name(path), None, f"{type(exc).__name__}: {_first_line(exc)}"
    return volume_name(path), volume, attrs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


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
    name_left_out("note: ", without_file, f"metadata rows have no volume under {ct_data_path}")

    settings = store_settings(target, slide_b2u)
    with VolumeStoreWriter(out, KIND, settings, compression=compression) as store:
        done = store.done
        result.skipped_existing = len(done & set(names))
        todo = [
            p for p in files if volume_name(p) not in done and volume_name(p) not in result.failed
        ]
        if not todo and not store.staged:
            return result  # nothing new: the output stays as it is
        jobs = [(p, metadata.get(volume_name(p)), target, slide_b2u) for p in todo]
        bar = tqdm(
            total=len(jobs),
            desc="preprocess",
            unit="vol",
            disable=not show_progress,
            dynamic_ncols=True,
        )
        for name, volume, info in _results(jobs, num_workers):
            bar.update(1)
            if volume is None:
                result.failed[name] = info
                tqdm.write(f"skipped {name}: {info}", file=sys.stderr)
                continue
            store.write(name, volume, info)
            result.written.append(name)
        bar.close()
        if store.done:
            store.finish()
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
            if h5.attrs.get("format") != STORE_FORMAT or h5.attrs.get("kind") != KIND:
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


def main(args: Any) -> int:
    """ctclip-preprocess: preprocess, then one line of counts."""
    res = run_preprocess(
        args.ct_data_path, args.ct_out_path, args.metadata_path, tuple(args.target_shape),
        args.slide_b2u, args.num_workers, args.compression,
    )  # fmt: skip
    print(res.counts())
    return 0
