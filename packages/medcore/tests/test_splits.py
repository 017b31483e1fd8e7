"""Seeded splits: ratios, determinism, stratification, group disjointness and persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from medcore.data.splits import (
    SplitLeakError,
    check_no_leak,
    group_split,
    load_splits,
    multilabel_stratified_split,
    nested_validation,
    save_splits,
    stratified_group_kfold,
    stratified_split,
)

RATIOS = {"train": 0.7, "val": 0.15, "test": 0.15}


def _assert_partition(splits: dict[str, np.ndarray], n: int) -> None:
    joined = np.concatenate(list(splits.values()))
    assert np.array_equal(np.sort(joined), np.arange(n))


@pytest.fixture(scope="module")
def cohort():
    """600 samples from 150 patients of 1-7 samples, with a patient-level binary label."""
    rng = np.random.default_rng(0)
    per_patient = rng.integers(1, 8, size=150)
    groups = np.repeat([f"p{i:03d}" for i in range(150)], per_patient)
    patient_label = (rng.random(150) < 0.3).astype(int)
    y = np.repeat(patient_label, per_patient)
    return y, groups


def test_stratified_split_ratios_and_proportions():
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    splits = stratified_split(labels, RATIOS, seed=0)
    assert list(splits) == list(RATIOS)
    _assert_partition(splits, 1000)
    for name, ratio in RATIOS.items():
        assert abs(len(splits[name]) - ratio * 1000) <= 2
        shares = np.bincount(labels[splits[name]], minlength=3) / len(splits[name])
        np.testing.assert_allclose(shares, [0.6, 0.3, 0.1], atol=0.01)


def test_stratified_split_is_deterministic_per_seed():
    labels = np.random.default_rng(1).integers(0, 3, size=200)
    first, again = (
        stratified_split(labels, RATIOS, seed=5),
        stratified_split(labels, RATIOS, seed=5),
    )
    other = stratified_split(labels, RATIOS, seed=6)
    assert all(np.array_equal(first[k], again[k]) for k in RATIOS)
    assert not np.array_equal(first["test"], other["test"])


def test_stratified_split_falls_back_for_a_singleton_class():
    labels = np.array([0] * 30 + [1] * 30 + [2])
    with pytest.warns(UserWarning, match="cannot stratify"):
        splits = stratified_split(labels, {"train": 0.8, "test": 0.2}, seed=0)
    _assert_partition(splits, 61)


@pytest.mark.parametrize(
    "bad", [{"train": 1.0}, {"train": 0.8, "test": 0.3}, {"a": 1.2, "b": -0.2}]
)
def test_ratios_are_validated(bad):
    with pytest.raises(ValueError, match="ratios"):
        stratified_split(np.zeros(20), bad, seed=0)


def test_too_few_samples_is_a_plain_error():
    with pytest.raises(ValueError, match="cannot split 2 samples into train, val, test"):
        stratified_split(np.zeros(2), RATIOS, seed=0)


@pytest.mark.filterwarnings("error")  # no "cannot stratify" warning before the error
def test_a_split_that_would_leave_a_part_empty_is_a_plain_error():
    # Two samples, 60 % taken: scikit-learn would leave the train part empty.
    with pytest.raises(ValueError, match=r"fraction 0\.6 of 2 samples"):
        stratified_split(np.array([0, 1]), {"train": 0.4, "val": 0.6}, seed=0)


def test_multilabel_stratification_beats_a_random_split():
    rng = np.random.default_rng(2)
    Y = (rng.random((400, 8)) < np.linspace(0.03, 0.4, 8)).astype(int)
    prevalence = Y.mean(0)

    def deviation(splits):
        return np.mean([np.abs(Y[idx].mean(0) - prevalence).max() for idx in splits.values()])

    stratified, random = [], []
    for seed in range(3):
        splits = multilabel_stratified_split(Y, RATIOS, seed=seed)
        _assert_partition(splits, 400)
        for name, ratio in RATIOS.items():
            assert abs(len(splits[name]) - ratio * 400) <= 2
        again = multilabel_stratified_split(Y, RATIOS, seed=seed)
        assert all(np.array_equal(splits[k], again[k]) for k in RATIOS)
        stratified.append(deviation(splits))
        rest, test = train_test_split(np.arange(400), test_size=0.15, random_state=seed)
        train, val = train_test_split(rest, test_size=0.15 / 0.85, random_state=seed)
        random.append(deviation({"train": train, "val": val, "test": test}))
    assert np.mean(stratified) < 0.6 * np.mean(random)
    assert np.mean(stratified) < 0.02


@pytest.mark.parametrize("seed", range(6))
def test_group_split_never_leaks(cohort, seed):
    y, groups = cohort
    splits = group_split(groups, RATIOS, seed=seed, stratify=y)
    _assert_partition(splits, len(groups))
    check_no_leak(splits, groups)
    for name, ratio in RATIOS.items():
        # Ratios hold for patients; the stratified label keeps its patient-level share.
        patients = np.unique(groups[splits[name]])
        assert abs(len(patients) - ratio * 150) <= 2
        assert abs(y[splits[name]].mean() - y.mean()) < 0.1


def test_group_split_is_deterministic(cohort):
    _, groups = cohort
    first = group_split(groups, RATIOS, seed=3)
    again = group_split(groups, RATIOS, seed=3)
    assert all(np.array_equal(first[k], again[k]) for k in RATIOS)


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_stratified_group_kfold_never_leaks(cohort, seed):
    y, groups = cohort
    folds = stratified_group_kfold(y, groups, n_splits=5, seed=seed)
    assert len(folds) == 5
    for fold in folds:
        _assert_partition(fold, len(y))
        check_no_leak(fold, groups)
    # Every sample is tested exactly once.
    assert np.array_equal(np.sort(np.concatenate([f["test"] for f in folds])), np.arange(len(y)))
    again = stratified_group_kfold(y, groups, n_splits=5, seed=seed)
    assert all(np.array_equal(a["test"], b["test"]) for a, b in zip(folds, again, strict=True))


@pytest.mark.parametrize("seed", [0, 7])
def test_nested_validation_stays_inside_the_fold(cohort, seed):
    y, groups = cohort
    fold = stratified_group_kfold(y, groups, n_splits=5, seed=seed)[0]
    train, val = nested_validation(fold["train"], y, groups, val_fraction=0.3, seed=seed)
    assert np.array_equal(np.sort(np.concatenate([train, val])), fold["train"])
    check_no_leak({"train": train, "val": val, "test": fold["test"]}, groups)
    val_patients, fold_patients = np.unique(groups[val]), np.unique(groups[fold["train"]])
    assert abs(len(val_patients) - 0.3 * len(fold_patients)) <= 2


def test_check_no_leak_names_groups_and_splits():
    groups = np.array(["a", "a", "b", "c", "c"])
    with pytest.raises(SplitLeakError, match=r"'a'.*'train'.*'test'") as info:
        check_no_leak({"train": np.array([0, 2]), "test": np.array([1, 3, 4])}, groups)
    assert isinstance(info.value, ValueError)
    check_no_leak({"train": np.array([0, 1, 2]), "test": np.array([3, 4])}, groups)


def test_save_load_round_trip(tmp_path):
    single = {"train": np.array([0, 2, 5]), "test": np.array([1, 3])}
    path = tmp_path / "nested" / "splits.json"
    save_splits(path, single, meta={"seed": np.int64(3), "ratios": {"train": 0.6}})
    loaded, meta = load_splits(path, with_meta=True)
    assert list(loaded) == ["train", "test"]
    assert all(np.array_equal(loaded[k], single[k]) and loaded[k].dtype == np.int64 for k in single)
    assert meta == {"seed": 3, "ratios": {"train": 0.6}}
    assert [p.name for p in path.parent.iterdir()] == ["splits.json"]  # no temporary left over

    folds = [
        {"train": np.array([0, 1]), "test": np.array([2])},
        {"train": np.array([2]), "test": np.array([], dtype=int)},
    ]
    save_splits(path, folds)
    loaded = load_splits(path)
    assert isinstance(loaded, list) and len(loaded) == 2
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(folds, loaded, strict=True) for k in a)


def test_stored_ids_detect_a_reordered_dataset(tmp_path):
    ids = np.array(["s0", "s1", "s2", "s3"])
    path = tmp_path / "splits.json"
    save_splits(path, {"train": np.array([0, 1]), "test": np.array([2, 3])}, ids=ids)
    assert json.loads(path.read_text())["ids"]["test"] == ["s2", "s3"]
    load_splits(path, ids=ids)
    with pytest.raises(ValueError, match="reordered"):
        load_splits(path, ids=ids[::-1])


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"splits": {"train": [0]}}),
        json.dumps({"format": "medcore.data.splits", "version": 99, "splits": {"train": [0]}}),
        json.dumps({"format": "medcore.data.splits", "version": 1, "splits": {"train": [0.5]}}),
        json.dumps({"format": "medcore.data.splits", "version": 1, "splits": {"train": [-1]}}),
        json.dumps({"format": "medcore.data.splits", "version": 1, "splits": []}),
        json.dumps({"format": "medcore.data.splits", "version": 1, "splits": {"train": "0,1"}}),
    ],
)
def test_malformed_files_raise_value_error(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"bad\.json"):
        load_splits(path)


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "splits.json"
    save_splits(path, {"train": np.array([0]), "test": np.array([1])})
    before = path.read_text()
    with pytest.raises(TypeError):
        save_splits(path, {"train": np.array([1])}, meta={"bad": object()})
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["splits.json"]


def test_load_or_make_splits_makes_once_then_reloads_and_refuses_changed_data(tmp_path):
    from medcore.data.splits import load_or_make_splits
    from medcore.errors import DataError

    ids = [f"s{i}" for i in range(10)]
    calls = []

    def make():
        calls.append(1)
        return stratified_split(np.array([0, 1] * 5), {"train": 0.6, "val": 0.4}, seed=3)

    path = tmp_path / "splits.json"
    first = load_or_make_splits(path, make, ids=ids, meta={"seed": 3})
    again = load_or_make_splits(path, make, ids=ids)
    assert len(calls) == 1
    assert {k: v.tolist() for k, v in again.items()} == {k: v.tolist() for k, v in first.items()}
    assert json.loads(path.read_text())["meta"] == {"seed": 3}

    other_rank = tmp_path / "rank1.json"
    load_or_make_splits(other_rank, make, ids=ids, is_main=False)
    assert not other_rank.exists() and len(calls) == 2

    with pytest.raises(DataError, match=r"reordered or changed.*another --output-dir"):
        load_or_make_splits(path, make, ids=list(reversed(ids)))
