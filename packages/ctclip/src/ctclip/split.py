"""ctclip-split: patient-wise validation/test split of the CT-RATE validation files.

CT-RATE names volumes ``valid_<patient>_<scan>_<reconstruction>.nii.gz``; every volume of a patient
goes to the same side. The original files are kept as ``original_<name>.csv`` (written once, and
read on later runs, so re-running re-splits the originals rather than an earlier split).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medcore.errors import DataError
from medcore.io import RunLock, atomic_path, atomic_write_csv, atomic_write_json, read_csv
from medcore.splits import check_no_leak, group_split

NAME_RE = re.compile(
    r"^(?P<split>[a-z]+)_(?P<patient>\d+)_(?P<scan>[a-z]+)_(?P<recon>\d+)(\.nii(\.gz)?)?$"
)
# (file in data_dir, name of the test-side file)
FILES = {
    "reports": ("validation_reports.csv", "test_reports.csv"),
    "labels": ("valid_predicted_labels.csv", "test_predicted_labels.csv"),
    "metadata": ("validation_metadata.csv", "test_metadata.csv"),
}


def patient_id(name: str) -> str:
    """``valid_12_a_1.nii.gz`` -> ``valid_12``."""
    match = NAME_RE.match(name)
    if match is None:
        raise DataError(
            name, "not a CT-RATE volume name (<split>_<patient>_<scan>_<reconstruction>.nii.gz)"
        )
    return f"{match['split']}_{match['patient']}"


def _original(data_dir: Path, filename: str) -> Path | None:
    """The untouched original of ``filename``: its backup if one exists, else the file (backed up now)."""
    backup = data_dir / f"original_{filename}"
    current = data_dir / filename
    if backup.is_file():
        return backup
    if not current.is_file():
        return None
    with atomic_path(backup) as tmp:
        shutil.copyfile(current, tmp)
    return backup


def run_split(data_dir: Path, target_val_size: int = 500, seed: int = 42) -> dict[str, Any]:
    """Split the validation CSVs of ``data_dir`` into validation and test, patient-wise."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(data_dir, "directory not found")
    with RunLock(data_dir / "split"):
        sources = {key: _original(data_dir, files[0]) for key, files in FILES.items()}
        if sources["reports"] is None:
            raise DataError(
                data_dir / FILES["reports"][0], "file not found (the reports CSV is required)"
            )
        tables = {
            key: read_csv(path, required=["VolumeName"], unique="VolumeName")
            for key, path in sources.items()
            if path is not None
        }
        names = sorted(set().union(*(t["VolumeName"].astype(str) for t in tables.values())))
        patients = np.array([patient_id(n) for n in names])
        n_patients = len(set(patients))
        if not 0 < target_val_size < len(names) or n_patients < 2:
            raise DataError(
                "--target-val-size",
                f"must be between 1 and {len(names) - 1} "
                f"({len(names)} volumes of {n_patients} patients)",
            )
        fraction = target_val_size / len(names)  # ratios apply to patients; volumes follow closely
        parts = group_split(patients, {"test": 1.0 - fraction, "validation": fraction}, seed)
        check_no_leak(parts, patients)
        side = {names[i]: split for split, idx in parts.items() for i in idx}

        written = {}
        for key, table in tables.items():
            which = table["VolumeName"].astype(str).map(side)
            val_name, test_name = FILES[key]
            written[val_name] = atomic_write_csv(data_dir / val_name, table[which == "validation"])
            written[test_name] = atomic_write_csv(data_dir / test_name, table[which == "test"])
        summary = {
            "seed": seed,
            "target_val_size": target_val_size,
            "originals": {k: str(p) for k, p in sources.items() if p is not None},
            "outputs": {k: str(p) for k, p in written.items()},
            "patients_in_both": 0,  # check_no_leak raised otherwise
        }
        for split, idx in parts.items():
            members = [names[i] for i in idx]
            summary[split] = {
                "volumes": len(members),
                "patients": len(set(patients[idx])),
                "patient_ids": sorted(set(patients[idx].tolist())),
            }
        if "labels" in tables:
            labels = tables["labels"].set_index(tables["labels"]["VolumeName"].astype(str))
            for split, idx in parts.items():
                rows = labels.reindex([names[i] for i in idx]).dropna(how="all")
                summary[split]["positives"] = {
                    c: int(rows[c].sum()) for c in rows.columns if c != "VolumeName"
                }
        atomic_write_json(data_dir / "split_summary.json", summary)
    return summary


def read_split_frames(data_dir: Path) -> dict[str, pd.DataFrame]:
    """The validation and test reports written by :func:`run_split` (for checks and notebooks)."""
    return {
        side: read_csv(Path(data_dir) / name)
        for side, name in zip(("validation", "test"), FILES["reports"], strict=True)
    }


def main(args: Any) -> int:
    """ctclip-split: split, then one line of volume and patient counts."""
    summary = run_split(args.data_dir, args.target_val_size, args.seed)
    val, test = summary["validation"], summary["test"]
    print(
        f"validation: {val['volumes']} volumes / {val['patients']} patients; "
        f"test: {test['volumes']} volumes / {test['patients']} patients; no patient in both"
    )
    return 0
