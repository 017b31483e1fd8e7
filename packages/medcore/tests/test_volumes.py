"""medcore.volumes.reader on files third parties wrote: pydicom's and nibabel's test data.

Series are built from pydicom's CT_small.dcm / MR_small*.dcm (copies with new positions,
orientations and UIDs). The geometry tests evaluate one world-space phantom on every
acquisition's pixel grid; the expected canonical array is written down from the definition of
the canonical orientation (slices inferior -> superior, rows anterior -> posterior, columns
right -> left), not computed with the code under test.
"""

from __future__ import annotations

import copy
import gzip
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path as NIB_DATA
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from medcore.errors import DataError
from medcore.volumes.dicom import read_dicom_series, read_dicom_stored
from medcore.volumes.nifti import read_nifti, read_nifti_stored
from medcore.volumes.reader import read_volume

DICOM_DATA = Path(pydicom.data.__file__).parent / "test_files"  # never downloads, unlike get_*
NIB = Path(NIB_DATA)

# The phantom lives on a world grid (LPS mm): L = X0 + a*SX, P = Y0 + b*SY, S = Z0 + c*SZ.
W, H, D = 6, 5, 4
SX, SY, SZ = 0.7, 0.9, 2.5
X0, Y0, Z0 = -10.0, 20.0, -40.0


def phantom(a, b, c):
    """Distinct value for every grid point, exact in int16."""
    return a + 20 * b + 400 * c


def expected_canonical() -> np.ndarray:
    # Canonical [z, y, x]: index c grows superior, b posterior, a toward the patient's left;
    # on the LPS grid those are exactly +c, +b, +a.
    c, b, a = np.meshgrid(np.arange(D), np.arange(H), np.arange(W), indexing="ij")
    return phantom(a, b, c).astype(np.float32)


def grid_values(points_lps: np.ndarray) -> np.ndarray:
    """Phantom values at LPS points (..., 3) that lie on the grid."""
    idx = (points_lps - [X0, Y0, Z0]) / [SX, SY, SZ]
    rounded = np.round(idx)
    assert np.abs(idx - rounded).max() < 1e-6, "points off the grid"
    a, b, c = np.moveaxis(rounded.astype(int), -1, 0)
    assert a.min() >= 0 and a.max() < W and b.min() >= 0 and b.max() < H
    assert c.min() >= 0 and c.max() < D
    return phantom(a, b, c)


def base(name: str = "CT_small.dcm") -> pydicom.Dataset:
    return pydicom.dcmread(DICOM_DATA / name)


# Patient positions: (row direction, column direction) cosines in LPS.
POSITIONS = {
    "HFS": ((1, 0, 0), (0, 1, 0)),  # supine, head first
    "HFP": ((-1, 0, 0), (0, -1, 0)),  # prone
    "FFS": ((-1, 0, 0), (0, 1, 0)),  # supine, feet first
    "FFP": ((1, 0, 0), (0, -1, 0)),  # prone, feet first
}


def _plane_origin(row_dir: np.ndarray, col_dir: np.ndarray) -> np.ndarray:
    """The grid corner where a slice with these directions starts (its first pixel)."""
    lo = np.array([X0, Y0])
    hi = np.array([X0 + (W - 1) * SX, Y0 + (H - 1) * SY])
    xy = np.where((row_dir[:2] + col_dir[:2]) < 0, hi, lo)
    return np.array([xy[0], xy[1], 0.0])


def slice_grid(position: str):
    """(row dir, col dir, rows, cols, pixel spacing (row, col), in-plane origin) of a position."""
    r, c = (np.asarray(v, dtype=float) for v in POSITIONS[position])
    cols, col_mm = (W, SX) if abs(r[0]) else (H, SY)
    rows, row_mm = (H, SY) if abs(c[1]) else (W, SX)
    return r, c, rows, cols, (row_mm, col_mm), _plane_origin(r, c)


