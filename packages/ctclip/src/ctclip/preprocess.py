"""NIfTI CT volumes + metadata CSV -> one HDF5 volume store of uint8 volumes ``[D, H, W]``.

Per volume: read with medcore's reader (:func:`medcore.volumes.nifti.read_nifti`: reoriented to the
canonical orientation, slices inferior -> superior, rows anterior -> posterior, columns
patient's right -> left, the radiological view), Hounsfield units from one reading of the stored
values (``--hu-source``, below), clip to [-1000, 1000], resize preserving the physical aspect
ratio so that the whole volume fits the target (the same mm per voxel on every axis), centre it
and pad the rest with air. Nothing is cropped: a long scan keeps its first and last slice. With
``--no-slide-b2u`` slices are stored superior -> inferior.

HU, never rescaled twice. A volume can be read two ways: as the NIfTI gives it (the header's
scl_slope/scl_inter applied when it scales; else the values as stored), or with the metadata
CSV's RescaleSlope/RescaleIntercept applied to the stored values. CT-RATE's first release stores
raw scanner values with an unscaled header (the metadata's rescale is needed); later releases
store HU (applying the metadata's rescale again turns 40 HU into -984). ``--hu-source``:

- ``header``: as the NIfTI gives it; the metadata's rescale is never applied.
- ``metadata``: the metadata's rescale on the stored values, for every volume (a blank or
  unreadable rescale cell stops the job before anything is written).
- ``auto`` (default): where the two readings differ, the one that looks like a body CT in HU:
  the larger of min(share of voxels in [-1100, -900] HU, share in [-150, 150] HU)
  (:func:`medcore.volumes.reader.hu_evidence`; a reading off by a rescale moves both air and soft
  tissue by about 1000 HU). A volume where neither reading reaches 1 %, or both come within
  80 % of each other, is skipped and named (choose with ``header`` or ``metadata``).

Each volume records its reading (``hu_source``, ``hu_rescale`` = slope and intercept from the
stored values, ``hu_evidence`` = the two shares, ``hu_note``); the job ends with the counts.

Metadata cells: RescaleSlope/RescaleIntercept and, when the table has them, XYSpacing
(``"[0.75, 0.75]"``) and ZSpacing must be numbers. A volume with a blank or unreadable cell is
named and skipped (a rescale cell only where its reading may be used: ``auto``), never read as
0 or 1 mm. A table without spacing columns leaves the spacing to the NIfTI header.

The file is medcore's volume store (:mod:`medcore.volumes.store`, kind ``ctclip.volumes``):
``/volumes/<VolumeName>`` one dataset per volume, chunked as a whole volume, with attributes
``name``, ``source``, ``spacing`` (input mm, z y x), ``out_spacing``, ``source_shape``, ``pad``
(``[3, 2]`` voxels of padding before/after along D, H, W), the ``hu_*`` record and
``complete``. File attributes: ``format``, ``format_version``, ``kind``, ``settings`` and the
settings ``target_shape``, ``slide_b2u``, ``hu_range``, ``orientation``.

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
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ctclip.config import HU_SOURCES
from ctclip.ctrate import find_ctrate
from ctclip.notes import name_left_out
from medcore.errors import DataError, UserError
from medcore.io import read_csv
from medcore.volumes.geometry import (
    CANONICAL_AXCODES,
    StoredVolume,
    center_in_box,
    to_float32_hu,
)
from medcore.volumes.nifti import NIFTI_SUFFIXES, read_nifti_stored
from medcore.volumes.reader import HUEvidence, evidence_sample, hu_evidence
from medcore.volumes.store import (  # noqa: F401 (complete_names: the fault tests use it from here)
    Shard,
    VolumeStore,
    VolumeStoreWriter,
    complete_names,
    shard_output,
)

STORE_KIND = "ctclip.volumes"  # the identity of the HDF5 volume stores ctclip-preprocess writes
HU_RANGE = (-1000.0, 1000.0)
HU_MIN_SCORE = 0.01  # a reading with less air or soft tissue than this is not HU
HU_TIE = 0.8  # the other reading scores at least this fraction of the best: cannot tell
RESCALE_COLUMNS = ("RescaleSlope", "RescaleIntercept")
SPACING_COLUMNS = ("XYSpacing", "ZSpacing")
# Voxels made float32 at a time: a slab of a few 512 x 512 slices stays in the CPU cache while
# it is clipped and resized.
_SLAB_VOXELS = 2**20
# How each reading is named in records and messages.
SOURCE_NAMES = {
    "header": "the NIfTI header's scl_slope/scl_inter",
    "stored": "the stored values as they are",
    "metadata": "the metadata's RescaleSlope/RescaleIntercept",
}


@dataclass
class VolumeMeta:
    """What a metadata CSV row says about one volume (None where it says nothing).

    ``problems`` maps a column to what is wrong with its cell (blank, not a number): such a
    value is never replaced by a default. ``source`` is the CSV the row came from.
    """

    slope: float | None = None
    intercept: float | None = None
    spacing_zyx: tuple[float, float, float] | None = None
    problems: dict[str, str] = field(default_factory=dict)
    source: Path | None = None

    @property
    def rescale(self) -> tuple[float, float] | None:
        """(RescaleSlope, RescaleIntercept), None unless both are usable numbers."""
        if self.slope is None or self.intercept is None:
            return None
        return self.slope, self.intercept

    def why(self, columns: Sequence[str]) -> str | None:
        """What is wrong with the cells of ``columns`` (one phrase), None when nothing is."""
        found = [f"{c} {self.problems[c]}" for c in columns if c in self.problems]
        return "; ".join(found) or None


def _affine(slope: float, intercept: float) -> str:
    """``stored x 0.5 - 1024``: a rescale as people write it."""
    return f"stored x {slope:g} {'-' if intercept < 0 else '+'} {abs(intercept):g}"


@dataclass(frozen=True)
class HUReading:
    """How a volume's stored values became HU: ``source`` (``header``, ``stored`` or
    ``metadata``, see :data:`SOURCE_NAMES`), the slope and intercept applied to the stored
    values, the reading's :class:`~medcore.volumes.reader.HUEvidence`, and a note on the reading
    that was not used."""

    source: str
    slope: float
    intercept: float
    evidence: HUEvidence
    note: str = ""

    def describe(self) -> str:
        rescale = (
            "" if self.source == "stored" else f" (HU = {_affine(self.slope, self.intercept)})"
        )
        note = f"; {self.note}" if self.note else ""
        return f"{SOURCE_NAMES[self.source]}{rescale}: {self.evidence}{note}"

    def attrs(self) -> dict[str, Any]:
        return {
            "hu_source": self.source,
            "hu_rescale": np.asarray([self.slope, self.intercept], dtype=np.float64),
            "hu_evidence": np.asarray(
                [self.evidence.air, self.evidence.soft_tissue], dtype=np.float64
            ),
            "hu_note": self.note,
        }


@dataclass
class PreprocessResult:
    written: list[str] = field(default_factory=list)
    skipped_existing: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    output: Path | None = None
    hu_sources: Counter = field(default_factory=Counter)
    weak: list[str] = field(default_factory=list)  # written, but not looking like HU

    def counts(self) -> str:
        """The one line ctclip-preprocess ends with."""
        return (
            f"{self.output}: {len(self.written)} written, {self.skipped_existing} already "
            f"present, {len(self.failed)} skipped"
        )

    def hu_counts(self) -> str:
        """Which reading the written volumes' HU came from, counted."""
        parts = [f"{n} from {SOURCE_NAMES[src]}" for src, n in sorted(self.hu_sources.items())]
        weak = f"; {len(self.weak)} without air and soft tissue in place" if self.weak else ""
        return f"HU of the {len(self.written)} written volumes: {', '.join(parts) or 'none'}{weak}"


