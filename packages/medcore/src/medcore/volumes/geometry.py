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