def write_series(
    folder: Path,
    position: str = "HFS",
    *,
    descending: bool = False,
    skip: tuple[int, ...] = (),
    duplicate: bool = False,
    series_uid: str | None = None,
    image_type: list[str] | None = None,
    seed: int = 0,
) -> list[Path]:
    """The phantom as a CT series copied from CT_small.dcm, files in shuffled order."""
    r, c, rows, cols, (row_mm, col_mm), origin = slice_grid(position)
    j, i = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    order = list(range(D))[::-1] if descending else list(range(D))
    order = [k for k in order if k not in skip] + ([order[1]] if duplicate else [])
    uid = series_uid or generate_uid()
    names = np.random.default_rng(seed).permutation(len(order))
    folder.mkdir(parents=True, exist_ok=True)
    src = base()
    paths = []
    for n, k in enumerate(order):
        ipp = origin + np.array([0.0, 0.0, Z0 + k * SZ])
        pts = ipp + i[..., None] * col_mm * r + j[..., None] * row_mm * c
        hu = grid_values(pts)
        ds = copy.deepcopy(src)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientPosition = position
        ds.InstanceNumber = n + 1  # acquisition order, not anatomy
        ds.ImagePositionPatient = [float(v) for v in ipp]
        ds.ImageOrientationPatient = [float(v) for v in (*r, *c)]
        ds.PixelSpacing = [row_mm, col_mm]
        ds.Rows, ds.Columns = rows, cols
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        if image_type is not None:
            ds.ImageType = image_type
        if "DataSetTrailingPadding" in ds:
            del ds.DataSetTrailingPadding  # the pixel data ends the file (cut in a test)
        path = folder / f"IM{names[n]:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def write_nifti(path: Path, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> Path:
    """The phantom as a NIfTI file whose axis i is LPS axis perm[i], reversed where flipped."""
    sizes, mm, start = [W, H, D], [SX, SY, SZ], [X0, Y0, Z0]
    shape = tuple(sizes[p] for p in perm)
    lps = np.zeros((4, 4))
    lps[3, 3] = 1
    for axis, p in enumerate(perm):
        lps[p, axis] = -mm[p] if flips[axis] else mm[p]
        lps[p, 3] = start[p] + ((sizes[p] - 1) * mm[p] if flips[axis] else 0.0)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    pts = idx @ lps[:3, :3].T + lps[:3, 3]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # NIfTI world is RAS
    nib.save(nib.Nifti1Image(grid_values(pts).astype(np.int16), ras), path)
    return path


# -- geometry: every position and both formats give the same array ----------------------------


@pytest.mark.parametrize("position", sorted(POSITIONS))
@pytest.mark.parametrize("descending", [False, True])
def test_dicom_positions_give_the_canonical_array(tmp_path: Path, position, descending) -> None:
    write_series(tmp_path / "s", position, descending=descending)
    vol = read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(vol.voxels, expected_canonical())
    assert vol.voxels.dtype == np.float32
    assert vol.spacing == pytest.approx((SZ, SY, SX))
    assert vol.axcodes == ("S", "P", "L")
    assert vol.meta["patient_position"] == position and vol.meta["rescale"] == (1.0, -1024.0)
    # The affine maps canonical indices to RAS mm: voxel [0, 0, 0] is the inferior, anterior,
    # right corner of the grid.
    corner = vol.affine @ [0, 0, 0, 1]
    np.testing.assert_allclose(corner[:3], [-X0, -Y0, Z0])  # LPS (X0, Y0, Z0) in RAS


@pytest.mark.parametrize(
    "perm, flips",
    [
        ((0, 1, 2), (True, True, False)),  # RAS storage (nibabel, dcm2niix)
        ((0, 1, 2), (False, False, False)),  # LPS storage (ITK)
        ((2, 0, 1), (False, True, True)),  # axes permuted and reversed
    ],
)
def test_nifti_of_the_same_geometry_gives_the_identical_array(tmp_path: Path, perm, flips) -> None:
    vol = read_nifti(write_nifti(tmp_path / "a.nii.gz", perm, flips))
    np.testing.assert_array_equal(vol.voxels, expected_canonical())
    write_series(tmp_path / "prone", "HFP")
    np.testing.assert_array_equal(vol.voxels, read_dicom_series(tmp_path / "prone").voxels)
    np.testing.assert_allclose(vol.affine, read_dicom_series(tmp_path / "prone").affine)


