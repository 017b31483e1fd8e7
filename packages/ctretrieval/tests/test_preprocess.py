from __future__ import annotations

import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from ctretrieval import preprocess as prep_mod
from ctretrieval.cli import preprocess as preprocess_cli
from ctretrieval.config import PreprocessConfig
from ctretrieval.preprocess import preprocess, to_uint8_volume
from medcore.errors import ConfigError
from medcore.volumes.store import complete_names

CFG = PreprocessConfig(target_shape=(4, 8, 8), hu_window=(-1000.0, 400.0), min_slices=3, workers=1)


def test_window_and_resize_values() -> None:
    hu = np.full((4, 8, 8), -1000.0, dtype=np.float32)
    hu[2:] = 400.0
    out = to_uint8_volume(hu, (4, 8, 8), (-1000, 400))
    assert out.dtype == np.uint8
    assert out[0].max() == 0 and out[3].min() == 255
    mid = to_uint8_volume(np.full((2, 4, 4), -300.0, np.float32), (3, 6, 5), (-1000, 400))
    assert mid.shape == (3, 6, 5) and (mid == round(700 / 1400 * 255)).all()
    clipped = to_uint8_volume(np.full((2, 2, 2), 3000.0, np.float32), (2, 2, 2), (-1000, 400))
    assert (clipped == 255).all()


def _raw(tmp_path: Path, helpers) -> Path:
    raw = tmp_path / "raw"
    helpers.write_series(raw / "good", helpers.ramp_volume(6, 10, 10))
    helpers.write_series(raw / "short", helpers.ramp_volume(2, 10, 10))
    helpers.write_series(raw / "broken", helpers.ramp_volume(4, 10, 10))
    (raw / "broken" / "x.dcm").write_bytes(b"garbage")
    nib.save(
        nib.Nifti1Image(np.full((10, 10, 5), 400.0, np.float32), np.eye(4)), raw / "nif.nii.gz"
    )
    return raw


def test_preprocess_writes_hdf5_and_skips_bad_studies(tmp_path: Path, helpers, capsys) -> None:
    raw = _raw(tmp_path, helpers)
    report = preprocess(raw, tmp_path / "v.h5", CFG, show_progress=False)
    assert report.written == 2 and set(report.skipped) == {"short", "broken"}
    err = capsys.readouterr().err
    assert "skipped short: too few slices" in err and "x.dcm" in err
    with h5py.File(tmp_path / "v.h5") as f:
        assert sorted(f["volumes"]) == ["good", "nif"]
        good = f["volumes/good"][()]
        assert good.shape == (4, 8, 8) and good.dtype == np.uint8
        assert (f["volumes/nif"][()] == 255).all()
        assert tuple(f.attrs["target_shape"]) == (4, 8, 8)
    # Slice order survives: the ramp rises through the volume.
    assert (np.diff(good.mean(axis=(1, 2))) > 0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "v.h5"]  # no staging, no lock


def test_resume_processes_only_new_studies(tmp_path: Path, helpers, monkeypatch) -> None:
    raw = _raw(tmp_path, helpers)
    preprocess(raw, tmp_path / "v.h5", CFG, show_progress=False)
    helpers.write_series(raw / "late", helpers.ramp_volume(5, 10, 10))
    seen = []
    real = prep_mod._process_one
    monkeypatch.setattr(prep_mod, "_process_one", lambda s, c: seen.append(s.id) or real(s, c))
    report = preprocess(raw, tmp_path / "v.h5", CFG, show_progress=False)
    assert sorted(seen) == ["broken", "late", "short"]  # skipped ones are retried, done ones not
    assert report.written == 1 and report.total_in_file == 3


