"""Labels, preprocessed volumes and splits.

Shape notation: ``n`` studies, ``c`` label slots (the findings plus "no finding"), ``d`` slices,
``h``/``w`` pixels.

The label vector of a study is its 0/1 finding columns followed by a "no finding" slot that is
1 exactly when no finding is positive, so every study has at least one positive slot (the
graded relevance and the triplet miner both need one). A study's *label id* is the index of its
whole label vector among the distinct vectors of the dataset: studies with the same findings
share a label id.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ctretrieval.config import DataConfig, PreprocessConfig, SamplerConfig
from medcore.data.samplers import BalancedBatchSampler
from medcore.data.splits import multilabel_stratified_split
from medcore.errors import DataError
from medcore.io import read_csv
from medcore.volumes.store import VolumeStore, check_settings


def normalise_id(value: object, suffixes: list[str]) -> str:
    """A study id without surrounding blanks or a known file suffix (``CT_001.nii.gz`` -> ``CT_001``)."""
    text = str(value).strip()
    for suffix in sorted(suffixes, key=len, reverse=True):
        if suffix and text.lower().endswith(suffix.lower()):
            return text[: -len(suffix)]
    return text


@dataclass
class Labels:
    ids: list[str]
    y: np.ndarray  # [n, c] uint8, the last column is "no finding"
    class_names: list[str]

    @property
    def label_ids(self) -> np.ndarray:
        """``[n]`` int64: index of each study's label vector among the distinct vectors."""
        _, inverse = np.unique(self.y, axis=0, return_inverse=True)
        return inverse.reshape(-1).astype(np.int64)

    def subset(self, keep: list[str]) -> Labels:
        pos = {i: k for k, i in enumerate(self.ids)}
        rows = [pos[i] for i in keep]
        return Labels(list(keep), self.y[rows], self.class_names)


def read_labels(path: str | Path, cfg: DataConfig) -> Labels:
    """Read the labels CSV; rows whose finding values are not 0/1 are reported and dropped."""
    columns = [cfg.id_column, *cfg.finding_columns]
    frame = read_csv(path, required=columns, dtype={cfg.id_column: str})
    unused = [str(c) for c in frame.columns if c not in columns]
    if unused:
        # Perhaps a finding the config does not list (data.finding_columns): say so, go on.
        print(
            f"warning: {path}: column(s) not used: {', '.join(unused[:10])} "
            f"(findings read: {', '.join(cfg.finding_columns)})",
            file=sys.stderr,
        )
    frame[cfg.id_column] = [normalise_id(v, cfg.id_suffixes) for v in frame[cfg.id_column]]
    repeated = frame[cfg.id_column][frame[cfg.id_column].duplicated()].unique().tolist()
    if repeated:
        raise DataError(path, f"duplicated {cfg.id_column} value(s): {', '.join(repeated[:5])}")
    findings = frame[cfg.finding_columns].apply(lambda col: col.map(_as_binary))
    bad = findings.isna().any(axis=1).to_numpy()
    if bad.any():
        shown = ", ".join(frame[cfg.id_column][bad].astype(str).tolist()[:5])
        print(
            f"warning: {path}: dropped {int(bad.sum())} row(s) with values other than 0/1 in "
            f"{', '.join(cfg.finding_columns)} (e.g. {shown})",
            file=sys.stderr,
        )
    if bad.all():
        raise DataError(path, "no row has 0/1 values in every finding column")
    ids = frame[cfg.id_column][~bad].astype(str).tolist()
    y = findings[~bad].to_numpy(dtype=np.uint8)
    no_finding = (y.sum(1) == 0).astype(np.uint8)[:, None]
    return Labels(
        ids, np.concatenate([y, no_finding], axis=1), [*cfg.finding_columns, cfg.no_finding_name]
    )


def _as_binary(value: object) -> float | None:
    """0/1 (also "0", "1.0", booleans) -> 0.0/1.0; anything else -> None."""
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if number in (0.0, 1.0) else None


