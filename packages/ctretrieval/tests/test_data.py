from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctretrieval.config import DataConfig, PreprocessConfig
from ctretrieval.data import load_studies, make_splits, match_ids, normalise_id, read_labels
from medcore.errors import DataError


def test_labels_with_no_finding_slot_and_bad_rows(tmp_path: Path, capsys) -> None:
    pd.DataFrame(
        {
            "CT": ["a.nii.gz", "b", "c", "d", "e"],
            "condensacion": [1, 0, 0, 2, 1],
            "nodulos": [0, 0, 1, 0, "x"],
            "quistes": [1, 0, 1, 0, 0],
        }
    ).to_csv(tmp_path / "labels.csv", index=False)
    labels = read_labels(tmp_path / "labels.csv", DataConfig())
    assert labels.ids == ["a", "b", "c"]
    assert labels.class_names == ["condensacion", "nodulos", "quistes", "sin_hallazgos"]
    np.testing.assert_array_equal(labels.y, [[1, 0, 1, 0], [0, 0, 0, 1], [0, 1, 1, 0]])
    assert (labels.y.sum(1) >= 1).all()
    err = capsys.readouterr().err
    assert "dropped 2 row(s)" in err and "d, e" in err


def test_label_ids_group_identical_vectors(tmp_path: Path) -> None:
    pd.DataFrame(
        {
            "CT": list("abcd"),
            "condensacion": [1, 0, 1, 0],
            "nodulos": [0, 1, 0, 0],
            "quistes": [0, 0, 0, 0],
        }
    ).to_csv(tmp_path / "l.csv", index=False)
    ids = read_labels(tmp_path / "l.csv", DataConfig()).label_ids
    assert ids[0] == ids[2] and len(set(ids.tolist())) == 3


def test_missing_column_is_one_line_error(tmp_path: Path) -> None:
    pd.DataFrame({"CT": ["a"], "condensacion": [1]}).to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(DataError, match="missing column"):
        read_labels(tmp_path / "l.csv", DataConfig())


def test_match_ids_reports_and_refuses_nothing_in_common(tmp_path: Path, capsys) -> None:
    pd.DataFrame(
        {
            "CT": ["a", "b", "zz"],
            "condensacion": [1, 0, 1],
            "nodulos": [0, 0, 0],
            "quistes": [0, 1, 0],
        }
    ).to_csv(tmp_path / "l.csv", index=False)
    labels = read_labels(tmp_path / "l.csv", DataConfig())
    matched, keys = match_ids(labels, ["a.nii.gz", "b", "orphan"], DataConfig().id_suffixes)
    assert matched.ids == ["a", "b"] and keys == {"a": "a.nii.gz", "b": "b"}
    err = capsys.readouterr().err
    assert "zz" in err and "orphan" in err
    with pytest.raises(DataError, match="no study id in common"):
        match_ids(labels, ["q", "r"], [])


def test_normalise_id() -> None:
    assert normalise_id(" CT_01.nii.gz ", [".nii", ".nii.gz"]) == "CT_01"
    assert normalise_id("CT_01", [".nii"]) == "CT_01"


def test_splits_are_stratified_and_train_eval_inside_train() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((200, 4)) < [0.4, 0.3, 0.2, 0.3]).astype(np.uint8)
    s = make_splits(y, 0.2, 0.25, seed=1)
    assert set(s["train_eval"]) <= set(s["train"])
    assert not set(s["train"]) & set(s["test"])
    assert len(s["train"]) + len(s["test"]) == 200
    assert len(s["test"]) == pytest.approx(40, abs=2) and len(s["train_eval"]) == pytest.approx(
        40, abs=2
    )
    np.testing.assert_allclose(y[s["test"]].mean(0), y.mean(0), atol=0.05)
    np.testing.assert_allclose(y[s["train_eval"]].mean(0), y.mean(0), atol=0.05)
    assert make_splits(y, 0.2, 0.25, seed=1)["test"].tolist() == s["test"].tolist()


def test_load_studies_and_dataset(small_dataset: Path) -> None:
    table = load_studies(DataConfig(data_dir=str(small_dataset)), PreprocessConfig())
    assert len(table.keys) == 30
    item = table.dataset([3])[0]
    assert item["volume"].dtype.is_floating_point is False and item["volume"].shape == (6, 32, 32)
    assert item["labels"].shape == (4,)


def test_missing_volumes_file(tmp_path: Path) -> None:
    pd.DataFrame({"CT": ["a"], "condensacion": [1], "nodulos": [0], "quistes": [0]}).to_csv(
        tmp_path / "labels.csv"
    )
    with pytest.raises(DataError, match="ctretrieval-preprocess"):
        load_studies(DataConfig(data_dir=str(tmp_path)), PreprocessConfig())
