"""ctclip-split: patient-wise, reproducible, backed up, no patient on both sides."""

from __future__ import annotations

import json

import pandas as pd

from ctclip import cli
from ctclip.findings import FINDINGS
from ctclip.split import patient_id


def _write_validation(root, n_patients=30):
    names = [
        f"valid_{p}_{s}_{r}.nii.gz"
        for p in range(1, n_patients + 1)
        for s in "ab"[: 1 + p % 2]
        for r in (1, 2)[: 1 + p % 3 % 2]
    ]
    pd.DataFrame({"VolumeName": names, "Findings_EN": "x", "Impressions_EN": "y"}).to_csv(
        root / "validation_reports.csv", index=False
    )
    labels = pd.DataFrame(
        {"VolumeName": names, **{f: [i % 2 for i in range(len(names))] for f in FINDINGS}}
    )
    labels.to_csv(root / "valid_predicted_labels.csv", index=False)
    pd.DataFrame(
        {
            "VolumeName": names,
            "XYSpacing": "[0.7, 0.7]",
            "ZSpacing": 1.0,
            "RescaleSlope": 1,
            "RescaleIntercept": -1024,
        }
    ).to_csv(root / "validation_metadata.csv", index=False)
    return names


def test_patient_id():
    assert (
        patient_id("valid_12_a_1.nii.gz") == "valid_12" and patient_id("train_3_b_2") == "train_3"
    )


def test_split_is_patient_wise_and_backs_up_originals(tmp_path, capsys):
    names = _write_validation(tmp_path)
    assert cli.split(["--data-dir", str(tmp_path), "--target-val-size", "20", "--seed", "42"]) == 0
    val = pd.read_csv(tmp_path / "validation_reports.csv")["VolumeName"]
    test = pd.read_csv(tmp_path / "test_reports.csv")["VolumeName"]
    assert sorted([*val, *test]) == sorted(names)
    assert not {patient_id(n) for n in val} & {patient_id(n) for n in test}
    assert 12 <= len(val) <= 28
    for stem in ("validation_reports", "valid_predicted_labels", "validation_metadata"):
        assert len(pd.read_csv(tmp_path / f"original_{stem}.csv")) == len(names)
    assert list(pd.read_csv(tmp_path / "test_predicted_labels.csv")["VolumeName"]) == list(test)
    summary = json.loads((tmp_path / "split_summary.json").read_text())
    assert summary["validation"]["volumes"] == len(val) and summary["patients_in_both"] == 0
    # Re-running splits the originals again (not the already-split file) and gives the same result.
    assert cli.split(["--data-dir", str(tmp_path), "--target-val-size", "20", "--seed", "42"]) == 0
    assert list(pd.read_csv(tmp_path / "validation_reports.csv")["VolumeName"]) == list(val)
    assert cli.split(["--data-dir", str(tmp_path), "--target-val-size", "20", "--seed", "7"]) == 0
    assert list(pd.read_csv(tmp_path / "validation_reports.csv")["VolumeName"]) != list(val)


def test_bad_names_are_one_line_errors(tmp_path, capsys):
    pd.DataFrame({"VolumeName": ["valid_1_a_1.nii.gz", "scan_without_patient.nii.gz"]}).to_csv(
        tmp_path / "validation_reports.csv", index=False
    )
    assert cli.split(["--data-dir", str(tmp_path), "--target-val-size", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scan_without_patient" in err[0]


def test_flat_folder_split_into_an_output_dir_leaves_it_untouched(tmp_path, capsys):
    data = tmp_path / "ct_rate"
    data.mkdir()
    names = _write_validation(data)
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    out = tmp_path / "split"
    argv = ["--data-dir", str(data), "--output-dir", str(out), "--target-val-size", "20"]
    assert cli.split(argv) == 0
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before  # no backups, no outputs
    val = pd.read_csv(out / "valid_predicted_labels.csv")["VolumeName"]
    test = pd.read_csv(out / "test_metadata.csv")["VolumeName"]
    assert sorted([*val, *test]) == sorted(names)
    assert list(pd.read_csv(out / "validation_reports.csv")["VolumeName"]) == list(val)
    summary = json.loads((out / "split_summary.json").read_text())
    assert summary["outputs"]["test_reports.csv"] == str(out / "test_reports.csv")
    # A folder of something else is not replaced.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "ct_volumes.h5").write_bytes(b"x")
    argv[3] = str(tmp_path / "busy")
    assert cli.split(argv) == 2
    assert "holds other files (ct_volumes.h5)" in capsys.readouterr().err