def volume_name(path: Path) -> str:
    """The CT-RATE VolumeName of a file: its file name (``train_1_a_1.nii.gz``)."""
    return path.name


def find_volumes(roots: Path | Sequence[Path]) -> list[Path]:
    """NIfTI files under ``roots`` (folders searched recursively, or files), sorted by name."""
    found = []
    for root in [roots] if isinstance(roots, (str, Path)) else roots:
        root = Path(root)
        if root.is_file():
            found.append(root)
        elif root.is_dir():
            found += [p for p in root.rglob("*") if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)]
        else:
            raise DataError(root, "volume directory not found")
    return sorted(found, key=lambda p: p.name)


def _number(value: Any) -> tuple[float | None, str | None]:
    """A numeric cell: (value, None) or (None, what is wrong with it)."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or not str(value).strip():
        return None, "is blank"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None, f"{str(value)!r} is not a number"
    return (number, None) if np.isfinite(number) else (None, f"{value} is not a finite number")


def _numbers(value: Any) -> tuple[list[float] | None, str | None]:
    """A spacing cell (``"[0.75, 0.75]"`` or one number): (values, None) or (None, why)."""
    single, why = _number(value)
    if single is not None or why == "is blank":
        return ([single] if single is not None else None), why
    try:
        parsed = ast.literal_eval(str(value).strip())
        numbers = [float(v) for v in (parsed if isinstance(parsed, (list, tuple)) else [parsed])]
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None, f"{str(value)!r} is not a list of numbers"
    if not 1 <= len(numbers) <= 2 or not np.isfinite(numbers).all():
        return None, f"{str(value)!r} is not one or two finite numbers"
    return numbers, None


def read_metadata(paths: list[Path]) -> dict[str, VolumeMeta]:
    """VolumeName -> VolumeMeta from CT-RATE metadata CSVs (other columns are kept but unused).

    Cells that are blank or not numbers are recorded as problems of that row (see
    :class:`VolumeMeta`); a table with one spacing column but not the other is an error.
    """
    out: dict[str, VolumeMeta] = {}
    for path in paths:
        frame = read_csv(path, required=["VolumeName", *RESCALE_COLUMNS], unique="VolumeName")
        has_spacing = [c in frame.columns for c in SPACING_COLUMNS]
        if any(has_spacing) and not all(has_spacing):
            missing = SPACING_COLUMNS[has_spacing.index(False)]
            raise DataError(path, f"missing column {missing} (XYSpacing and ZSpacing go together)")
        for row in frame.to_dict("records"):
            meta = VolumeMeta(source=Path(path))
            meta.slope, slope_why = _number(row["RescaleSlope"])
            meta.intercept, inter_why = _number(row["RescaleIntercept"])
            if meta.slope == 0:
                meta.slope, slope_why = None, "is 0"
            for column, why in (("RescaleSlope", slope_why), ("RescaleIntercept", inter_why)):
                if why:
                    meta.problems[column] = why
            if all(has_spacing):
                xy, xy_why = _numbers(row["XYSpacing"])
                z, z_why = _number(row["ZSpacing"])
                for column, why in (("XYSpacing", xy_why), ("ZSpacing", z_why)):
                    if why:
                        meta.problems[column] = why
                if xy is not None and z is not None:
                    meta.spacing_zyx = (z, xy[0], xy[-1])
            out[str(row["VolumeName"])] = meta
    return out


def output_grid(
    shape: tuple[int, int, int],
    spacing_zyx: tuple[float, float, float],
    target: tuple[int, int, int],
) -> tuple[tuple[int, int, int], float]:
    """(resampled size, output voxel size in mm): isotropic voxels of the size at which the
    whole volume fits ``target``. The larger of the physical extents (relative to the target)
    sets the voxel size, so no axis exceeds its target and nothing needs cropping."""
    d, h, w = shape
    sz, sy, sx = spacing_zyx
    out_mm = max(d * sz / target[0], h * sy / target[1], w * sx / target[2])
    size = (
        min(target[0], max(1, round(d * sz / out_mm))),  # min: rounding never exceeds it
        min(target[1], max(1, round(h * sy / out_mm))),
        min(target[2], max(1, round(w * sx / out_mm))),
    )
    return size, out_mm


def _antialiased(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` ``[n, h, w]`` resized to ``[n, *size]`` (bilinear, antialiased)."""
    return F.interpolate(
        x[:, None], size=size, mode="bilinear", antialias=True, align_corners=False
    )[:, 0]


