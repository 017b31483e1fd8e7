"""CT-RATE tables (reports, labels) and the HDF5 volume dataset.

Shapes: a volume is ``[d, h, w]`` uint8 (slices, rows, columns) as ctclip-preprocess stores it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ctclip.config import DataConfig, TextColumn
from ctclip.ctrate import CTRate, find_ctrate
from ctclip.findings import FINDINGS
from ctclip.notes import name_left_out
from ctclip.preprocess import HU_RANGE, open_store, read_volume_names, volume_shape
from ctclip.text import TEXT_COLUMNS, Tokenizer, report_text
from medcore.errors import DataError
from medcore.io import read_csv
from medcore.volumes.geometry import CANONICAL_AXCODES
from medcore.volumes.store import check_settings

REPORT_COLUMNS = (
    "VolumeName",
    "ClinicalInformation_EN",
    "Technique_EN",
    "Findings_EN",
    "Impressions_EN",
)


@dataclass
class DataPaths:
    ct_filepath: Path
    txt_filepath: Path
    val_ct_filepath: Path
    val_label_path: Path
    # The labels are the download's whole validation table, not a patient-wise split of it.
    unsplit_validation: bool = False


def resolve_paths(cfg: DataConfig) -> DataPaths:
    """The data files of ``cfg``: relative paths are taken relative to ``data_dir``; the reports
    and labels not set are the CT-RATE copy's tables (:func:`ctclip.ctrate.find_ctrate`)."""
    root = Path(cfg.data_dir).expanduser() if cfg.data_dir else Path()
    ctrate = find_ctrate(root) if cfg.data_dir else CTRate(root, root / "ct_rate", download=False)

    def at(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else root / path

    ct = at(cfg.ct_filepath)
    if ctrate.download and not ct.exists():
        raise DataError(
            ct,
            f"HDF5 file not found: training reads volumes preprocessed from {ctrate.describe()} "
            f"(ctclip-preprocess --data-dir {ctrate.root} --ct-out-path FILE.h5, then "
            "--ct-filepath FILE.h5)",
        )
    return DataPaths(
        ct_filepath=ct,
        txt_filepath=at(cfg.txt_filepath) if cfg.txt_filepath else ctrate.table("reports", "train"),
        val_ct_filepath=at(cfg.val_ct_filepath) if cfg.val_ct_filepath else ct,
        val_label_path=(
            at(cfg.val_label_path) if cfg.val_label_path else ctrate.table("labels", "valid")
        ),
        unsplit_validation=ctrate.download and not cfg.val_label_path,
    )


def read_reports(path: Path, column: TextColumn) -> dict[str, str]:
    """VolumeName -> report text (the columns of ``--text-column``; NaN becomes "").

    Reports without any text in those columns are left out and named on stderr: a volume
    paired with an empty text would teach the model nothing but noise.
    """
    frame = read_csv(path, required=["VolumeName", *TEXT_COLUMNS[column]], unique="VolumeName")
    texts = {str(r["VolumeName"]): report_text(r, column) for r in frame.to_dict("records")}
    empty = [name for name, text in texts.items() if not text]
    columns = ", ".join(TEXT_COLUMNS[column])
    if empty and len(empty) == len(texts):
        raise DataError(path, f"no report has text in {columns} (--text-column {column})")
    name_left_out(f"warning: {path}: ", empty, f"report(s) without text in {columns} left out")
    return {name: text for name, text in texts.items() if text}


def read_labels(path: Path) -> pd.DataFrame:
    """The labels CSV (VolumeName + the 18 findings as 0/1), indexed by VolumeName, in column order."""
    frame = read_csv(path, required=["VolumeName", *FINDINGS], unique="VolumeName")
    labels = frame.set_index(frame["VolumeName"].astype(str))[list(FINDINGS)]
    values = labels.to_numpy()
    if not np.isin(values, (0, 1)).all():
        bad = labels.columns[~np.isin(values, (0, 1)).all(0)].tolist()
        raise DataError(path, f"label columns must hold 0 or 1 (not so in: {', '.join(bad[:3])})")
    return labels.astype(np.int64)


def match_names(
    csv_names: list[str], h5_path: Path, csv_path: Path, allow_missing: bool
) -> list[str]:
    """The CSV's names that have a volume in the HDF5 file; missing ones are an error unless allowed.

    An HDF5 file may hold more volumes than the CSV (CT-RATE keeps all splits in one file).
    """
    stored = read_volume_names(h5_path)
    missing = [n for n in csv_names if n not in stored]
    if missing and not allow_missing:
        raise DataError(
            csv_path,
            f"{len(missing)} of {len(csv_names)} volumes are not in {h5_path} "
            f"(first: {', '.join(missing[:3])}); preprocess them or set data.allow_missing=true",
        )
    present = [n for n in csv_names if n in stored]
    if not present:
        raise DataError(csv_path, f"none of its volumes is in {h5_path}")
    name_left_out(f"warning: {csv_path}: ", missing, f"volume(s) not in {h5_path} left out")
    check_volumes(h5_path, present)
    return present


def check_store(h5_path: Path, cfg: DataConfig | None = None) -> dict | None:
    """The store's recorded settings, after checking them against ``cfg`` (one-line ConfigError).

    The HU range and the orientation are always compared with this version's; the target shape
    and slice order only where ``cfg`` sets them (``data.target_shape``, ``data.slide_b2u``).
    """
    expected: dict = {"hu_range": list(HU_RANGE), "orientation": "".join(CANONICAL_AXCODES)}
    if cfg is not None and cfg.target_shape is not None:
        expected["target_shape"] = list(cfg.target_shape)
    if cfg is not None and cfg.slide_b2u is not None:
        expected["slide_b2u"] = cfg.slide_b2u
    return check_settings(
        h5_path,
        expected,
        hint="preprocess again with ctclip-preprocess or set data.target_shape / data.slide_b2u",
    )


def check_volumes(h5_path: Path, names: list[str]) -> None:
    """Every named volume is uint8 of the store's target shape (read from metadata only)."""
    shape = volume_shape(h5_path)
    store = open_store(h5_path)
    try:
        for name in names:
            ds = store.dataset(name)
            if tuple(ds.shape) != shape or ds.dtype != np.uint8:
                raise DataError(
                    store.names[name],
                    f"volume {name} is {ds.dtype} of shape {tuple(ds.shape)}, not uint8 {shape} "
                    "(write the file with ctclip-preprocess)",
                )
    finally:
        store.close()


class VolumeReader:
    """Reads volumes by name from a ctclip store (a file or a folder of parts), opening its
    files lazily in each process."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.shape = volume_shape(self.path)
        self.store = open_store(self.path)

    def __call__(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.store.read(name))


def split_sentences(text: str) -> list[str]:
    """Sentences of a report (split after '.', '!' or '?' followed by white space)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


class CTReportDataset(Dataset):
    """(volume, report tokens) pairs for contrastive training."""

    def __init__(
        self,
        h5_path: Path,
        reports: dict[str, str],
        names: list[str],
        tokenizer: Tokenizer,
        sentence_sampling: bool = False,
    ) -> None:
        self.reader = VolumeReader(h5_path)
        self.names = names
        self.reports = reports
        self.tokenizer = tokenizer
        self.sentence_sampling = sentence_sampling

    def __len__(self) -> int:
        return len(self.names)

    def sentences(self, name: str) -> list[str]:
        """The report's sentences, or a random in-order subset of them (global torch RNG: the
        Trainer seeds it per worker and checkpoints it, so runs and resumes repeat exactly)."""
        report = self.reports[name]
        if not self.sentence_sampling:
            return [report]
        sentences = split_sentences(report)
        if len(sentences) < 2:
            return [report]
        k = int(torch.randint(1, len(sentences) + 1, ()))
        keep = torch.randperm(len(sentences))[:k].sort().values.tolist()
        return [sentences[i] for i in keep]

    def text(self, name: str) -> str:
        """The report text of one draw (see :meth:`sentences`)."""
        return " ".join(self.sentences(name))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        name = self.names[index]
        return {"volume": self.reader(name), "tokens": self.tokenizer.join(self.sentences(name))}


class CTVolumeDataset(Dataset):
    """Volumes with their 18 labels, for zero-shot evaluation."""

    def __init__(self, h5_path: Path, labels: pd.DataFrame, names: list[str]) -> None:
        self.reader = VolumeReader(h5_path)
        self.names = names
        self.labels = torch.from_numpy(labels.loc[names].to_numpy(dtype=np.float32))

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"volume": self.reader(self.names[index]), "labels": self.labels[index]}
