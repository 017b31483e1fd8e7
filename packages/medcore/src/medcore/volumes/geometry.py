"""The canonical CT volume: :class:`Volume`, the reorientation into it, and the geometry checks
that both readers (DICOM in :mod:`medcore.volumes.dicom`, NIfTI in :mod:`medcore.volumes.reader`) share.

The orientation itself is described in :mod:`medcore.volumes.reader`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcore.errors import DataError

CANONICAL_AXCODES = ("S", "P", "L")
# Far beyond any real CT (512 x 512 x 4000 is ~1e9 voxels): a header claiming more is refused
# before anything is decoded (decompression-bomb protection).
MAX_VOXELS = 2**31


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

    @classmethod
    def canonical(cls, data: np.ndarray, affine: np.ndarray, meta: dict[str, Any]) -> Volume:
        """The volume of ``data`` (indices mapped to RAS+ mm by ``affine``), reoriented into
        the canonical orientation as one contiguous copy; what each reader tells is ``meta``."""
        voxels, canon_affine, codes = to_canonical(data, affine)
        return cls(voxels, canon_affine, voxel_spacing(canon_affine), codes, meta)


# Every integer of at most this magnitude is exact in float32 (24-bit significand).
_FLOAT32_EXACT = 2**24


@dataclass
class StoredVolume:
    """A volume's stored values in the canonical orientation, before the HU step.

    ``stored`` is the file's array in its stored type (int16, uint8, float32 ...), reoriented by
    views only (no copy; it may be strided and read-only). HU are ``stored * slope + inter``
    (the header's scaling; (1, 0) when it has none), made float32 by :meth:`hu`, slab by slab if
    the caller wants, so no full float copy of the volume exists until one is asked for.
    """

    stored: np.ndarray  # [z, y, x], stored type, canonical orientation (a view)
    slope: float
    inter: float
    affine: np.ndarray  # 4 x 4: canonical index (z, y, x, 1) -> RAS+ mm
    spacing: tuple[float, float, float]
    source_axcodes: tuple[str, str, str]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def canonical(
        cls,
        data: np.ndarray,
        affine: np.ndarray,
        slope: float,
        inter: float,
        meta: dict[str, Any],
    ) -> StoredVolume:
        """``data`` (indices mapped to RAS+ mm by ``affine``) reoriented as a view."""
        view, canon_affine, codes = to_canonical(data, affine, copy=False)
        return cls(
            view, float(slope), float(inter), canon_affine, voxel_spacing(canon_affine), codes, meta
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.stored.shape)

    @property
    def scaled(self) -> bool:
        return (self.slope, self.inter) != (1.0, 0.0)

    def hu(
        self,
        z: slice = slice(None),
        rescale: tuple[float, float] | None = None,
        out: np.ndarray | None = None,
        index: tuple[slice, ...] = (),
    ) -> np.ndarray:
        """float32 HU of the canonical slices ``z`` (``index``: more slicing after it).

        Values equal nibabel's ``get_fdata(dtype=np.float32)`` bit for bit: the header's scaling
        is one rounding of ``stored * slope + inter`` computed in float64, done in float32 where
        that is exact (integers of at most 16 bits, integer scaling). ``rescale`` (a, b) is then
        applied in float32 (``hu * a + b``), as a reader applies a metadata table's rescale.
        """
        block = self.stored[(z, *index)]
        if out is None:
            out = np.empty(block.shape, dtype=np.float32)
        to_float32_hu(block, self.slope, self.inter, out)
        if rescale is not None:
            out *= np.float32(rescale[0])
            out += np.float32(rescale[1])
        return out

    def to_volume(self, rescale: tuple[float, float] | None = None) -> Volume:
        """The float32 HU :class:`Volume` (one contiguous copy)."""
        return Volume(
            self.hu(rescale=rescale), self.affine, self.spacing, self.source_axcodes, self.meta
        )


def to_float32_hu(stored: np.ndarray, slope: float, inter: float, out: np.ndarray) -> np.ndarray:
    """``out[...] = float32(stored * slope + inter)`` rounded once, as nibabel's reading does.

    Float32 arithmetic where it is exact (integers of at most 16 bits with integer scaling, the
    CT case: slope 1, intercept -1024); otherwise float64 for the product and sum, then one
    rounding, as nibabel computes it (``out``-sized temporaries: pass a slab to bound them).
    """
    if (slope, inter) == (1.0, 0.0):
        np.copyto(out, stored, casting="unsafe")
        return out
    small_int = stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2
    if small_int and float(slope).is_integer() and float(inter).is_integer():
        info = np.iinfo(stored.dtype)
        bound = max(abs(info.min), abs(info.max)) * abs(slope) + abs(inter)
        if bound < _FLOAT32_EXACT:
            np.copyto(out, stored, casting="unsafe")
            if slope != 1.0:
                out *= np.float32(slope)
            if inter != 0.0:
                out += np.float32(inter)
            return out
    wide = stored.astype(np.float64)
    if slope != 1.0:
        wide *= slope
    if inter != 0.0:
        wide += inter
    np.copyto(out, wide, casting="same_kind")
    return out


def first_line(exc: BaseException, limit: int = 120) -> str:
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


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
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