def test_nibabel_test_images_against_nibabel_canonical() -> None:
    one = read_nifti(NIB / "anatomical.nii")
    ras = np.asarray(nib.as_closest_canonical(nib.load(NIB / "anatomical.nii")).get_fdata())
    # closest canonical RAS (x, y, z) -> (S, P, L): slices first, y and x reversed
    np.testing.assert_array_equal(one.voxels, ras.transpose(2, 1, 0)[:, ::-1, ::-1])
    img = nib.load(NIB / "anatomical.nii")
    assert one.spacing == pytest.approx(tuple(img.header.get_zooms()[::-1]))


def test_nifti2_equals_nifti1(tmp_path: Path) -> None:
    img = nib.load(NIB / "anatomical.nii")
    nib.save(nib.Nifti2Image(np.asarray(img.dataobj), img.affine), tmp_path / "a2.nii")
    a, b = read_nifti(NIB / "anatomical.nii"), read_nifti(tmp_path / "a2.nii")
    np.testing.assert_array_equal(a.voxels, b.voxels)
    np.testing.assert_array_equal(a.affine, b.affine)


def test_nifti_rescale_from_metadata_only_without_header_scaling(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "a.nii", (0, 1, 2), (True, True, False))
    vol = read_nifti(path, rescale=(2.0, -1000.0))
    np.testing.assert_array_equal(vol.voxels, expected_canonical() * 2 - 1000)
    img = nib.load(path)
    img.header.set_slope_inter(1.0, -24.0)
    nib.save(img, tmp_path / "scaled.nii")
    scaled = read_nifti(tmp_path / "scaled.nii", rescale=(2.0, -1000.0))
    np.testing.assert_array_equal(scaled.voxels, expected_canonical() - 24)
    assert scaled.meta["rescale_source"] == "nifti header"


# -- transfer syntaxes: pydicom's files decode to the same voxels ------------------------------


