"""Patient-wise cross-validation folds: making them (stratified by subtype, else by class, each
with a nested validation split), saving them to a run's ``splits.json`` and reading them back.

The unit of splitting is the patient folder, so no patient's images are in two splits.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histommnet.breakhis import CLASSES, SUBTYPE_NAMES, SUBTYPES, Patient
from histommnet.config import HistoConfig
from medcore.data.splits import (
    SplitLeakError,
    check_no_leak,
    load_or_make_splits,
    load_splits,
    nested_validation,
    stratified_group_kfold,
)
from medcore.errors import DataError


@dataclass
class FoldPlan:
    """Patient-wise folds (indices into the patients) and what they are stratified by."""

    folds: list[dict[str, np.ndarray]]
    stratify: str  # "subtype" or "class"
    fallback: str | None = None  # why subtype stratification was given up

    def meta(self) -> dict[str, Any]:
        """What ``splits.json`` records about the stratification."""
        return {"stratified_by": self.stratify, "stratify_fallback": self.fallback}


def _patient_counts(values: np.ndarray, groups: np.ndarray) -> dict[int, int]:
    """Patients (splitting groups) per value of ``values``."""
    return {int(v): len(set(groups[values == v].tolist())) for v in sorted(set(values.tolist()))}


def _split_folds(
    strata: np.ndarray, labels: np.ndarray, groups: np.ndarray, cfg: HistoConfig
) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """Outer folds stratified on ``strata``, each with a class-stratified nested validation
    split, and the splitters' warnings; ValueError when the strata cannot fill the folds."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outer = stratified_group_kfold(strata, groups, n_splits=cfg.cv.folds, seed=cfg.seed)
        folds = []
        for i, fold in enumerate(outer):
            train, val = nested_validation(
                fold["train"], labels, groups, cfg.cv.val_fraction, seed=cfg.seed + i
            )
            folds.append({"train": train, "val": val, "test": fold["test"]})
    return folds, list(dict.fromkeys(str(w.message) for w in caught))


def _missing_class(
    folds: list[dict[str, np.ndarray]], labels: np.ndarray
) -> tuple[int, str, int] | None:
    """The first (fold, split, absent class) of a split without both classes, else None."""
    for i, split in enumerate(folds):
        for name, idx in split.items():
            present = set(labels[idx].tolist())
            for label in range(len(CLASSES)):
                if label not in present:
                    return i, name, label
    return None


def make_folds(patients: list[Patient], cfg: HistoConfig) -> FoldPlan:
    """Patient-wise stratified folds with a nested validation split; indices into ``patients``.

    Stratified by subtype when ``cv.stratify_subtype``, unless that cannot give every split
    both classes (subtypes with fewer patients than folds): then by class, said in one line.
    A DataError only when class-stratified folds cannot give every split both classes either.
    """
    labels = np.array([p.label for p in patients])
    subtypes = np.array([p.subtype for p in patients])
    groups = np.array([p.patient_id for p in patients])
    n_groups = len(set(groups.tolist()))
    if cfg.cv.folds < 2 or n_groups < cfg.cv.folds:
        raise DataError(
            "cv.folds",
            f"{cfg.cv.folds} folds need at least 2 and at most {n_groups} (the patients)",
        )
    k = cfg.cv.folds
    per_class = _patient_counts(labels, groups)
    fallback = None
    if cfg.cv.stratify_subtype:
        per_subtype = _patient_counts(subtypes, groups)
        try:
            folds, notes = _split_folds(subtypes, labels, groups, cfg)
            gap = _missing_class(folds, labels)
        except ValueError:  # every subtype has fewer patients than folds
            gap = None
            why = f"every subtype has fewer than {k} patients, at most {max(per_subtype.values())}"
        else:
            if gap is None:
                _check_folds(folds, groups)
                for note in notes:
                    print(f"note: splitting: {note}", file=sys.stderr)
                return FoldPlan(folds, "subtype")
            fold, split, label = gap
            scarce = ", ".join(
                f"{SUBTYPE_NAMES[s]} {n}"
                for s, n in per_subtype.items()
                if SUBTYPES[s][2] == label and n < k
            )
            why = f"fold {fold}'s {split} split would get no {CLASSES[label]} patient; " + (
                f"{CLASSES[label]} subtypes with fewer than {k} patients: {scarce}"
                if scarce
                else f"{per_class.get(label, 0)} {CLASSES[label]} patients"
            )
        fallback = f"cannot stratify {k} folds by subtype ({why})"
        print(
            f"note: cv.stratify_subtype: {fallback}; stratifying by class instead "
            "(the folds stay patient-wise)",
            file=sys.stderr,
        )
    counts = ", ".join(f"{per_class.get(c, 0)} {name}" for c, name in enumerate(CLASSES))
    need = f"too few patients ({counts}) for {k} folds and a {cfg.cv.val_fraction:.0%} validation split"
    try:
        folds, notes = _split_folds(labels, labels, groups, cfg)
    except ValueError as exc:
        raise DataError("cv.folds", f"{exc} ({need})") from None
    gap = _missing_class(folds, labels)
    if gap is not None:
        fold, split, label = gap
        raise DataError(
            f"fold {fold}", f"the {split} split lacks {CLASSES[label]} patients: {need}"
        )
    _check_folds(folds, groups)
    for note in notes:
        print(f"note: splitting: {note}", file=sys.stderr)
    return FoldPlan(folds, "class", fallback)


def _check_folds(folds: list[dict[str, np.ndarray]], groups: np.ndarray) -> None:
    for i, split in enumerate(folds):
        try:
            check_no_leak(split, groups)
        except SplitLeakError as exc:
            raise DataError(f"fold {i}", f"patient leak between splits ({exc})") from None


def read_folds(path: Path, patients: list[Patient]) -> list[dict[str, np.ndarray]]:
    """A run's saved ``splits.json``, checked against the patients found in the data now."""
    try:
        return load_splits(path, ids=[p.key for p in patients])
    except ValueError as exc:
        raise DataError(path, str(exc).removeprefix(f"{path}: ")) from None


def fold_splits(
    run_dir: Path, patients: list[Patient], cfg: HistoConfig, is_main: bool = True
) -> list[dict[str, np.ndarray]]:
    """The folds, saved to ``splits.json``; a resumed run reuses (and checks) the saved ones."""
    meta = {
        "seed": cfg.seed,
        "folds": cfg.cv.folds,
        "val_fraction": cfg.cv.val_fraction,
        "stratify_subtype": cfg.cv.stratify_subtype,
        "unit": "patient folder",
    }

    def make() -> list[dict[str, np.ndarray]]:
        plan = make_folds(patients, cfg)
        meta.update(plan.meta())  # saved with the folds, after make() returns
        return plan.folds

    return load_or_make_splits(
        run_dir / "splits.json", make, ids=[p.key for p in patients], meta=meta, is_main=is_main
    )