def match_ids(
    labels: Labels, volume_ids: list[str], suffixes: list[str]
) -> tuple[Labels, dict[str, str]]:
    """The labelled studies that have a volume (in label order) and a map label id -> volume key.

    Ids are compared after :func:`normalise_id`. Studies only on one side are reported on stderr;
    no study in common is a DataError.
    """
    keys = {normalise_id(v, suffixes): v for v in volume_ids}
    common = [i for i in labels.ids if i in keys]
    unlabelled = sorted(set(keys) - set(labels.ids))
    no_volume = [i for i in labels.ids if i not in keys]
    if not common:
        raise DataError(
            "labels vs volumes",
            f"no study id in common (labels e.g. {', '.join(labels.ids[:3])}; volumes e.g. {', '.join(sorted(keys)[:3])})",
        )
    if no_volume:
        print(
            f"warning: {len(no_volume)} labelled stud(ies) have no volume, left out (e.g. {', '.join(no_volume[:5])})",
            file=sys.stderr,
        )
    if unlabelled:
        print(
            f"warning: {len(unlabelled)} volume(s) have no labels, left out (e.g. {', '.join(unlabelled[:5])})",
            file=sys.stderr,
        )
    return labels.subset(common), {i: keys[i] for i in common}


def open_volumes(h5_path: str | Path) -> VolumeStore:
    """The volumes store at ``h5_path``: an HDF5 file, or a folder of the part files that
    ctretrieval-preprocess shards wrote, read as one (:mod:`medcore.volumes.store`)."""
    from ctretrieval.preprocess import STORE_KIND

    path = Path(h5_path)
    if not path.exists():
        raise DataError(path, "volumes file not found (run ctretrieval-preprocess first)")
    store = VolumeStore(path)
    if store.is_store and store.attrs.get("kind") not in (None, STORE_KIND):
        raise DataError(path, f"not a ctretrieval volumes file (kind {store.attrs.get('kind')})")
    if not store.names and not store.is_store:
        raise DataError(path, "not a ctretrieval volumes file (no /volumes group)")
    return store


def volume_ids(h5_path: str | Path) -> list[str]:
    """The study ids of a volumes store, after checking (from the metadata) that every volume
    is a uint8 ``[d, h, w]`` array of one common shape, so no batch fails halfway through a run.

    A store marks finished volumes complete; a hand-written file has no marks (all its
    ``/volumes`` datasets are taken)."""
    import h5py

    store = open_volumes(h5_path)
    ids = sorted(store.names)
    first: tuple[str, tuple[int, ...]] | None = None
    try:
        for key in ids:
            item = store.dataset(key)
            where = f"{store.names[key]}:{key}"
            if not isinstance(item, h5py.Dataset) or item.ndim != 3:
                shape = getattr(item, "shape", "a group")
                raise DataError(where, f"expected a [slices, h, w] volume, got {shape}")
            if item.dtype != np.uint8:
                raise DataError(
                    where,
                    f"expected uint8 volumes (as ctretrieval-preprocess writes), got {item.dtype}",
                )
            if first is None:
                first = (key, item.shape)
            elif item.shape != first[1]:
                raise DataError(
                    store.path,
                    f"volumes of different shapes: {first[0]} {first[1]}, {key} {item.shape}",
                )
    except OSError as exc:
        raise DataError(store.path, f"not a readable HDF5 file ({str(exc)[:100]})") from None
    finally:
        store.close()
    return ids


class CTVolumeDataset(Dataset):
    """Studies of a volumes store: ``{"volume": uint8 [d, h, w], "labels": [c], "label_id", "index"}``.

    Volumes stay uint8 until they reach the device (a quarter of the float32 transfer). The
    store's files are opened lazily in each DataLoader worker (an h5py handle must not cross a
    fork).
    """

    def __init__(
        self, h5_path: str | Path, keys: list[str], y: np.ndarray, label_ids: np.ndarray
    ) -> None:
        self.h5_path = str(h5_path)
        self.keys = list(keys)
        self.y = torch.as_tensor(np.asarray(y), dtype=torch.float32)
        self.label_ids = torch.as_tensor(np.asarray(label_ids), dtype=torch.int64)
        self.store = open_volumes(h5_path)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        volume = self.store.read(self.keys[index])
        return {
            "volume": torch.from_numpy(np.ascontiguousarray(volume, dtype=np.uint8)),
            "labels": self.y[index],
            "label_id": self.label_ids[index],
            "index": torch.tensor(index, dtype=torch.int64),
        }


