"""Patient-wise folds: subtype stratification, its class-stratified fallback, the real error."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import StratifiedGroupKFold

from histommnet.breakhis import SUBTYPES, Patient, scan_breakhis
from histommnet.cli import analyze
from histommnet.config import CVConfig, HistoConfig
from histommnet.folds import fold_splits, make_folds
from medcore.data.splits import load_splits
from medcore.errors import DataError
from medcore.testing import call_main, random_image, write_png

# Patients per subtype: many ductal carcinomas, two of everything else (8 benign, 26 in all).
COUNTS = {"A": 2, "F": 2, "PT": 2, "TA": 2, "DC": 12, "LC": 2, "MC": 2, "PC": 2}


@pytest.fixture(scope="module")
def skewed_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BreakHis tree (one 8 px tile per magnification) with the ``COUNTS`` patients."""
    root = tmp_path_factory.mktemp("skewed") / "BreaKHis_v1" / "histology_slides" / "breast"
    n = 0
    for code, folder, label in SUBTYPES:
        cls, letter = ("benign", "B") if label == 0 else ("malignant", "M")
        for _ in range(COUNTS[code]):
            n += 1
            key = f"SOB_{letter}_{code}_14-{100 + n}"
            for mag in ("40X", "100X", "200X", "400X"):
                name = f"SOB_{letter}_{code}-14-{100 + n}-{mag[:-1]}-001.png"
                write_png(
                    root / cls / "SOB" / folder / key / mag / name, random_image((8, 8), seed=n)
                )
    return root


def _subtype_folds_lack_a_class(patients: list[Patient], seed: int, folds: int = 5) -> bool:
    """Reference: does scikit-learn's subtype-stratified split leave a test fold one class?"""
    labels = np.array([p.label for p in patients])
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # subtypes with fewer patients than folds
        split = list(
            splitter.split(
                np.zeros((len(patients), 1)),
                [p.subtype for p in patients],
                [p.patient_id for p in patients],
            )
        )
    return any(len(set(labels[test].tolist())) < 2 for _, test in split)


def _both_classes_everywhere(plan, patients: list[Patient]) -> None:
    labels = np.array([p.label for p in patients])
    groups = np.array([p.patient_id for p in patients])
    for fold in plan.folds:
        for name in ("train", "val", "test"):
            assert set(labels[fold[name]].tolist()) == {0, 1}, name
        parts = [set(groups[fold[name]]) for name in ("train", "val", "test")]
        assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    tested = np.concatenate([fold["test"] for fold in plan.folds])
    assert sorted(tested.tolist()) == list(range(len(patients)))


def test_subtype_folds_without_both_classes_fall_back_to_class(skewed_tree: Path, capsys) -> None:
    patients = scan_breakhis(skewed_tree, verbose=False).patients
    failing = [s for s in range(20) if _subtype_folds_lack_a_class(patients, s)]
    working = [s for s in range(20) if not _subtype_folds_lack_a_class(patients, s)]
    assert failing and working  # both situations occur for these patients
    plan = make_folds(patients, HistoConfig(seed=failing[0]))
    err = capsys.readouterr().err
    assert plan.stratify == "class"
    notes = [line for line in err.splitlines() if "cv.stratify_subtype" in line]
    assert len(notes) == 1, err
    # the line names why: the benign subtypes with fewer patients than the 5 folds
    assert "no benign patient" in notes[0] and "adenosis 2" in notes[0]
    assert "tubular_adenoma 2" in notes[0] and "ductal_carcinoma" not in notes[0]
    assert "stratifying by class" in notes[0] and plan.fallback in notes[0]
    _both_classes_everywhere(plan, patients)

    # where subtype stratification works it is kept, silently
    kept = make_folds(patients, HistoConfig(seed=working[0]))
    assert kept.stratify == "subtype" and kept.fallback is None
    assert "cv.stratify_subtype" not in capsys.readouterr().err
    _both_classes_everywhere(kept, patients)


def test_every_subtype_too_small_falls_back_too(tiny_tree: Path, capsys) -> None:
    patients = scan_breakhis(tiny_tree, verbose=False).patients  # two patients per subtype
    plan = make_folds(patients, HistoConfig(cv=CVConfig(folds=3)))
    assert plan.stratify == "class"
    assert "every subtype has fewer than 3 patients, at most 2" in plan.fallback
    assert capsys.readouterr().err.count("cv.stratify_subtype") == 1
    _both_classes_everywhere(plan, patients)


def test_the_saved_splits_record_the_fallback(skewed_tree: Path, tmp_path: Path, capsys) -> None:
    patients = scan_breakhis(skewed_tree, verbose=False).patients
    seed = next(s for s in range(20) if _subtype_folds_lack_a_class(patients, s))
    folds = fold_splits(tmp_path, patients, HistoConfig(seed=seed))
    saved = json.loads((tmp_path / "splits.json").read_text())
    assert saved["meta"]["stratify_subtype"] is True
    assert saved["meta"]["stratified_by"] == "class"
    assert "no benign patient" in saved["meta"]["stratify_fallback"]
    assert [f["test"].tolist() for f in load_splits(tmp_path / "splits.json")] == [
        f["test"].tolist() for f in folds
    ]
    # the analyze command reports the same folds and why
    out = tmp_path / "report"
    argv = ["--config", "breakhis.yaml", "--data-dir", str(skewed_tree), "--output-dir", str(out)]
    code, stdout, err = call_main(analyze, [*argv, "--set", f"seed={seed}"], capsys)
    assert code == 0, err
    assert "folds stratified by class (cannot stratify 5 folds by subtype" in stdout
    report = json.loads((out / "analysis.json").read_text())
    assert report["splits"]["stratified_by"] == "class"
    assert load_splits(out / "splits.json")[0]["test"].tolist() == folds[0]["test"].tolist()


def test_too_few_patients_even_by_class(tiny_tree: Path) -> None:
    """7 benign patients (two adenosis folders are one) cannot fill the test splits of 8 folds."""
    patients = scan_breakhis(tiny_tree, verbose=False).patients
    benign = {p.patient_id for p in patients if p.label == 0}
    assert len(benign) == 7
    with pytest.raises(DataError) as caught:
        make_folds(patients, HistoConfig(cv=CVConfig(folds=8)))
    why = str(caught.value)
    assert "lacks benign patients" in why and "too few patients (7 benign, 8 malignant)" in why
    assert "8 folds" in why
