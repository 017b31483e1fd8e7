"""ctclip-split: patient-wise validation/test split of the CT-RATE validation tables.

CT-RATE names volumes ``valid_<patient>_<scan>_<reconstruction>.nii.gz``; every volume of a patient
goes to the same side, and every table that lists validation volumes is split the same way.

- The Hugging Face download (``--data-dir`` its root or ``dataset/``): the reports, labels and
  metadata tables are all required (a missing one is named and nothing is written). The split
  goes to ``--output-dir``, never into the download: ``validation_*`` and ``test_*`` of each
  table under the flat names, and ``split_summary.json``, staged in a temporary folder that
  replaces the output folder only once complete.
- A flat folder (the original work's ``data/ct_rate``): the reports table is required and the
  labels and metadata tables are split when present. Without ``--output-dir`` the split is
  written in place, the originals kept as ``original_<name>.csv`` (written once, and read on
  later runs, so re-running re-splits the originals rather than an earlier split).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctclip.ctrate import CTRate, find_ctrate
from medcore.data.splits import check_no_leak, group_split
from medcore.errors import DataError, UserError
from medcore.io import RunLock, atomic_path, atomic_write_csv, atomic_write_json, read_csv

NAME_RE = re.compile(
    r"^(?P<split>[a-z]+)_(?P<patient>\d+)_(?P<scan>[a-z]+)_(?P<recon>\d+)(\.nii(\.gz)?)?$"
)
# table -> (its validation file, name of the test-side file)
FILES = {
    "reports": ("validation_reports.csv", "test_reports.csv"),
    "labels": ("valid_predicted_labels.csv", "test_predicted_labels.csv"),
    "metadata": ("validation_metadata.csv", "test_metadata.csv"),
}
SUMMARY = "split_summary.json"
OUTPUTS = {SUMMARY, *(name for pair in FILES.values() for name in pair)}


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


def _download_tables(ctrate: CTRate) -> dict[str, Path]:
    """The download's validation tables; each must exist (one left unsplit would leak)."""
    tables = {key: ctrate.table(key, "valid") for key in FILES}
    for key, path in tables.items():
        if not path.is_file():
            raise DataError(
                path,
                f"file not found: the CT-RATE {key} table of the validation volumes (ctclip-split "
                "splits the reports, labels and metadata together, or none of them)",
            )
    return tables


def _check_output(output_dir: Path, ctrate: CTRate) -> None:
    """The output folder is new, or an earlier split's; never inside the download."""
    out = output_dir.resolve()
    if ctrate.download and (out == ctrate.root.resolve() or ctrate.root.resolve() in out.parents):
        raise UserError("--output-dir", f"is inside the CT-RATE download {ctrate.root}")
    if output_dir.exists():
        if not output_dir.is_dir():
            raise UserError("--output-dir", f"{output_dir} is a file")
        other = sorted(p.name for p in output_dir.iterdir() if p.name not in OUTPUTS)
        if other:
            raise UserError(
                "--output-dir",
                f"{output_dir} holds other files ({', '.join(other[:3])}): the split replaces "
                "the whole folder; choose a new one",
            )


def _split_sides(
    tables: dict[str, pd.DataFrame], target_val_size: int, seed: int
) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """(volume names, their patients, split -> indices), patient-wise."""
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
    return names, patients, parts


def _write(
    where: Path,
    tables: dict[str, pd.DataFrame],
    side: dict[str, str],
    summary: dict[str, Any],
    final: Path,
) -> None:
    """Every table's two sides and the summary into ``where`` (each file atomically); the
    summary names them as they will be in ``final``."""
    outputs = {}
    for key, table in tables.items():
        which = table["VolumeName"].astype(str).map(side)
        for name, rows in zip(FILES[key], ("validation", "test"), strict=True):
            atomic_write_csv(where / name, table[which == rows])
            outputs[name] = str(final / name)
    summary["outputs"] = outputs
    atomic_write_json(where / SUMMARY, summary)


def _publish(staging: Path, out: Path) -> None:
    """``staging`` becomes ``out``; an earlier split in ``out`` is replaced, not merged."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old)


def run_split(
    data_dir: Path, target_val_size: int = 500, seed: int = 42, output_dir: Path | None = None
) -> dict[str, Any]:
    """Split the validation tables of ``data_dir`` into validation and test, patient-wise."""
    ctrate = find_ctrate(data_dir)
    if ctrate.download and output_dir is None:
        raise UserError(
            "--output-dir",
            "required with the CT-RATE download: the split is written there, never into the "
            "download",
        )
    in_place = output_dir is None or Path(output_dir).resolve() == ctrate.tables.resolve()
    if not in_place:
        output_dir = Path(output_dir)
        _check_output(output_dir, ctrate)
    lock = RunLock(ctrate.tables / "split") if in_place else RunLock(output_dir, directory=False)
    with lock:
        if ctrate.download:
            sources: dict[str, Path | None] = dict(_download_tables(ctrate))
        elif in_place:
            sources = {key: _original(ctrate.tables, files[0]) for key, files in FILES.items()}
        else:
            sources = {key: ctrate.tables / files[0] for key, files in FILES.items()}
            sources = {key: path if path.is_file() else None for key, path in sources.items()}
        if sources["reports"] is None:
            raise DataError(
                ctrate.tables / FILES["reports"][0], "file not found (the reports CSV is required)"
            )
        tables = {
            key: read_csv(path, required=["VolumeName"], unique="VolumeName")
            for key, path in sources.items()
            if path is not None
        }
        names, patients, parts = _split_sides(tables, target_val_size, seed)
        side = {names[i]: split for split, idx in parts.items() for i in idx}
        summary: dict[str, Any] = {
            "seed": seed,
            "target_val_size": target_val_size,
            "data": ctrate.describe(),
            "originals": {k: str(p) for k, p in sources.items() if p is not None},
            "patients_in_both": 0,  # check_no_leak raised otherwise
        }
        for split, idx in parts.items():
            summary[split] = {
                "volumes": len(idx),
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
        if in_place:
            _write(ctrate.tables, tables, side, summary, ctrate.tables)
        else:
            output_dir.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
            try:
                _write(staging, tables, side, summary, output_dir)
                _publish(staging, output_dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    absent = [FILES[key][0] for key, path in sources.items() if path is None]
    if absent:
        print(f"note: {ctrate.tables} has no {' or '.join(absent)}: not split", file=sys.stderr)
    return summary


def main(args: Any) -> int:
    """ctclip-split: split, then one line of volume and patient counts."""
    summary = run_split(args.data_dir, args.target_val_size, args.seed, args.output_dir)
    val, test = summary["validation"], summary["test"]
    where = Path(next(iter(summary["outputs"].values()))).parent
    print(
        f"validation: {val['volumes']} volumes / {val['patients']} patients; "
        f"test: {test['volumes']} volumes / {test['patients']} patients; no patient in both; "
        f"written to {where}"
    )
    return 0