def resample_hu(
    stored: StoredVolume,
    rescale: tuple[float, float] | None,
    spacing_zyx: tuple[float, float, float],
    target: tuple[int, int, int],
    slide_b2u: bool = True,
) -> tuple[np.ndarray, float]:
    """HU of ``stored`` clipped to :data:`HU_RANGE` and resampled to :func:`output_grid`:
    (float32 ``[d', h', w']``, output voxel size in mm).

    The stored values become float32 HU a slab of slices at a time (``rescale`` on top of the
    header's, see :meth:`StoredVolume.hu`), clipped and resized in-plane while the slab is in
    the CPU cache; then the slices are resized along z (torch antialiases 2D resizes only, so
    the z pass runs on ``[d, h' * w']``). With ``slide_b2u`` False slices run superior ->
    inferior.
    """
    d, h, w = stored.shape
    size, out_mm = output_grid(stored.shape, spacing_zyx, target)
    in_plane = torch.empty((d, size[1], size[2]), dtype=torch.float32)
    step = max(1, _SLAB_VOXELS // (h * w))
    slab = np.empty((min(step, d), h, w), dtype=np.float32)
    for z0 in range(0, d, step):
        hu = stored.hu(slice(z0, z0 + step), rescale, out=slab[: min(step, d - z0)])
        np.clip(hu, *HU_RANGE, out=hu)
        hu_t = torch.from_numpy(hu)
        in_plane[z0 : z0 + len(hu)] = hu_t if size[1:] == (h, w) else _antialiased(hu_t, size[1:])
    x = in_plane if slide_b2u else in_plane.flip(0)
    if size[0] != d:
        x = _antialiased(x.reshape(1, d, -1), (size[0], size[1] * size[2]))[0]
    return x.reshape(size).numpy(), out_mm


def hu_to_uint8(hu: np.ndarray) -> np.ndarray:
    """HU -> uint8 over :data:`HU_RANGE` (clipped, scaled to 0..255, rounded half to even)."""
    lo, hi = HU_RANGE
    x = np.clip(hu, lo, hi)
    x -= lo
    x /= hi - lo
    x *= 255.0
    np.round(x, out=x)
    return x.astype(np.uint8)


def hu_reading(
    stored: StoredVolume, rescale: tuple[float, float] | None, hu_source: str = "auto"
) -> HUReading:
    """Choose how ``stored`` (as :func:`~medcore.volumes.nifti.read_nifti_stored` read it)
    becomes HU. ``rescale`` is the metadata's (RescaleSlope, RescaleIntercept), None when it has
    none; the rules are the module docstring's. A volume ``auto`` cannot decide is a DataError.

    The evidence is counted on HU of :func:`~medcore.volumes.reader.evidence_sample` of the
    stored values (an eighth of a CT volume), made the way the whole volume's HU are made.
    """
    path = stored.meta.get("path", "volume")
    header_slope, header_inter = stored.slope, stored.inter  # (1, 0): the header does not scale
    sample_stored = evidence_sample(stored.stored)
    sample = to_float32_hu(
        sample_stored,
        header_slope,
        header_inter,
        np.empty(sample_stored.shape, dtype=np.float32),
    )
    as_read = HUReading(
        "header" if stored.scaled else "stored",
        header_slope,
        header_inter,
        hu_evidence(sample, sampled=True),
    )
    if hu_source == "header" or rescale is None:
        return as_read
    slope, inter = rescale
    a, b = on_read(slope, inter, stored)
    metadata = HUReading("metadata", slope, inter, hu_evidence(sample, a, b, sampled=True))
    if hu_source == "metadata":
        if as_read.source == "header":
            unused = _affine(header_slope, header_inter)
            metadata = replace(metadata, note=f"not the NIfTI header's {unused}")
        return metadata
    if np.allclose((slope, inter), (header_slope, header_inter), rtol=1e-5, atol=1e-3):
        return as_read  # one reading: the metadata repeats the header (or says "no rescale")
    best, other = sorted((as_read, metadata), key=lambda r: r.evidence.score, reverse=True)
    readings = (
        f"{SOURCE_NAMES[as_read.source]}: {as_read.evidence}; "
        f"{SOURCE_NAMES['metadata']} ({_affine(slope, inter)}): {metadata.evidence}"
    )
    if best.evidence.score < HU_MIN_SCORE:
        raise DataError(
            path,
            f"no reading looks like a CT in HU ({readings}); choose one with --hu-source "
            "header or metadata",
        )
    if other.evidence.score >= HU_TIE * best.evidence.score:
        raise DataError(
            path,
            f"cannot tell which reading is HU ({readings}); choose one with --hu-source "
            "header or metadata",
        )
    return replace(best, note=f"not {SOURCE_NAMES[other.source]}: {other.evidence}")


def on_read(slope: float, inter: float, stored: StoredVolume) -> tuple[float, float]:
    """The rescale (a, b) that turns the header's HU of ``stored`` into ``stored * slope +
    inter``: the metadata's rescale applies to the stored values, i.e. to the read ones unscaled."""
    a = slope / stored.slope
    return a, inter - stored.inter * a


def reading_rescale(reading: HUReading, stored: StoredVolume) -> tuple[float, float] | None:
    """The rescale :meth:`StoredVolume.hu` applies on top of the header's for ``reading``
    (None unless the metadata's reading was chosen)."""
    if reading.source != "metadata":
        return None
    return on_read(reading.slope, reading.intercept, stored)


def preprocess_volume(
    path: Path,
    meta: VolumeMeta | None,
    target: tuple[int, int, int],
    slide_b2u: bool = True,
    hu_source: str = "auto",
) -> tuple[np.ndarray, dict[str, Any]]:
    """One NIfTI file -> (uint8 [D, H, W], attributes to store with it, the HU record included)."""
    stored = read_nifti_stored(path)
    if stored.stored.dtype.kind == "f" and not np.isfinite(stored.stored).all():
        raise DataError(path, "contains NaN or infinite values")
    reading = hu_reading(stored, meta.rescale if meta is not None else None, hu_source)
    extra = reading_rescale(reading, stored)
    spacing = meta.spacing_zyx if meta is not None and meta.spacing_zyx else stored.spacing
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        raise DataError(
            path, f"voxel size {tuple(float(v) for v in spacing)} mm (z y x) is not positive"
        )
    resized, out_mm = resample_hu(stored, extra, spacing, target, slide_b2u)
    # uint8 of the air the box is padded with: 0; nothing is cropped (see the module docstring)
    boxed, pad, _ = center_in_box(hu_to_uint8(resized), target, 0)
    attrs = {
        "name": volume_name(path),
        "source": str(path),
        "spacing": np.asarray(spacing, dtype=np.float64),
        "out_spacing": np.full(3, out_mm, dtype=np.float64),
        "source_shape": np.asarray(stored.shape, dtype=np.int64),
        "pad": pad,
        **reading.attrs(),
    }
    return boxed, attrs


def hu_record(attrs: dict[str, Any]) -> HUReading:
    """The :class:`HUReading` stored with a volume (its ``hu_*`` attributes)."""
    air, tissue = (float(v) for v in attrs["hu_evidence"])
    slope, inter = (float(v) for v in attrs["hu_rescale"])
    note = attrs.get("hu_note", "")
    return HUReading(
        str(attrs["hu_source"]),
        slope,
        inter,
        HUEvidence(air, tissue),
        note.decode() if isinstance(note, bytes) else str(note),
    )


def store_settings(target: tuple[int, int, int], slide_b2u: bool) -> dict[str, Any]:
    """The settings a ctclip store records (and training checks)."""
    return {
        "target_shape": [int(v) for v in target],
        "slide_b2u": bool(slide_b2u),
        "hu_range": [float(v) for v in HU_RANGE],
        "orientation": "".join(CANONICAL_AXCODES),
    }


Job = tuple[Path, VolumeMeta | None, tuple[int, int, int], bool, str]


def _work(args: Job) -> tuple[str, Any, Any]:
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


def _results(jobs: list[Job], num_workers: int) -> Iterator[tuple[str, Any, Any]]:
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


def unusable_meta(meta: VolumeMeta | None, hu_source: str) -> str | None:
    """Why a volume's metadata row cannot be used (its cells that are blank or not numbers,
    where this ``hu_source`` would use them), None when it can."""
    if meta is None:
        return None
    columns = SPACING_COLUMNS + (RESCALE_COLUMNS if hu_source != "header" else ())
    return meta.why(columns)


def run_preprocess(
    ct_data_path: Path | Sequence[Path],
    out: Path,
    metadata_paths: list[Path],
    target_shape: tuple[int, int, int] = (160, 224, 224),
    slide_b2u: bool = True,
    num_workers: int = 4,
    compression: str | None = "lzf",
    show_progress: bool = True,
    hu_source: str = "auto",
    log_volumes: bool = False,
    shard: Shard | None = None,
) -> PreprocessResult:
    """Preprocess every NIfTI file under ``ct_data_path`` (one folder or several) into ``out``
    (resumable). ``log_volumes`` prints each written volume's HU reading on stderr; the result
    counts them (:meth:`PreprocessResult.hu_counts`). With ``shard``, only the volumes of that
    shard, into its part file in the folder ``out`` (:mod:`medcore.volumes.store`)."""
    out = Path(out)
    if shard is None and out.is_dir():
        raise UserError(
            out, "is a folder (of shard parts?): name an HDF5 file, or give --shard I/N"
        )
    target = tuple(int(v) for v in target_shape)
    if len(target) != 3 or min(target) < 1:
        raise DataError(
            "--target-shape", f"expected three positive sizes D H W, got {target_shape}"
        )
    if hu_source not in HU_SOURCES:
        raise UserError("--hu-source", f"{hu_source!r} is not one of {', '.join(HU_SOURCES)}")
    if hu_source == "metadata" and not metadata_paths:
        raise UserError("--hu-source", "metadata needs the metadata CSV (--metadata-path)")
    files = find_volumes(ct_data_path)
    if isinstance(ct_data_path, (str, Path)):
        where = str(ct_data_path)
    else:
        where = ", ".join(map(str, ct_data_path))
    if not files:
        raise DataError(where, "no NIfTI files (*.nii.gz, *.nii) found")
    metadata = read_metadata(metadata_paths) if metadata_paths else {}
    names = [volume_name(p) for p in files]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(where, f"volume names occur more than once: {', '.join(dupes[:5])}")
    settings = store_settings(target, slide_b2u)
    if shard is not None:
        out = shard_output(out, shard, STORE_KIND, settings)
        files = [p for p in files if shard.owns(volume_name(p))]
        print(f"shard {shard}: {len(files)} of the {len(names)} volumes", file=sys.stderr)
        names = [volume_name(p) for p in files]
    result = PreprocessResult(output=out)
    if metadata_paths and names and not any(n in metadata for n in names):
        raise DataError(
            metadata_paths[0], f"none of the {len(files)} volumes is listed in the metadata CSV(s)"
        )
    if hu_source == "metadata":
        # Every volume is rescaled from its row: a row that cannot say how stops the job now.
        for name in names:
            meta = metadata.get(name)
            why = meta.why(RESCALE_COLUMNS) if meta is not None else None
            if why:
                raise DataError(
                    meta.source,
                    f"{name}: {why} (--hu-source metadata rescales every volume with its row's "
                    "RescaleSlope and RescaleIntercept)",
                )
    for name in names:
        if metadata_paths and name not in metadata:
            result.failed[name] = "not in the metadata CSV (slope/intercept and spacing unknown)"
            print(f"skipped {name}: not in the metadata CSV", file=sys.stderr)
        elif why := unusable_meta(metadata.get(name), hu_source):
            result.failed[name] = f"{why} in {metadata[name].source}"
            print(f"skipped {name}: {result.failed[name]}", file=sys.stderr)
    # Metadata names are only matched against the names of files found under ct_data_path,
    # never used as paths: a name like ../x.nii.gz matches nothing and is named here.
    without_file = sorted(set(metadata) - set(names))
    name_left_out("note: ", without_file, f"metadata rows have no volume under {where}")

    with VolumeStoreWriter(out, STORE_KIND, settings, compression=compression) as store:
        done = store.done
        result.skipped_existing = len(done & set(names))
        todo = [
            p for p in files if volume_name(p) not in done and volume_name(p) not in result.failed
        ]
        if not todo and not store.staged:
            if shard is not None and not out.exists():
                store.finish()  # a shard without volumes: an empty part, so none is missing
            return result  # nothing new: the output stays as it is
        jobs = [(p, metadata.get(volume_name(p)), target, slide_b2u, hu_source) for p in todo]
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
            reading = hu_record(info)
            result.hu_sources[reading.source] += 1
            if log_volumes:
                tqdm.write(f"hu {name}: {reading.describe()}", file=sys.stderr)
            if reading.evidence.score < HU_MIN_SCORE:
                result.weak.append(name)
                tqdm.write(
                    f"warning: {name}: read as HU from {SOURCE_NAMES[reading.source]}, but "
                    f"{reading.evidence} (not a body CT in HU?)",
                    file=sys.stderr,
                )
        bar.close()
        if store.done:
            store.finish()
    return result


def open_store(path: Path) -> VolumeStore:
    """ctclip's volume store at ``path``: an HDF5 file of ctclip-preprocess, or a folder of the
    part files its shards wrote (read as one, see :mod:`medcore.volumes.store`)."""
    path = Path(path)
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        hint = (
            f" (an unfinished {partial.name} exists: rerun ctclip-preprocess)"
            if partial.exists()
            else ""
        )
        raise DataError(path, "HDF5 file not found" + hint)
    store = VolumeStore(path)
    if not store.is_store or store.attrs.get("kind") != STORE_KIND:
        raise DataError(path, "not a ctclip volume file (write it with ctclip-preprocess)")
    return store


def read_volume_names(path: Path) -> set[str]:
    """Names of the complete volumes in a ctclip store (a file or a folder of parts)."""
    return set(open_store(path).names)


def volume_shape(path: Path) -> tuple[int, int, int]:
    shape = open_store(path).attrs.get("target_shape")
    if shape is None or len(shape) != 3:
        raise DataError(path, "has no target_shape attribute (write it with ctclip-preprocess)")
    return tuple(int(v) for v in shape)


def inputs(args: Any) -> tuple[list[Path], list[Path]]:
    """(volume folders, metadata CSVs) of ctclip-preprocess: ``--ct-data-path`` and
    ``--metadata-path``, or what ``--data-dir`` holds (the CT-RATE download: the train and
    valid volume folders present, each with its metadata table, which must exist)."""
    if args.data_dir is None:
        if args.ct_data_path is None:
            raise UserError("--ct-data-path", "required (or --data-dir with a CT-RATE copy)")
        return [args.ct_data_path], list(args.metadata_path)
    for flag, value in (
        ("--ct-data-path", args.ct_data_path),
        ("--metadata-path", args.metadata_path),
    ):
        if value:
            raise UserError(flag, "given together with --data-dir: choose one")
    ctrate = find_ctrate(args.data_dir)
    folders = ctrate.volume_folders()
    if not folders:
        where = "train/ or valid/ under it" if ctrate.download else "a ct_volumes/ folder in it"
        raise DataError(ctrate.tables, f"no CT volumes: expected {where}")
    if not ctrate.download:
        tables = [ctrate.table("metadata", s) for s in ("train", "valid")]
        tables = [t for t in tables if t.is_file()]
        if not tables:
            print(
                f"note: {ctrate.tables}: no metadata CSV; spacing and HU from the NIfTI files",
                file=sys.stderr,
            )
        return list(folders.values()), tables
    tables = []
    for split in folders:
        table = ctrate.table("metadata", split)
        if not table.is_file():
            raise DataError(
                table, f"file not found (the spacing and rescale of the {split} volumes)"
            )
        tables.append(table)
    return list(folders.values()), tables


def shard_of_args(args: Any) -> Shard | None:
    """``--shard I/N``, else the SLURM job array task's shard (named on stderr), else None."""
    if args.shard is not None:
        return Shard.parse(args.shard)
    shard = Shard.from_slurm()
    if shard is not None:
        print(f"note: shard {shard} from the SLURM job array (--shard to choose)", file=sys.stderr)
    return shard


def main(args: Any) -> int:
    """ctclip-preprocess: preprocess, then a line of counts and one of the HU readings used."""
    folders, tables = inputs(args)
    res = run_preprocess(
        folders, args.ct_out_path, tables, tuple(args.target_shape), args.slide_b2u,
        args.num_workers, args.compression, hu_source=args.hu_source, log_volumes=True,
        shard=shard_of_args(args),
    )  # fmt: skip
    print(res.counts())
    if res.written:
        print(res.hu_counts())
    return 0