def _series_from(name: str, folder: Path, uid: str, n: int = 3) -> None:
    """``n`` axial CT slices 3 mm apart, copies of one MR_small file (pixels untouched)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        ds = base(name)
        ds.Modality, ds.SeriesInstanceUID, ds.SOPInstanceUID = "CT", uid, generate_uid()
        ds.ImagePositionPatient = [0.0, 0.0, 3.0 * k]
        ds.save_as(folder / f"{k}.dcm")


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_RLE.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_expb.dcm",
    ],
)
def test_compressed_syntaxes_decode_to_the_uncompressed_voxels(tmp_path: Path, name) -> None:
    uid = generate_uid()
    _series_from("MR_small.dcm", tmp_path / "ref", uid)
    _series_from(name, tmp_path / "enc", uid)
    ref = read_dicom_series(tmp_path / "ref")
    enc = read_dicom_series(tmp_path / "enc")
    assert enc.meta["transfer_syntax"] == str(base(name).file_meta.TransferSyntaxUID)
    np.testing.assert_array_equal(enc.voxels, ref.voxels)
    assert np.ptp(ref.voxels) > 0


def test_deflate_and_jpeg_lossless_decoders(tmp_path: Path) -> None:
    ds = base("MR_small.dcm")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "dfl.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(
        pydicom.dcmread(tmp_path / "dfl.dcm").pixel_array, base("MR_small.dcm").pixel_array
    )
    # JPEG Lossless process 14 SV1 (GDCM) and RLE (another encoder) of the same image agree.
    jpeg = base("SC_rgb_jpeg_gdcm.dcm")
    assert "Process 14" in jpeg.file_meta.TransferSyntaxUID.name
    np.testing.assert_array_equal(jpeg.pixel_array, base("SC_rgb_rle.dcm").pixel_array)


# -- enhanced multi-frame CT --------------------------------------------------------------------


def _item(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_enhanced_multiframe_ct_equals_the_classic_series(tmp_path: Path) -> None:
    files = write_series(tmp_path / "classic", "FFS")
    slices = [pydicom.dcmread(p) for p in files]
    rng = np.random.default_rng(1)
    slices = [slices[i] for i in rng.permutation(len(slices))]  # frames in no anatomical order
    first = slices[0]
    ds = copy.deepcopy(first)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, meta.MediaStorageSOPInstanceUID
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        del ds[key]
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.NumberOfFrames = len(slices)
    ds.SharedFunctionalGroupsSequence = Sequence(
        [
            _item(
                PlaneOrientationSequence=Sequence(
                    [_item(ImageOrientationPatient=first.ImageOrientationPatient)]
                ),
                PixelMeasuresSequence=Sequence(
                    [_item(PixelSpacing=first.PixelSpacing, SliceThickness=SZ)]
                ),
                PixelValueTransformationSequence=Sequence(
                    [_item(RescaleSlope=1, RescaleIntercept=-1024, RescaleType="HU")]
                ),
            )
        ]
    )
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [
            _item(
                PlanePositionSequence=Sequence([_item(ImagePositionPatient=s.ImagePositionPatient)])
            )
            for s in slices
        ]
    )
    ds.PixelData = b"".join(s.PixelData for s in slices)
    (tmp_path / "enhanced").mkdir()
    ds.save_as(tmp_path / "enhanced" / "frames.dcm", enforce_file_format=True)
    vol = read_dicom_series(tmp_path / "enhanced")
    assert vol.meta["enhanced"]
    np.testing.assert_array_equal(vol.voxels, expected_canonical())


# -- series choice ------------------------------------------------------------------------------


def test_axial_ct_is_chosen_and_every_other_series_rejected_with_its_reason(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "study"
    write_series(folder / "axial", "HFS")
    write_series(folder / "scout", "HFS", image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    coronal = folder / "coronal"
    coronal.mkdir()
    uid = generate_uid()
    for k in range(3):
        ds = base()
        ds.SeriesInstanceUID, ds.SeriesDescription = uid, "COR 3mm"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [0.0, 3.0 * k, 0.0]
        ds.save_as(coronal / f"{k}.dcm")
    _series_from("MR_small.dcm", folder / "mr", generate_uid())
    for p in (folder / "mr").iterdir():
        ds = pydicom.dcmread(p)
        ds.Modality = "MR"
        ds.save_as(p)
    sr = base()
    for key in [k for k in sr.dir() if k not in ("PatientID", "StudyInstanceUID")]:
        delattr(sr, key)
    sr.Modality, sr.SeriesInstanceUID, sr.SOPInstanceUID = "SR", generate_uid(), generate_uid()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR
    sr.save_as(folder / "dose.dcm")
    smaller = folder / "second_axial"
    write_series(smaller, "HFS", skip=(0,))

    vol = read_dicom_series(folder)
    np.testing.assert_array_equal(vol.voxels, expected_canonical())
    reasons = sorted(vol.meta["rejected_series"].values())
    assert len(reasons) == 5
    for expected in (
        "a localizer (ImageType LOCALIZER)",
        "coronal, not axial",
        "modality MR, not CT",
        "not an image",
        "another axial CT series with more slices was used (3 < 4)",
    ):
        assert any(r.startswith(expected) for r in reasons), (expected, reasons)
    assert any("COR 3mm" in k for k in vol.meta["rejected_series"])


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"skip": (1,)}, "gap of 5.00 mm between slices at -40.00 and -35.00 mm"),
        ({"duplicate": True}, "duplicate slice position"),
    ],
)
def test_gaps_and_duplicate_positions_are_refused(tmp_path: Path, kwargs, reason) -> None:
    write_series(tmp_path / "s", **kwargs)
    with pytest.raises(DataError, match=reason):
        read_dicom_series(tmp_path / "s")


def test_mixed_orientations_are_refused(tmp_path: Path) -> None:
    uid = generate_uid()
    write_series(tmp_path / "s" / "a", "HFS", series_uid=uid)
    write_series(tmp_path / "s" / "b", "HFP", series_uid=uid)
    with pytest.raises(DataError, match="mixed orientations"):
        read_dicom_series(tmp_path / "s")


# -- bad input: one line naming the file --------------------------------------------------------


def test_bad_dicom_is_a_one_line_error_naming_the_file(tmp_path: Path) -> None:
    files = write_series(tmp_path / "s")
    files[0].write_bytes(files[0].read_bytes()[:-30])  # pixel data cut short
    with pytest.raises(DataError) as err:
        read_dicom_series(tmp_path / "s")
    assert err.value.what == str(files[0]) and "\n" not in err.value.why
    files[1].write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="corrupt or not a DICOM file"):
        read_dicom_series(tmp_path / "s")
    _series_from("MR_small.dcm", tmp_path / "mr", generate_uid())
    for p in (tmp_path / "mr").iterdir():
        ds = pydicom.dcmread(p)
        ds.Modality = "MR"
        ds.save_as(p)
    with pytest.raises(DataError, match=r"no axial CT image series .*modality MR, not CT"):
        read_dicom_series(tmp_path / "mr")


def test_bad_nifti_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"expected a 3D volume, found shape \(128, 96, 24, 2\)"):
        read_nifti(NIB / "example4d.nii.gz")
    singular = np.eye(4)
    singular[2, 2] = 0.0
    header = nib.Nifti1Header()
    header.set_sform(singular, code=1)  # nibabel's own writer refuses such a qform
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), None, header), tmp_path / "flat.nii")
    with pytest.raises(DataError, match="singular affine"):
        read_nifti(tmp_path / "flat.nii")
    data = (NIB / "anatomical.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_nifti(tmp_path / "cut.nii")
    with pytest.raises(DataError, match="neither a DICOM folder nor a NIfTI file"):
        read_volume(tmp_path / "x.png")


# -- the stored-type reader against nibabel and pydicom ----------------------------------------


def _nibabel_canonical(path: Path) -> np.ndarray:
    """nibabel's float32 reading of ``path`` in the canonical orientation (an independent path:
    nibabel's own inflate, scaling and reorientation)."""
    img = nib.as_closest_canonical(nib.load(path))
    return np.asarray(img.get_fdata(dtype=np.float32)).transpose(2, 1, 0)[:, ::-1, ::-1]


