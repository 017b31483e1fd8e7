from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score

from binensemble.ensemble import (
    align,
    analyse,
    read_probs,
    soft_vote,
    vote_files,
    write_predictions,
)
from medcore.errors import DataError, UserError


def test_soft_vote_arithmetic() -> None:
    a = np.array([[0.9, 0.1], [0.4, 0.6], [0.55, 0.45]])
    b = np.array([[0.3, 0.7], [0.2, 0.8], [0.35, 0.65]])
    np.testing.assert_allclose(soft_vote([a, b]), (a + b) / 2)
    np.testing.assert_allclose(soft_vote([a, b], [3, 1]), 0.75 * a + 0.25 * b)
    # Weighted 3:1 the first image stays class 0 (0.75), equal weights make the third class 1.
    assert soft_vote([a, b], [3, 1]).argmax(1).tolist() == [0, 1, 0]
    assert soft_vote([a, b]).argmax(1).tolist() == [0, 1, 1]
    with pytest.raises(UserError):
        soft_vote([a, b], [1.0])
    with pytest.raises(UserError):
        soft_vote([a, b], [-1.0, 2.0])


def _write(tmp_path, name, ids, p1, target=None):
    probs = np.stack([1 - np.asarray(p1), np.asarray(p1)], 1)
    return write_predictions(tmp_path, name, ids, probs, ["normal", "disease"], target)[1]


def test_files_are_aligned_by_image_id(tmp_path) -> None:
    a = _write(tmp_path, "a", ["1", "2", "3"], [0.2, 0.7, 0.4])
    b = _write(tmp_path, "b", ["3", "1", "2"], [0.9, 0.1, 0.5])
    ref, voted = vote_files([a, b])
    assert ref.ids == ["1", "2", "3"]
    np.testing.assert_allclose(voted[:, 1], [(0.2 + 0.1) / 2, (0.7 + 0.5) / 2, (0.4 + 0.9) / 2])


def test_mismatched_files_are_refused(tmp_path) -> None:
    a = _write(tmp_path, "a", ["1", "2", "3"], [0.2, 0.7, 0.4])
    b = _write(tmp_path, "b", ["1", "2", "4"], [0.2, 0.7, 0.4])
    with pytest.raises(DataError, match="does not match"):
        vote_files([a, b])
    c = tmp_path / "c.csv"
    pd.DataFrame(
        {"image_id": ["1", "2", "3"], "prob_normal": [0.5, 0.5, 0.5], "prob_sick": [0.5, 0.5, 0.5]}
    ).to_csv(c, index=False)
    with pytest.raises(DataError, match="classes"):
        align([read_probs(a), read_probs(c)])
    d = tmp_path / "d.csv"
    pd.DataFrame({"image_id": ["1"], "prob_normal": [0.5], "prob_disease": [0.7]}).to_csv(
        d, index=False
    )
    with pytest.raises(DataError, match="sum to 1"):
        read_probs(d)


def test_analysis_numbers() -> None:
    y = np.array([0, 0, 1, 1, 1, 0])
    pa = np.array([0.1, 0.6, 0.9, 0.4, 0.8, 0.2])  # predictions 0 1 1 0 1 0: 4/6 right
    pb = np.array([0.2, 0.3, 0.3, 0.9, 0.3, 0.7])  # predictions 0 0 0 1 0 1: 3/6 right
    a, b = np.stack([1 - pa, pa], 1), np.stack([1 - pb, pb], 1)
    report = analyse(["a", "b"], [a, b], y)
    acc = {r["model"]: r["accuracy"] for r in report["models"]}
    assert acc["a"] == pytest.approx(4 / 6) and acc["b"] == pytest.approx(3 / 6)
    # Vote P(1): .15 .45 .6 .65 .55 .45 -> 0 0 1 1 1 0: all right.
    assert acc["vote"] == pytest.approx(1.0)
    pair = report["pairs"][0]
    pred_a, pred_b = (pa >= 0.5).astype(int), (pb >= 0.5).astype(int)
    assert pair["agreement"] == pytest.approx(1 / 6)
    assert pair["disagreements"] == 5
    assert pair["kappa"] == pytest.approx(cohen_kappa_score(pred_a, pred_b))
    assert pair["only_a_right"] == 3 and pair["only_b_right"] == 2 and pair["both_wrong"] == 0
    assert pair["oracle_accuracy"] == pytest.approx(1.0)
    assert pair["vote_right_on_disagreements"] == 5
