from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctretrieval.readers import Study, find_studies, read_study
from medcore.errors import DataError
from medcore.volumes.dicom import read_dicom_series
from medcore.volumes.nifti import read_nifti


def test_series_read_back_in_position_order_with_rescale(tmp_path: Path, helpers) -> None:
    hu = helpers.ramp_volume()
    files = helpers.write_series(tmp_path / "s", hu, slope=2.0, intercept=-1024.0, seed=3)
    # The shuffled file names do not follow the slice order, instance numbers run backwards.
    assert sorted(files) != files
    vol = read_study(Study("s", tmp_path / "s", "dicom"))
    assert vol.shape == hu.shape and vol.voxels.dtype == np.float32
    # The demo's axial series (rows along +y = posterior, columns along +x = left, slices along
    # +z = superior, LPS) is already in the canonical orientation.
    np.testing.assert_allclose(vol.voxels, hu, atol=1.0)  # slope 2: stored values round to 2 HU
    assert vol.spacing == (2.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "orientation, reason",
    [((1, 0, 0, 0, 0, -1), "coronal, not axial"), ((0, 1, 0, 0, 0, -1), "sagittal, not axial")],
)
def test_reformats_are_refused(tmp_path: Path, helpers, orientation, reason) -> None:
    helpers.write_series(tmp_path / "s", helpers.ramp_volume(), orientation=orientation)
    with pytest.raises(DataError, match=reason):
        read_study(Study("s", tmp_path / "s", "dicom"))


def test_series_without_geometry_is_refused(tmp_path: Path, helpers) -> None:
    helpers.write_series(tmp_path / "s", helpers.ramp_volume(5), geometry=False, seed=1)
    with pytest.raises(DataError, match="geometry unknown"):
        read_dicom_series(tmp_path / "s")


def test_mixed_slice_sizes_are_refused(tmp_path: Path, helpers) -> None:
    helpers.write_series(tmp_path / "s", helpers.ramp_volume(4, 8, 8))
    helpers.write_series(tmp_path / "other", helpers.ramp_volume(1, 10, 10))
    extra = next((tmp_path / "other").glob("*.dcm"))
    # Same series UID as the first folder so both sizes end up in one series.
    import pydicom

    first = pydicom.dcmread(next((tmp_path / "s").glob("*.dcm")))
    ds = pydicom.dcmread(extra)
    ds.SeriesInstanceUID = first.SeriesInstanceUID
    ds.save_as(tmp_path / "s" / "odd.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match="mixed slice sizes"):
        read_dicom_series(tmp_path / "s")


def test_corrupt_file_is_named(tmp_path: Path, helpers) -> None:
    helpers.write_series(tmp_path / "s", helpers.ramp_volume(4))
    (tmp_path / "s" / "broken.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(DataError) as err:
        read_dicom_series(tmp_path / "s")
    assert "broken.dcm" in err.value.what


def test_truncated_pixel_data_is_a_data_error(tmp_path: Path, helpers) -> None:
    files = helpers.write_series(tmp_path / "s", helpers.ramp_volume(4))
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) - 40])
    with pytest.raises(DataError):
        read_dicom_series(tmp_path / "s")


def test_too_few_slices(tmp_path: Path, helpers) -> None:
    helpers.write_series(tmp_path / "s", helpers.ramp_volume(3))
    with pytest.raises(DataError, match="too few slices"):
        read_study(Study("s", tmp_path / "s", "dicom"), min_slices=4)


def test_nifti_is_read_slices_first_in_the_canonical_orientation(tmp_path: Path) -> None:
    xyz = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(xyz, np.eye(4)), tmp_path / "a.nii.gz")  # RAS
    vol = read_nifti(tmp_path / "a.nii.gz")
    assert vol.shape == (6, 5, 4)
    # slices along +S, rows along -A (anterior first), columns along -R (patient right first)
    np.testing.assert_array_equal(vol.voxels, np.transpose(xyz, (2, 1, 0))[:, ::-1, ::-1])


def test_find_studies(tmp_path: Path, helpers) -> None:
    helpers.write_series(tmp_path / "b", helpers.ramp_volume(3))
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    (tmp_path / "notes.txt").write_text("x")
    studies = find_studies(tmp_path)
    assert [(s.id, s.kind) for s in studies] == [("a", "nifti"), ("b", "dicom")]
