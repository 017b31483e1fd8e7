"""NIfTI CT volumes (``.nii`` / ``.nii.gz``, written by nibabel, dcm2niix or the CT-RATE release)
read into the canonical orientation (see :mod:`medcore.volumes.reader` for the orientation and
the rules both readers share).

Reading runs at the speed of the gzip inflate: the file is inflated with ISA-L (``isal``, a
dependency of ``medcore[volumes]``; zlib where it is missing) straight into one buffer of the
size the header announces, the voxels stay in their stored type as a view of that buffer
(:class:`~medcore.volumes.geometry.StoredVolume`), and the HU step makes float32 from them, in
slabs if the caller wants, never float64 of the whole volume. nibabel parses the header
(NIfTI-1 and NIfTI-2, either byte order, with extensions); the values equal nibabel's
``get_fdata`` bit for bit.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np

from medcore.errors import DataError
from medcore.volumes.geometry import (
    MAX_VOXELS,
    StoredVolume,
    Volume,
    check_affine,
    first_line,
)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 18  # compressed bytes per inflate call: the output stays in the CPU cache
_HEADER_SIZES = {348: "nifti1", 540: "nifti2"}


def _inflater():
    """(a gzip decompressobj, the errors it raises for corrupt data) of the fastest inflate."""
    try:
        from isal import isal_zlib
    except ImportError:  # medcore without the volumes extra: the standard library's zlib
        return zlib.decompressobj(wbits=31), (zlib.error,)
    return isal_zlib.decompressobj(wbits=31), (isal_zlib.error, zlib.error)


class _Reader:
    """The bytes of a file in order, inflated if it is gzip, into buffers the caller sizes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = open(path, "rb")  # noqa: SIM115 (closed by close())
        start = self.fh.read(2)
        self.fh.seek(0)
        self.gzip = start == _GZIP_MAGIC
        self.pending = b""  # inflated bytes not handed out yet
        self.inflate, self.errors = _inflater() if self.gzip else (None, ())

    def _more(self) -> bytes:
        """The next piece of file content ('' at its end)."""
        while True:
            if self.inflate.eof:
                # A file of several gzip members (pigz, bgzip, concatenation): go on past this one.
                rest = self.inflate.unused_data
                if not rest and not (rest := self.fh.read(_CHUNK)):
                    return b""
                self.inflate, _ = _inflater()
                piece = self.inflate.decompress(rest)
            else:
                data = self.fh.read(_CHUNK)
                if not data:
                    raise EOFError("the gzip stream ends before its end marker")
                piece = self.inflate.decompress(data)
            if piece:
                return piece

    def read_into(self, out: memoryview) -> int:
        """Fill ``out`` from the file; the bytes written (fewer only at the end of the file)."""
        filled = 0
        try:
            if not self.gzip:
                while filled < len(out) and (n := self.fh.readinto(out[filled:])):
                    filled += n
                return filled
            while filled < len(out):
                piece = self.pending or self._more()
                self.pending = b""
                if not piece:
                    break
                n = min(len(piece), len(out) - filled)
                out[filled : filled + n] = piece[:n]
                self.pending = piece[n:]
                filled += n
        except (EOFError, OSError, ValueError, *self.errors) as exc:
            what = "gzip data" if self.gzip else "file"
            raise DataError(self.path, f"truncated or corrupt {what} ({first_line(exc)})") from None
        return filled

    def close(self) -> None:
        self.fh.close()


def _header(path: Path, reader: _Reader) -> tuple[object, bytes]:
    """(nibabel header, the bytes read so far) of the file ``reader`` reads."""
    import nibabel as nib

    head = bytearray(540)
    got = reader.read_into(memoryview(head))
    size = int.from_bytes(head[:4], "little")
    if size not in _HEADER_SIZES:
        size = int.from_bytes(head[:4], "big")
    if got < 348 or size not in _HEADER_SIZES or got < size:
        raise DataError(path, "not a NIfTI-1/NIfTI-2 file (no valid header; truncated or corrupt)")
    klass = nib.Nifti1Header if size == 348 else nib.Nifti2Header
    # The voxels start at vox_offset; extensions sit between the header and there.
    try:
        offset = int(klass.from_fileobj(io.BytesIO(bytes(head[:size])), check=False)["vox_offset"])
    except Exception as exc:  # nibabel raises several types for a mangled header
        raise DataError(path, f"not a readable NIfTI header ({first_line(exc)})") from None
    head = head[:got]
    if offset > got:
        extra = bytearray(offset - got)
        head += extra[: reader.read_into(memoryview(extra))]
    try:
        header = klass.from_fileobj(io.BytesIO(bytes(head)), check=True)
    except Exception as exc:
        raise DataError(
            path, f"not a readable NIfTI file (truncated or corrupt: {first_line(exc)})"
        ) from None
    return header, bytes(head)


