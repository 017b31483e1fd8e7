"""CT-RATE on disk: the Hugging Face download, and the flat folder of the original work.

The download (dataset repository ``ibrahimhamamci/CT-RATE``) keeps everything under ``dataset/``::

    dataset/train/train_<N>/train_<N>_<a>/train_<N>_<a>_<k>.nii.gz    (valid/ alike)
    dataset/train_fixed/..., dataset/valid_fixed/...                  (the corrected release)
    dataset/metadata/{train,validation}_metadata.csv
    dataset/radiology_text_reports/{train,validation}_reports.csv
    dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv

``--data-dir`` may name the repository's root or its ``dataset/`` folder. The flat folder holds the
same CSV names side by side in ``<dir>/ct_rate/`` (or in ``<dir>`` itself), NIfTI volumes under
``<dir>/ct_volumes/`` and the preprocessed ``<dir>/ct_volumes.h5``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medcore.errors import DataError

Split = Literal["train", "valid"]
Table = Literal["reports", "labels", "metadata"]
SPLITS: tuple[Split, ...] = ("train", "valid")
# table -> (its folder in the download, file name per split)
TABLES: dict[str, tuple[str, dict[str, str]]] = {
    "reports": (
        "radiology_text_reports",
        {"train": "train_reports.csv", "valid": "validation_reports.csv"},
    ),
    "labels": (
        "multi_abnormality_labels",
        {"train": "train_predicted_labels.csv", "valid": "valid_predicted_labels.csv"},
    ),
    "metadata": ("metadata", {"train": "train_metadata.csv", "valid": "validation_metadata.csv"}),
}
TABLE_FOLDERS = tuple(folder for folder, _ in TABLES.values())
VOLUME_FOLDERS = tuple(f"{split}{fixed}" for split in SPLITS for fixed in ("", "_fixed"))


@dataclass(frozen=True)
class CTRate:
    """Where the tables and volumes of one CT-RATE copy are.

    ``root`` is the folder the user named; ``tables`` the folder holding the CSVs (the
    download's ``dataset/``, or the flat folder); ``download`` tells the two layouts apart.
    """

    root: Path
    tables: Path
    download: bool

    def table(self, kind: Table, split: Split) -> Path:
        """The CSV of ``kind`` (reports, labels, metadata) for ``split`` (train, valid)."""
        folder, names = TABLES[kind]
        return (self.tables / folder if self.download else self.tables) / names[split]

    def volume_folders(self) -> dict[str, Path]:
        """The NIfTI folder of each split present (flat layout: one folder, ``"all"``).

        Where the download has both ``<split>/`` and ``<split>_fixed/``, the corrected release
        is taken and a note names the folder left aside.
        """
        if not self.download:
            folder = self.root / "ct_volumes"
            return {"all": folder} if folder.is_dir() else {}
        found = {}
        for split in SPLITS:
            plain, fixed = self.tables / split, self.tables / f"{split}_fixed"
            if fixed.is_dir():
                found[split] = fixed
                if plain.is_dir():
                    print(
                        f"note: {self.tables}: using {fixed.name}/ (the corrected release); "
                        f"{plain.name}/ is left aside (name it with --ct-data-path to use it)",
                        file=sys.stderr,
                    )
            elif plain.is_dir():
                found[split] = plain
        return found

    def describe(self) -> str:
        return f"the CT-RATE download at {self.tables}" if self.download else str(self.tables)


def _is_download(folder: Path) -> bool:
    return any((folder / name).is_dir() for name in TABLE_FOLDERS)


def find_ctrate(data_dir: str | Path) -> CTRate:
    """The CT-RATE copy under ``data_dir``: the download (its root or ``dataset/``) or a flat
    folder. A folder inside the download (its reports folder, say) is refused: the tables that
    list the same volumes must be used together."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(root, "data directory not found")
    for tables in (root / "dataset", root):
        if _is_download(tables):
            return CTRate(root, tables, download=True)
    if root.name in (*TABLE_FOLDERS, *VOLUME_FOLDERS) and _is_download(root.parent):
        parent = root.parent
        raise DataError(
            root,
            f"a folder inside the CT-RATE download: pass the download ({parent}) as --data-dir, "
            "so that its reports, labels and metadata are used together",
        )
    tables = root / "ct_rate" if (root / "ct_rate").is_dir() else root
    return CTRate(root, tables, download=False)
