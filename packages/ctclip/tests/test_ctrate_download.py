"""CT-RATE as downloaded (the Hugging Face layout), and HU checked rather than assumed.

The download is written by ``tests/conftest.py``'s ``write_ctrate_download``: the repository's
folder names, the three CSV tables with their columns (metadata with every CT-RATE column,
``XYSpacing`` as ``"[5.0, 5.0]"``), NIfTI files written by nibabel in each way CT-RATE's
releases store HU (raw values beside the metadata's rescale, HU with an unscaled header while
the table still says -1024, a header that scales).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from ctclip import cli
from ctclip.ctrate import find_ctrate
from ctclip.findings import FINDINGS
from ctclip.preprocess import hu_reading, reading_rescale
from ctclip.split import OUTPUTS, patient_id
from ctclip.synthetic import Case
from medcore.errors import DataError, UserError
from medcore.testing import call_main
from medcore.volumes.nifti import read_nifti, read_nifti_stored

SHAPE = ["--target-shape", "8", "28", "28", "--num-workers", "0"]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _stored(out: Path) -> dict[str, dict]:
    with h5py.File(out, "r") as h5:
        return {
            name: {"voxels": ds[()], **{k: ds.attrs[k] for k in ds.attrs}}
            for name, ds in h5["volumes"].items()
        }


@pytest.fixture(scope="module")
def mixed_download(tmp_path_factory, ctrate_files) -> Path:
    """Every storage of the conftest's STORAGES, cycled over 19 volumes (3 train, 6 valid
    patients)."""
    root = tmp_path_factory.mktemp("ctrate") / "CT-RATE"
    return ctrate_files.download(root, list(ctrate_files.storages))


# -- the layout ----------------------------------------------------------------------------------


def test_find_ctrate_takes_the_root_or_dataset_and_refuses_a_table_folder(mixed_download):
    for given in (mixed_download, mixed_download / "dataset"):
        ctrate = find_ctrate(given)
        assert ctrate.download and ctrate.tables == mixed_download / "dataset"
        assert ctrate.table("labels", "valid") == (
            mixed_download / "dataset/multi_abnormality_labels/valid_predicted_labels.csv"
        )
        assert ctrate.table("metadata", "train").is_file()
        assert ctrate.volume_folders() == {
            "train": mixed_download / "dataset/train",
            "valid": mixed_download / "dataset/valid",
        }
    with pytest.raises(DataError, match="a folder inside the CT-RATE download"):
        find_ctrate(mixed_download / "dataset/radiology_text_reports")


# -- preprocessing -------------------------------------------------------------------------------


def test_preprocess_the_download_every_storage_to_the_same_hu(
    mixed_download, ctrate_files, tmp_path, capsys
):
    before = _tree_digest(mixed_download)
    out = tmp_path / "work" / "ct.h5"
    argv = ["--data-dir", str(mixed_download), "--ct-out-path", str(out), *SHAPE]
    code, stdout, err = call_main(cli.preprocess, argv, capsys)
    assert code == 0, err
    assert "19 written, 0 already present, 0 skipped" in stdout
    # 19 volumes cycle through 5 storages: 4+4+4+4+3 in the order raw, raw8192, hu, hu_header,
    # scaled; the raw ones take the metadata's rescale, the HU ones their values as stored.
    assert (
        "HU of the 19 written volumes: 3 from the NIfTI header's scl_slope/scl_inter, "
        "8 from the metadata's RescaleSlope/RescaleIntercept, 8 from the stored values as they are"
    ) in stdout
    records = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("hu ")]
    assert len(records) == 19  # one line per volume says which reading it took
    assert _tree_digest(mixed_download) == before  # nothing written into the download
    stored = _stored(out)
    assert len(stored) == 19 and all(n.startswith(("train_", "valid_")) for n in stored)
    for name, record in stored.items():
        if record["hu_source"] == "stored":
            assert "not the metadata's" in record["hu_note"]  # -1024 not applied a second time
            assert tuple(record["hu_rescale"]) == (1.0, 0.0)
        assert record["hu_evidence"].min() > 0.1, name
    # The same phantom stored five ways: one volume per storage, written again beside the
    # download, must come out identical voxel for voxel.
    case = Case(labels={f: int(f == "Cardiomegaly") for f in FINDINGS}, seed=11)
    flat = tmp_path / "flat"
    rows = []
    for i, storage in enumerate(ctrate_files.storages):
        name = f"train_1_a_{i + 1}.nii.gz"
        ctrate_files.volume(flat / "vols" / name, storage, case, seed=3, xy=5.0, z=3.0)
        rows.append(ctrate_files.metadata_row(name, storage, 5.0, 3.0, 32))
    pd.DataFrame(rows).to_csv(flat / "meta.csv", index=False)
    argv = ["--ct-data-path", str(flat / "vols"), "--ct-out-path", str(flat / "o.h5")]
    code, _, err = call_main(
        cli.preprocess, [*argv, "--metadata-path", str(flat / "meta.csv"), *SHAPE], capsys
    )
    assert code == 0, err
    volumes = _stored(flat / "o.h5")
    first = volumes["train_1_a_1.nii.gz"]["voxels"]
    for name, record in volumes.items():
        np.testing.assert_array_equal(record["voxels"], first, err_msg=name)
    assert [volumes[f"train_1_a_{i}.nii.gz"]["hu_source"] for i in range(1, 6)] == [
        "metadata", "metadata", "stored", "stored", "header"
    ]  # fmt: skip


def test_hu_sources_voxel_by_voxel_on_a_file_already_in_hu(ctrate_files, tmp_path):
    """A file that holds HU with an unscaled header, its table listing RescaleIntercept -1024:
    auto keeps the HU; --hu-source metadata rescales it again (the CT-CLIP bug with later
    CT-RATE releases: 40 HU becomes -984); header reads it as stored."""
    path = tmp_path / "valid_1_a_1.nii.gz"
    ctrate_files.volume(path, "hu", Case({f: 0 for f in FINDINGS}, seed=2), 1, 5.0, 3.0)
    truth = read_nifti(path).voxels.copy()
    soft = np.abs(truth - 40) <= 20  # the phantom's soft tissue (40 HU with noise)
    assert soft.mean() > 0.05
    for source, expected in (("auto", truth), ("header", truth), ("metadata", truth - 1024)):
        stored = read_nifti_stored(path)
        reading = hu_reading(stored, (1.0, -1024.0), source)
        hu = stored.hu(rescale=reading_rescale(reading, stored))
        np.testing.assert_array_equal(hu, expected, err_msg=source)
        assert reading.source == ("metadata" if source == "metadata" else "stored")
    assert np.median((truth - 1024)[soft]) == pytest.approx(np.median(truth[soft]) - 1024)
    # The raw storage of the same HU: auto takes the metadata's rescale, header leaves it raw.
    raw = tmp_path / "valid_1_a_2.nii.gz"
    ctrate_files.volume(raw, "raw", Case({f: 0 for f in FINDINGS}, seed=2), 1, 5.0, 3.0)
    stored = read_nifti_stored(raw)
    reading = hu_reading(stored, (1.0, -1024.0), "auto")
    assert reading.source == "metadata"
    np.testing.assert_array_equal(stored.hu(rescale=reading_rescale(reading, stored)), truth)
    reading = hu_reading(stored, (1.0, -1024.0), "header")
    np.testing.assert_array_equal(stored.hu(rescale=reading_rescale(reading, stored)), truth + 1024)


def test_neither_or_both_readings_like_hu_is_skipped_by_name(tmp_path):
    from medcore.volumes.geometry import StoredVolume

    def volume(values) -> StoredVolume:
        v = np.asarray(values, dtype=np.float32).reshape(1, 1, -1)
        return StoredVolume.canonical(v, np.eye(4), 1.0, 0.0, {"path": "x.nii.gz"})

    with pytest.raises(DataError, match="no reading looks like a CT in HU"):
        hu_reading(volume(np.full(100, 5000.0)), (1.0, -1024.0))
    # Uniform values from -2100 to 1300 read about as well either way.
    with pytest.raises(DataError, match="cannot tell which reading is HU"):
        hu_reading(volume(np.linspace(-2100, 1300, 3400)), (1.0, -1024.0))
    # Explicit sources decide without evidence.
    assert hu_reading(volume(np.full(100, 5000.0)), (1.0, -1024.0), "header").source == "stored"


def test_blank_and_unreadable_cells_are_skipped_named_and_counted(ctrate_files, tmp_path, capsys):
    cells = {
        "train_1_a_1.nii.gz": {"RescaleIntercept": ""},
        "valid_2_a_1.nii.gz": {"ZSpacing": ""},
        "valid_4_a_1.nii.gz": {"XYSpacing": "0.75\\0.75"},  # DICOM's backslash, not a list
        "valid_5_a_1.nii.gz": {"RescaleSlope": "1,0"},  # a decimal comma
    }
    root = ctrate_files.download(tmp_path / "CT-RATE", "raw", {"train": 1, "valid": 5}, cells=cells)
    out = tmp_path / "o.h5"
    argv = ["--data-dir", str(root), "--ct-out-path", str(out), *SHAPE]
    code, stdout, err = call_main(cli.preprocess, argv, capsys)
    assert code == 0, err
    meta = root / "dataset" / "metadata"
    expected = {
        "train_1_a_1.nii.gz": f"RescaleIntercept is blank in {meta / 'train_metadata.csv'}",
        "valid_2_a_1.nii.gz": f"ZSpacing is blank in {meta / 'validation_metadata.csv'}",
        "valid_4_a_1.nii.gz": "XYSpacing '0.75\\\\0.75' is not a list of numbers",
        "valid_5_a_1.nii.gz": "RescaleSlope '1,0' is not a number",
    }
    for name, why in expected.items():
        assert f"skipped {name}: {why}" in err, err
    total = len(list(root.rglob("*.nii.gz")))
    assert f"{total - 4} written, 0 already present, 4 skipped" in stdout
    stored = _stored(out)
    assert not set(expected) & set(stored)
    # --hu-source header never uses the rescale cells: the row with the blank intercept is
    # written, read as stored, and named because raw values do not look like HU.
    out2 = tmp_path / "o2.h5"
    argv = ["--data-dir", str(root), "--ct-out-path", str(out2), "--hu-source", "header", *SHAPE]
    code, stdout, err = call_main(cli.preprocess, argv, capsys)
    assert code == 0, err
    assert "train_1_a_1.nii.gz" in _stored(out2)
    assert "warning: train_1_a_1.nii.gz: read as HU from the stored values as they are" in err
    assert "without air and soft tissue in place" in stdout


def test_blank_rescale_under_hu_source_metadata_stops_with_nothing_written(
    ctrate_files, tmp_path, capsys
):
    root = ctrate_files.download(
        tmp_path / "CT-RATE",
        "raw",
        {"valid": 3},
        cells={"valid_2_a_1.nii.gz": {"RescaleSlope": ""}},
    )
    work = tmp_path / "work"
    work.mkdir()
    argv = ["--data-dir", str(root), "--ct-out-path", str(work / "o.h5"), "--hu-source", "metadata"]
    code, _stdout, err = call_main(cli.preprocess, [*argv, *SHAPE], capsys)
    table = root / "dataset/metadata/validation_metadata.csv"
    assert code == 2 and err.strip().splitlines() == [
        f"error: {table}: valid_2_a_1.nii.gz: RescaleSlope is blank (--hu-source metadata "
        "rescales every volume with its row's RescaleSlope and RescaleIntercept)"
    ]
    assert list(work.iterdir()) == []


def test_a_missing_table_is_named_with_nothing_written(ctrate_files, tmp_path, capsys):
    root = ctrate_files.download(tmp_path / "CT-RATE", "hu", {"train": 1, "valid": 2})
    (root / "dataset/metadata/train_metadata.csv").unlink()
    work = tmp_path / "work"
    work.mkdir()
    argv = ["--data-dir", str(root), "--ct-out-path", str(work / "o.h5"), *SHAPE]
    code, _, err = call_main(cli.preprocess, argv, capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"error: {root / 'dataset/metadata/train_metadata.csv'}: file not found (the spacing and "
        "rescale of the train volumes)"
    ]
    assert list(work.iterdir()) == []
    code, _, err = call_main(
        cli.preprocess, [*argv, "--ct-data-path", str(root / "dataset/valid")], capsys
    )
    assert code == 2 and "error: --ct-data-path: given together with --data-dir" in err


def test_the_corrected_release_folder_is_preferred_and_named(ctrate_files, tmp_path, capsys):
    root = ctrate_files.download(tmp_path / "CT-RATE", "hu", {"valid": 2}, fixed=True)
    shutil.copytree(root / "dataset/valid_fixed", root / "dataset/valid")
    out = tmp_path / "o.h5"
    code, _stdout, err = call_main(
        cli.preprocess, ["--data-dir", str(root), "--ct-out-path", str(out), *SHAPE], capsys
    )
    assert code == 0, err
    assert "using valid_fixed/ (the corrected release); valid/ is left aside" in err
    assert all(r["source"].find("/valid_fixed/") > 0 for r in _stored(out).values())


# -- the split -----------------------------------------------------------------------------------


def test_split_the_download_every_table_alike_into_the_output_dir(ctrate_files, tmp_path, capsys):
    root = ctrate_files.download(tmp_path / "CT-RATE", "hu", {"valid": 12})
    before = _tree_digest(root)
    out = tmp_path / "split"
    argv = ["--data-dir", str(root), "--output-dir", str(out), "--target-val-size", "6"]
    code, stdout, err = call_main(cli.split, argv, capsys)
    assert code == 0, err
    assert f"written to {out}" in stdout
    assert _tree_digest(root) == before  # the download is never written to
    assert {p.name for p in out.iterdir()} == OUTPUTS
    sides = {}
    for side, files in (
        ("validation", ("validation_reports", "valid_predicted_labels", "validation_metadata")),
        ("test", ("test_reports", "test_predicted_labels", "test_metadata")),
    ):
        names = [sorted(pd.read_csv(out / f"{f}.csv")["VolumeName"]) for f in files]
        assert names[0] == names[1] == names[2], side  # reports, labels, metadata alike
        sides[side] = names[0]
    every = pd.read_csv(root / "dataset/multi_abnormality_labels/valid_predicted_labels.csv")
    assert sorted(sides["validation"] + sides["test"]) == sorted(every["VolumeName"])
    assert not {patient_id(n) for n in sides["validation"]} & {patient_id(n) for n in sides["test"]}
    # The metadata keeps every column of the download.
    assert list(pd.read_csv(out / "test_metadata.csv").columns) == list(
        pd.read_csv(root / "dataset/metadata/validation_metadata.csv").columns
    )
    # Another seed replaces the whole output; no staging folder is left beside it.
    code, _, err = call_main(cli.split, [*argv, "--seed", "7"], capsys)
    assert code == 0, err
    assert sorted(pd.read_csv(out / "validation_reports.csv")["VolumeName"]) != sides["validation"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CT-RATE", "split"]


@pytest.mark.parametrize(
    "case",
    ["labels table missing", "no --output-dir", "a table folder", "output in the download"],
)
def test_split_of_the_download_refuses_with_nothing_written(case, ctrate_files, tmp_path, capsys):
    root = ctrate_files.download(tmp_path / "CT-RATE", "hu", {"valid": 4})
    out = tmp_path / "split"
    data = root
    if case == "labels table missing":
        (root / "dataset/multi_abnormality_labels/valid_predicted_labels.csv").unlink()
        why = "multi_abnormality_labels/valid_predicted_labels.csv: file not found"
    elif case == "no --output-dir":
        out, why = None, "--output-dir: required with the CT-RATE download"
    elif case == "a table folder":
        data = root / "dataset/radiology_text_reports"
        why = "a folder inside the CT-RATE download"
    else:
        out, why = root / "dataset/split", "--output-dir: is inside the CT-RATE download"
    before = _tree_digest(root)
    argv = ["--data-dir", str(data), "--target-val-size", "2"]
    argv += ["--output-dir", str(out)] if out is not None else []
    code, _stdout, err = call_main(cli.split, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and why in lines[0]
    assert _tree_digest(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CT-RATE"]


# -- training and evaluation on the download -----------------------------------------------------


@pytest.mark.slow
def test_train_and_eval_take_the_download_as_data_dir(ctrate_files, tmp_path, tiny_sets, capsys):
    root = ctrate_files.download(tmp_path / "CT-RATE", "raw", {"train": 6, "valid": 4})
    h5 = tmp_path / "work" / "ct.h5"
    code, _, err = call_main(
        cli.preprocess, ["--data-dir", str(root), "--ct-out-path", str(h5), *SHAPE], capsys
    )
    assert code == 0, err
    base = ["--data-dir", str(root), "--device", "cpu", *tiny_sets, "--epochs", "1"]
    base += ["--set", "trainer.batch_size=4", "--from-scratch"]
    # Without the HDF5 the command says where it comes from, before training.
    failed = tmp_path / "failed"
    code, _, err = call_main(cli.train, [*base, "--output-dir", str(failed)], capsys)
    assert code == 2 and "HDF5 file not found: training reads volumes preprocessed from" in err
    assert not (failed / "checkpoints").exists()
    run = tmp_path / "run"
    argv = [*base, "--output-dir", str(run), "--ct-filepath", str(h5)]
    code, _, err = call_main(cli.train, argv, capsys)
    assert code == 0, err
    assert "all of CT-RATE's validation volumes" in err  # the unsplit validation set is named
    import json

    members = json.loads((run / "splits.json").read_text())["ids"]
    reports = pd.read_csv(root / "dataset/radiology_text_reports/train_reports.csv")
    labels = pd.read_csv(root / "dataset/multi_abnormality_labels/valid_predicted_labels.csv")
    assert sorted(members["train"]) == sorted(reports["VolumeName"])
    assert sorted(members["val"]) == sorted(labels["VolumeName"])
    code, _stdout, err = call_main(
        cli.evaluate,
        [
            "--model-path", str(run / "checkpoints/final.pt"), "--data-dir", str(root),
            "--test-data", str(h5), "--output-dir", str(tmp_path / "eval"), "--n-boot", "10",
            "--device", "cpu",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    predictions = pd.read_csv(tmp_path / "eval" / "zero_shot_predictions.csv")
    assert sorted(predictions["VolumeName"]) == sorted(labels["VolumeName"])


def test_paths_default_to_the_tables_of_either_layout(ctrate_files, tmp_path):
    import argparse

    from ctclip.config import DataConfig
    from ctclip.data import resolve_paths
    from ctclip.evaluate import test_inputs

    root = ctrate_files.download(tmp_path / "CT-RATE", "hu", {"valid": 1})
    (tmp_path / "ct.h5").write_bytes(b"")
    paths = resolve_paths(
        DataConfig(data_dir=str(root / "dataset"), ct_filepath=str(tmp_path / "ct.h5"))
    )
    assert paths.txt_filepath == root / "dataset/radiology_text_reports/train_reports.csv"
    assert (
        paths.val_label_path == root / "dataset/multi_abnormality_labels/valid_predicted_labels.csv"
    )
    assert paths.unsplit_validation
    split = resolve_paths(
        DataConfig(data_dir=str(root), ct_filepath=str(tmp_path / "ct.h5"), val_label_path="v.csv")
    )
    assert split.val_label_path == root / "v.csv" and not split.unsplit_validation
    (tmp_path / "flat").mkdir()
    flat = resolve_paths(DataConfig(data_dir=str(tmp_path / "flat")))
    assert flat.ct_filepath == tmp_path / "flat/ct_volumes.h5"
    assert flat.txt_filepath == tmp_path / "flat/train_reports.csv"  # no ct_rate/: the folder
    (tmp_path / "flat2" / "ct_rate").mkdir(parents=True)
    flat = resolve_paths(DataConfig(data_dir=str(tmp_path / "flat2")))
    assert flat.val_label_path == tmp_path / "flat2/ct_rate/valid_predicted_labels.csv"

    def args(**kw):
        base = {"data_dir": None, "test_data": None, "test_labels": None}
        return argparse.Namespace(**{**base, **kw})

    assert test_inputs(args(data_dir=root, test_data=Path("x.h5"))) == (
        Path("x.h5"),
        root / "dataset/multi_abnormality_labels/valid_predicted_labels.csv",
    )
    assert test_inputs(args(data_dir=tmp_path / "flat2")) == (
        tmp_path / "flat2/ct_volumes.h5",
        tmp_path / "flat2/ct_rate/test_predicted_labels.csv",
    )
    with pytest.raises(UserError, match="--test-data"):
        test_inputs(args(data_dir=root))