def read_nifti_stored(path: str | Path) -> StoredVolume:
    """A 3-D NIfTI-1/NIfTI-2 file as a canonical :class:`StoredVolume` (stored values, a view).

    A 4-D file with one volume is taken as 3-D; a real 4-D file is refused. A truncated or
    corrupt file (gzip stream, header or voxels) is a one-line :class:`DataError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes)")
    reader = _Reader(path)
    try:
        header, head = _header(path, reader)
        shape = tuple(int(v) for v in header.get_data_shape())
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise DataError(
                path, f"expected a 3D volume, found shape {shape} (one volume per file)"
            )
        if int(np.prod(shape, dtype=np.float64)) > MAX_VOXELS:
            raise DataError(
                path, "header claims {}x{}x{} voxels; refusing to decode".format(*shape)
            )
        dtype = header.get_data_dtype()
        if dtype.kind not in "iuf":
            raise DataError(path, f"voxel type {dtype} is not a CT's (integers or floats)")
        offset = int(header.get_data_offset())
        nbytes = int(np.prod(shape)) * dtype.itemsize
        buffer = np.empty(offset + nbytes, dtype=np.uint8)
        skip = min(len(head), offset)
        buffer[:skip] = np.frombuffer(head[:skip], dtype=np.uint8)
        start = skip
        if len(head) > offset:  # a short header block: voxels already read
            early = np.frombuffer(head[offset:], dtype=np.uint8)[:nbytes]
            buffer[offset : offset + len(early)] = early
            start = offset + len(early)
        got = start + reader.read_into(memoryview(buffer)[start:])
    finally:
        reader.close()
    if got < len(buffer):
        raise DataError(
            path,
            f"truncated or corrupt: {max(got - offset, 0)} of the {nbytes} voxel bytes its "
            "header announces",
        )
    affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    check_affine(path, affine)
    data = buffer[offset:].view(dtype).reshape(shape, order="F")
    slope, inter = header.get_slope_inter()
    slope = 1.0 if slope is None else float(slope)
    inter = 0.0 if inter is None else float(inter)
    if not np.isfinite([slope, inter]).all():
        raise DataError(path, f"header scaling scl_slope={slope}, scl_inter={inter} is not finite")
    return StoredVolume.canonical(
        data,
        affine,
        slope,
        inter,
        {"source": "nifti", "path": str(path), "source_shape": shape},
    )


def check_finite(path: str | Path, hu: np.ndarray, stored: StoredVolume) -> None:
    """A DataError if ``hu`` (of ``stored``) holds NaN or infinite values.

    Integer voxels with finite scaling cannot: only float data needs the scan.
    """
    if stored.stored.dtype.kind == "f" and not np.isfinite(hu).all():
        raise DataError(path, "contains NaN or infinite values")


def read_nifti(path: str | Path, rescale: tuple[float, float] | None = None) -> Volume:
    """A 3-D NIfTI-1/NIfTI-2 file as a canonical float32 :class:`Volume` in HU.

    The header's ``scl_slope``/``scl_inter`` are applied; when the header does not scale,
    ``rescale`` (slope, intercept), e.g. from a metadata table, is applied instead.
    """
    stored = read_nifti_stored(path)
    if stored.scaled:
        applied, source, extra = (stored.slope, stored.inter), "nifti header", None
    elif rescale is not None:
        applied = (float(rescale[0]), float(rescale[1]))
        source, extra = "given", applied
    else:
        applied, source, extra = (1.0, 0.0), "none", None
    if not np.isfinite(applied).all():
        raise DataError(path, f"rescale {applied} is not finite")
    volume = stored.to_volume(extra)
    check_finite(path, volume.voxels, stored)
    volume.meta.update(rescale=applied, rescale_source=source)
    return volume