def make_splits(
    y: np.ndarray, test_frac: float, train_eval_frac: float, seed: int
) -> dict[str, np.ndarray]:
    """Multi-label stratified ``train`` / ``test``, and ``train_eval``: a stratified subset of ``train``."""
    parts = multilabel_stratified_split(y, {"train": 1.0 - test_frac, "test": test_frac}, seed)
    train = parts["train"]
    if train_eval_frac >= 1.0:
        train_eval = train
    else:
        sub = multilabel_stratified_split(
            y[train], {"rest": 1.0 - train_eval_frac, "train_eval": train_eval_frac}, seed
        )
        train_eval = np.sort(train[sub["train_eval"]])
    return {"train": train, "train_eval": train_eval, "test": parts["test"]}


def _under(root: Path | None, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() or root is None else root / path


def demo_volumes(
    cfg: DataConfig, prep: PreprocessConfig, show_progress: bool = True
) -> tuple[Path, Path]:
    """The built-in demo: DICOM series generated once (cached), preprocessed with ``prep`` (cached too)."""
    from ctretrieval.preprocess import preprocess
    from ctretrieval.synthetic import generate_demo
    from medcore.data.demo_cache import ensure_demo_data

    n, s = cfg.demo_studies, cfg.demo_slices
    root = ensure_demo_data(
        "ctretrieval",
        lambda d: generate_demo(d, n_studies=n, slices=(s, s + s // 2)),
        version=f"v2-n{n}-s{s}",
    )
    d, h, w = prep.target_shape
    lo, hi = prep.hu_window
    spacing = (
        "" if prep.target_spacing is None else "_" + "x".join(f"{v:g}" for v in prep.target_spacing)
    )
    h5 = root / "preprocessed" / f"volumes_{d}x{h}x{w}_{lo:g}_{hi:g}{spacing}.store1.h5"
    if not h5.is_file():
        preprocess(root / "dicom", h5, prep, show_progress=show_progress)
    return h5, root / "labels.csv"


def locate_data(
    cfg: DataConfig, prep: PreprocessConfig, show_progress: bool = True
) -> tuple[Path, Path]:
    """(volumes HDF5, labels CSV) of ``cfg``: the demo when ``data_dir`` is None."""
    if cfg.data_dir is None:
        return demo_volumes(cfg, prep, show_progress)
    root = Path(cfg.data_dir)
    if not root.is_dir():
        raise DataError(root, "data directory not found")
    return _under(root, cfg.volumes), _under(root, cfg.labels_csv)


@dataclass
class StudyTable:
    """The studies a run uses: labels matched with volumes, ready for datasets and splits."""

    h5: Path
    labels: Labels
    keys: list[str]  # HDF5 dataset name of each study

    def dataset(self, rows: np.ndarray | None = None) -> CTVolumeDataset:
        rows = np.arange(len(self.keys)) if rows is None else np.asarray(rows)
        label_ids = self.labels.label_ids
        return CTVolumeDataset(
            self.h5, [self.keys[i] for i in rows], self.labels.y[rows], label_ids[rows]
        )


def check_store(h5: str | Path, prep: PreprocessConfig) -> None:
    """A ConfigError unless the volumes file was written with ``prep``'s settings."""
    from ctretrieval.preprocess import store_settings

    check_settings(
        h5,
        store_settings(prep),
        hint="set preprocess.* to the store's values or preprocess again with these",
    )


def load_studies(cfg: DataConfig, prep: PreprocessConfig, show_progress: bool = True) -> StudyTable:
    h5, csv = locate_data(cfg, prep, show_progress)
    if Path(h5).exists():
        check_store(h5, prep)
    labels = read_labels(csv, cfg)
    matched, keys = match_ids(labels, volume_ids(h5), cfg.id_suffixes)
    return StudyTable(h5, matched, [keys[i] for i in matched.ids])


def balanced_sampler(
    y: np.ndarray,
    label_ids: np.ndarray,
    cfg: SamplerConfig,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    batches_per_epoch: int | None = None,
) -> BalancedBatchSampler:
    """Triplet batches: ``cfg.n_classes`` mutually compatible label ids x ``cfg.n_samples`` studies.

    ``y``: the multi-hot label slots (label ids sharing no positive finding are compatible).
    An epoch is ``len // (batch size x world size)`` batches per rank (at least one) unless
    ``batches_per_epoch`` is given (the trainer's ``max_steps_per_epoch``).
    """
    batch = cfg.n_classes * cfg.n_samples
    return BalancedBatchSampler(
        label_ids,
        cfg.n_samples,
        cfg.n_classes,
        labels=y,
        seed=seed,
        rank=rank,
        world_size=world_size,
        batches_per_epoch=batches_per_epoch or max(1, len(label_ids) // (batch * world_size)),
    )