def test_interrupted_run_keeps_finished_studies_and_no_broken_file(
    tmp_path: Path, helpers, monkeypatch
) -> None:
    raw = tmp_path / "raw"
    for name in ("a", "b", "c"):
        helpers.write_series(raw / name, helpers.ramp_volume(4, 10, 10))
    real = prep_mod._process_one
    calls = []

    def flaky(study, cfg):
        calls.append(study.id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(study, cfg)

    monkeypatch.setattr(prep_mod, "_process_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        preprocess(raw, tmp_path / "v.h5", CFG, show_progress=False)
    assert not (tmp_path / "v.h5").exists()  # never a half-written HDF5
    with h5py.File(tmp_path / "v.h5.partial") as f:  # the staging store keeps study a
        assert complete_names(f) == {"a"}
    monkeypatch.setattr(prep_mod, "_process_one", real)
    report = preprocess(raw, tmp_path / "v.h5", CFG, show_progress=False)
    assert report.written == 2 and report.total_in_file == 3


def test_other_settings_on_existing_file_are_refused(tmp_path: Path, helpers) -> None:
    raw = _raw(tmp_path, helpers)
    preprocess(raw, tmp_path / "v.h5", CFG, show_progress=False)
    with pytest.raises(
        ConfigError, match=r"other settings \(target_shape=\[4, 8, 8\], not \[5, 8, 8\]"
    ):
        preprocess(
            raw,
            tmp_path / "v.h5",
            PreprocessConfig(target_shape=(5, 8, 8), workers=1),
            show_progress=False,
        )


def test_parallel_workers(tmp_path: Path, helpers) -> None:
    raw = tmp_path / "raw"
    for name in ("a", "b", "c"):
        helpers.write_series(raw / name, helpers.ramp_volume(4, 10, 10))
    cfg = PreprocessConfig(target_shape=(4, 8, 8), min_slices=3, workers=2)
    assert preprocess(raw, tmp_path / "v.h5", cfg, show_progress=False).written == 3


def test_cli_exit_codes(tmp_path: Path, helpers, capsys) -> None:
    code = preprocess_cli(
        ["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "v.h5")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
    raw = tmp_path / "raw"
    helpers.write_series(raw / "only_short", helpers.ramp_volume(2, 10, 10))
    code = preprocess_cli(
        [
            "--input",
            str(raw),
            "--output",
            str(tmp_path / "v.h5"),
            "--shape",
            "4",
            "8",
            "8",
            "--min-slices",
            "3",
            "--workers",
            "1",
        ]
    )
    assert code == 2 and "none of the 1 studies" in capsys.readouterr().err
    helpers.write_series(raw / "ok", helpers.ramp_volume(4, 10, 10))
    code = preprocess_cli(
        [
            "--input",
            str(raw),
            "--output",
            str(tmp_path / "v.h5"),
            "--shape",
            "4",
            "8",
            "8",
            "--min-slices",
            "3",
            "--workers",
            "1",
        ]
    )
    assert code == 0 and "1 studies written, 1 skipped" in capsys.readouterr().out


@pytest.mark.parametrize("inflate", ["isal", "zlib"])
def test_truncated_gzip_study_is_skipped_by_name(
    tmp_path: Path, helpers, capsys, monkeypatch, inflate
) -> None:
    if inflate == "zlib":
        monkeypatch.setitem(sys.modules, "isal", None)  # medcore without isal
    raw = tmp_path / "raw"
    helpers.write_series(raw / "good", helpers.ramp_volume(6, 10, 10))
    cut = raw / "cut.nii.gz"
    nib.save(
        nib.Nifti1Image(np.arange(10 * 10 * 6, dtype=np.int16).reshape(10, 10, 6), np.eye(4)), cut
    )
    cut.write_bytes(cut.read_bytes()[:-40])  # the stream ends inside the voxels
    report = preprocess(raw, tmp_path / "v.h5", CFG, show_progress=False)
    assert report.written == 1 and set(report.skipped) == {"cut"}
    (line,) = [s for s in capsys.readouterr().err.splitlines() if s.startswith("skipped cut")]
    assert "truncated or corrupt gzip data" in line
