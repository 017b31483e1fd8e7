"""Same geometry from DICOM and NIfTI, target spacing, and the store's settings checked downstream."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from ctretrieval import index as index_mod
from ctretrieval import predict as predict_mod
from ctretrieval.cli import train
from ctretrieval.config import DataConfig, PreprocessConfig
from ctretrieval.data import load_studies
from ctretrieval.preprocess import preprocess
from medcore.errors import ConfigError
from medcore.testing import call_main
from medcore.volumes.store import read_settings

CFG = PreprocessConfig(target_shape=(4, 8, 8), min_slices=3, workers=1)


def _same_study_twice(raw: Path, helpers) -> np.ndarray:
    """One study as the demo's DICOM series and as the NIfTI file of the same geometry."""
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 400, (6, 10, 12)).astype(np.float32).round()
    helpers.write_series(raw / "dicom_study", hu)  # axial, LPS, slices 2 mm apart
    # The series' voxel (slice k, row j, column i) is LPS (i, j, 2k) mm; NIfTI world is RAS.
    nib.save(
        nib.Nifti1Image(hu.transpose(2, 1, 0), np.diag([-1.0, -1.0, 2.0, 1.0])),
        raw / "nifti_study.nii.gz",
    )
    return hu


def test_dicom_and_nifti_of_one_study_are_stored_identically(tmp_path: Path, helpers) -> None:
    _same_study_twice(tmp_path / "raw", helpers)
    preprocess(tmp_path / "raw", tmp_path / "v.h5", CFG, show_progress=False)
    with h5py.File(tmp_path / "v.h5") as f:
        a, b = f["volumes/dicom_study"][()], f["volumes/nifti_study"][()]
        np.testing.assert_allclose(f["volumes/dicom_study"].attrs["spacing"], [2.0, 1.0, 1.0])
    np.testing.assert_array_equal(a, b)
    assert np.ptp(a) > 100


def test_target_spacing_resamples_and_records_the_padding(tmp_path: Path, helpers) -> None:
    hu = _same_study_twice(tmp_path / "raw", helpers)
    cfg = PreprocessConfig(
        target_shape=(8, 8, 8), target_spacing=(2.0, 2.0, 2.0), workers=1, min_slices=3
    )
    preprocess(tmp_path / "raw", tmp_path / "v.h5", cfg, show_progress=False)
    with h5py.File(tmp_path / "v.h5") as f:
        ds = f["volumes/nifti_study"]
        # 6 slices x 2 mm stay 6 (padded 1 + 1 to 8); 10 x 12 px at 1 mm become 5 x 6 at 2 mm.
        np.testing.assert_array_equal(ds.attrs["pad"], [[1, 1], [1, 2], [1, 1]])
        np.testing.assert_array_equal(ds.attrs["crop"], np.zeros((3, 2)))
        vol = ds[()]
        assert (vol[0] == 0).all() and (vol[-1] == 0).all()  # padding is the window's low end
        np.testing.assert_array_equal(vol, f["volumes/dicom_study"][()])
        assert list(f.attrs["target_spacing"]) == [2.0, 2.0, 2.0]
    assert hu.shape == (6, 10, 12)


def _data_dir(tmp_path: Path, helpers) -> Path:
    root = tmp_path / "data"
    raw = tmp_path / "raw"
    rows = []
    for i in range(4):
        helpers.write_series(raw / f"s{i}", helpers.ramp_volume(4, 10, 10) + 20 * i, seed=i)
        rows.append({"CT": f"s{i}", "condensacion": i % 2, "nodulos": 0, "quistes": 1})
    root.mkdir()
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    preprocess(raw, root / "volumes.h5", CFG, show_progress=False)
    return root


def test_training_refuses_a_store_of_another_shape(tmp_path: Path, helpers, capsys) -> None:
    root = _data_dir(tmp_path, helpers)
    table = load_studies(DataConfig(data_dir=str(root)), CFG)
    assert table.keys == ["s0", "s1", "s2", "s3"]
    with pytest.raises(ConfigError, match=r"target_shape=\[4, 8, 8\], not \[5, 8, 8\]"):
        load_studies(DataConfig(data_dir=str(root)), PreprocessConfig(target_shape=(5, 8, 8)))
    argv = ["--data-dir", str(root), "--output-dir", str(tmp_path / "run"), "--device", "cpu"]
    argv += ["--set", "preprocess.target_shape=[5,8,8]"]
    code, _, err = call_main(train, argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "written with other settings: target_shape=[4, 8, 8], not [5, 8, 8]" in lines[0]


class _ShapeModel(torch.nn.Module):
    """Stands in for a trained model: records the volume a raw query becomes."""

    embedding_size = 2

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def get_embeddings(self, volume: torch.Tensor, amp=None) -> dict[str, torch.Tensor]:
        self.seen.append(tuple(volume.shape))
        return {"embedding": torch.ones(volume.shape[0], 2) / 2**0.5}


def test_raw_query_is_preprocessed_with_the_archive_settings(
    tmp_path: Path, helpers, monkeypatch
) -> None:
    root = _data_dir(tmp_path, helpers)
    # The checkpoint was trained with other settings than the archive's (4 x 8 x 8).
    state = {"preprocess_config": {"target_shape": [6, 32, 32], "min_slices": 3}, "model": {}}
    model = _ShapeModel()
    monkeypatch.setattr(predict_mod, "load_model", lambda path, device: (model, state))
    idx = index_mod.Index(
        ids=np.asarray(["s0", "s1"]),
        embeddings=np.ones((2, 2), np.float32) / 2**0.5,
        labels=np.zeros((2, 4), np.uint8),
        has_labels=np.zeros(2, bool),
        meta={
            "class_names": ["a", "b", "c", "d"],
            "checkpoint": "x.pt",
            "store_settings": read_settings(root / "volumes.h5"),
        },
    )
    predict_mod.search(idx, str(tmp_path / "raw" / "s1"), 1, torch.device("cpu"))
    assert model.seen == [(1, 4, 8, 8)]