STORED_TYPES = [
    (np.int16, None),
    (np.int16, (1.0, -1024.0)),
    (np.int16, (0.37, -1023.5)),  # non-integer scaling: float64 then one rounding, as nibabel
    (np.uint8, None),
    (np.uint8, (8.0, -1024.0)),
    (np.float32, None),
    (np.float32, (2.5, 0.25)),
    (np.int32, (1.0, -1024.0)),
]


@pytest.mark.parametrize("dtype, scaling", STORED_TYPES)
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_stored_reader_equals_nibabel_get_fdata(tmp_path: Path, dtype, scaling, suffix) -> None:
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    lo, hi = (info.min, info.max) if info else (-2000.0, 3000.0)
    data = rng.uniform(lo, hi, (23, 17, 9)).astype(dtype)
    affine = np.array([[0, 0, 2.5, -4], [-0.7, 0, 0, 8], [0, 0.8, 0, 3], [0, 0, 0, 1.0]])
    img = nib.Nifti1Image(data, affine)
    if scaling:
        img.header.set_slope_inter(*scaling)
    path = tmp_path / f"v{suffix}"
    nib.save(img, path)
    expected = _nibabel_canonical(path)
    vol = read_nifti(path)
    assert vol.voxels.dtype == np.float32 and vol.voxels.flags.c_contiguous
    np.testing.assert_array_equal(vol.voxels, expected)
    stored = read_nifti_stored(path)
    assert stored.stored.dtype == np.dtype(dtype)  # no float copy until the HU step
    proxy = nib.load(path).dataobj
    assert (stored.slope, stored.inter) == (proxy.slope, proxy.inter)  # float32 in the header
    assert (stored.slope, stored.inter) == pytest.approx(scaling or (1.0, 0.0))
    slabs = np.concatenate([stored.hu(slice(z, z + 4)) for z in range(0, stored.shape[0], 4)])
    np.testing.assert_array_equal(slabs, expected)


def test_gzip_multi_member_and_the_zlib_fallback_read_the_same(tmp_path: Path, monkeypatch) -> None:
    img = nib.load(NIB / "anatomical.nii")
    path = tmp_path / "a.nii.gz"
    nib.save(img, path)
    expected = read_nifti(path).voxels
    np.testing.assert_array_equal(expected, _nibabel_canonical(path))
    # pigz/bgzip-style: the same bytes as several gzip members, one after the other
    raw = (NIB / "anatomical.nii").read_bytes()
    cut = len(raw) // 3
    members = tmp_path / "m.nii.gz"
    members.write_bytes(b"".join(gzip.compress(raw[i : i + cut]) for i in range(0, len(raw), cut)))
    np.testing.assert_array_equal(read_nifti(members).voxels, expected)
    monkeypatch.setitem(sys.modules, "isal", None)  # medcore without isal: zlib
    np.testing.assert_array_equal(read_nifti(path).voxels, expected)
    np.testing.assert_array_equal(read_nifti(members).voxels, expected)


@pytest.mark.parametrize("inflate", ["isal", "zlib"])
def test_truncated_or_corrupt_gzip_is_one_line_error(tmp_path: Path, monkeypatch, inflate) -> None:
    if inflate == "zlib":
        monkeypatch.setitem(sys.modules, "isal", None)
    rng = np.random.default_rng(0)
    data = rng.normal(0, 300, (64, 64, 40)).astype(np.int16)
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), good)
    raw = good.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as err:
        read_nifti(cut)
    assert err.value.what == str(cut) and "\n" not in err.value.why
    assert err.value.why.startswith("truncated or corrupt gzip data")
    mangled = bytearray(raw)
    mangled[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
    (tmp_path / "bad.nii.gz").write_bytes(bytes(mangled))
    with pytest.raises(DataError, match="truncated or corrupt gzip data") as err:
        read_nifti(tmp_path / "bad.nii.gz")
    assert "\n" not in err.value.why
    (tmp_path / "head.nii.gz").write_bytes(gzip.compress(b"\x5c\x01\x00\x00" + bytes(100)))
    with pytest.raises(DataError, match="not a NIfTI-1/NIfTI-2 file"):
        read_nifti(tmp_path / "head.nii.gz")


@pytest.mark.parametrize(
    "rescales", [[(1, -1024)] * 4, [(0.5, -1000.25), (0.75, -1024), (1, 0), (2, -7)]]
)
def test_dicom_series_equals_pydicom_rescaled_once(tmp_path: Path, rescales) -> None:
    """Every slice: pydicom's pixel_array * RescaleSlope + RescaleIntercept in float64, rounded
    once to float32; uniform rescale keeps the stored pixel type until the HU step."""
    files = write_series(tmp_path / "s")
    by_z = sorted(files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for path, (slope, inter) in zip(by_z, rescales, strict=True):
        ds = pydicom.dcmread(path)
        ds.RescaleSlope, ds.RescaleIntercept = slope, inter
        ds.save_as(path)
    expected = np.stack(
        [
            (pydicom.dcmread(p).pixel_array * float(s) + float(i)).astype(np.float32)
            for p, (s, i) in zip(by_z, rescales, strict=True)
        ]
    )
    stored = read_dicom_stored(tmp_path / "s")
    uniform = len(set(rescales)) == 1
    assert stored.stored.dtype == (np.int16 if uniform else np.float32)
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "s").voxels, expected)
