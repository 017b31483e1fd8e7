"""Decisions that must hold on real data: ragged batches, TTA views, one decision rule,
cross-validated selection with intervals, the seed's ensemble rule, and training that learns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from binensemble.cli import predict, train
from binensemble.ensemble import analyse, check_rule, wilson_interval, write_predictions
from binensemble.evaluate import save_heldout, summarise
from binensemble.selection import choose
from binensemble.synthetic import write_dataset
from medcore.config import TrainerConfig
from medcore.data.splits import stratified_split
from medcore.testing import call_main


def _error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_the_real_trainset_at_batch_24_ends_on_one_image() -> None:
    labels = np.r_[np.zeros(993, int), np.ones(646, int)]  # the seed's TrainSet
    n_train = len(stratified_split(labels, {"train": 0.85, "val": 0.15}, seed=42)["train"])
    assert n_train == 1393 and n_train % 24 == 1  # the case the next test reaches in small
    assert TrainerConfig().min_batch_size == 2  # the rule that drops it


def test_a_ragged_last_batch_of_one_image_trains(
    tiny_data: Path, tmp_path: Path, capsys, tiny_args
) -> None:
    """The baseline's BatchNorm raised on a last batch of 1 image before the rule existed."""
    labels = np.r_[np.zeros(14, int), np.ones(10, int)]  # tiny_data's TrainSet
    n_train = len(stratified_split(labels, {"train": 0.85, "val": 0.15}, seed=42)["train"])
    run = tmp_path / "ragged"
    code, out, err = call_main(
        train,
        tiny_args(
            "--model", "baseline", "--data-dir", str(tiny_data), "--output-dir", str(run),
            "--epochs", "1", "--set", f"trainer.batch_size={n_train - 1}",
            "--set", "predict.tta=false",
        ),
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "last training batch of each epoch would hold 1 sample" in out + err
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(e.get("step", 0) for e in events if "step" in e) == 1  # the 1-image batch left out


def test_one_decision_rule_for_csv_metrics_and_analysis(tmp_path: Path) -> None:
    # A soft vote of 0.4 and 0.6 is a tie: normal, in the CSV and in every metric.
    probs = np.array([[0.5, 0.5], [0.2, 0.8], [0.9, 0.1], [0.5, 0.5]])
    y = np.array([1, 1, 0, 0])
    csv, _ = write_predictions(tmp_path, "m", ["a", "b", "c", "d"], probs, ["normal", "disease"], y)
    labels = pd.read_csv(csv)["label"].to_numpy()
    assert labels.tolist() == [0, 1, 0, 0]
    metrics = summarise(y, probs, prefix="")
    assert metrics["accuracy"] == pytest.approx((labels == y).mean()) == 0.75
    assert metrics["sensitivity"] == 0.5 and metrics["specificity"] == 1.0
    report = analyse(["m", "n"], [probs, probs], y)
    assert report["models"][0]["accuracy"] == pytest.approx(0.75)


@pytest.mark.parametrize("k,n", [(0, 9), (9, 246), (237, 246), (50, 50)])
def test_wilson_interval_matches_scipy(k: int, n: int) -> None:
    expected = binomtest(k, n).proportion_ci(0.95, method="wilson")
    np.testing.assert_allclose(wilson_interval(k, n, 0.95), (expected.low, expected.high))


def test_analysis_intervals_and_the_ensemble_rule() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    a = np.where(rng.random(200) < 0.95, y, 1 - y)  # ~95% right
    b = np.where(rng.random(200) < 0.80, y, 1 - y)  # ~80% right: below the bar
    pa, pb = (np.stack([1 - v * 0.8 - 0.1, v * 0.8 + 0.1], 1) for v in (a, b))
    report = analyse(["a", "b"], [pa, pb], y, n_boot=300)
    row_a, row_b = report["models"][:2]
    assert row_a["accuracy"] == pytest.approx((a == y).mean())
    assert row_a["accuracy_ci_low"] < row_a["accuracy"] < row_a["accuracy_ci_high"]
    agree = (a == b).sum()
    expected = binomtest(int(agree), 200).proportion_ci(0.95, method="wilson")
    pair = report["pairs"][0]
    assert (pair["agreement_ci_low"], pair["agreement_ci_high"]) == pytest.approx(
        (expected.low, expected.high)
    )
    assert row_b["vote_gain_ci_low"] <= row_b["vote_gain"] <= row_b["vote_gain_ci_high"]
    rule = check_rule(report, 0.90, 0.05)
    assert not rule["holds"]
    assert any(r.startswith("b accuracy") for r in rule["reasons"])
    assert any("disagree on" in r for r in rule["reasons"])
    assert not any(r.startswith("a accuracy") for r in rule["reasons"])
    assert check_rule(analyse(["a", "c"], [pa, pa], y, n_boot=50), 0.90, 0.05)["holds"]


def test_cross_validated_choice_of_epoch_and_k(tmp_path: Path) -> None:
    """Two folds, two epochs, k in {1, 3}: epoch 2 with k = 3 is right on 5 of 6 images."""
    y = np.array([0, 1, 0, 1, 0, 1])
    folds = [{"train": np.array([3, 4, 5]), "val": np.array([0, 1, 2])},
             {"train": np.array([0, 1, 2]), "val": np.array([3, 4, 5])}]  # fmt: skip

    def p(labels: list[int]) -> np.ndarray:
        return np.eye(2)[labels] * 0.8 + 0.1

    heldout = {  # fold -> epoch -> k -> held-out probabilities
        0: {0: {"k1": p([0, 0, 0]), "k3": p([1, 0, 1])}, 1: {"k1": p([0, 0, 1]), "k3": p([0, 1, 0])}},
        1: {0: {"k1": p([1, 1, 1]), "k3": p([0, 0, 0])}, 1: {"k1": p([0, 1, 1]), "k3": p([1, 0, 0])}},
    }  # fmt: skip
    dirs = []
    for fold, epochs in heldout.items():
        for epoch, probs in epochs.items():
            save_heldout(tmp_path / f"f{fold}", epoch, probs)
        dirs.append(tmp_path / f"f{fold}")
    choice = choose(y, folds, dirs)
    # Right per fold (pooled): e1/k1 2+2 (4/6), e1/k3 0+1, e2/k1 1+1, e2/k3 3+2 (5/6).
    assert (choice.epochs, choice.k) == (2, 3)
    assert choice.accuracy == pytest.approx(5 / 6) and choice.per_fold == [
        1.0,
        pytest.approx(2 / 3),
    ]
    np.testing.assert_allclose(choice.oof_probs[[0, 1, 2]], p([0, 1, 0]))
    np.testing.assert_allclose(choice.oof_probs[[3, 4, 5]], p([1, 0, 0]))


def test_cross_validation_stage_end_to_end(
    tiny_data: Path, tmp_path: Path, capsys, tiny_args
) -> None:
    run = tmp_path / "cv"
    code, out, err = call_main(
        train,
        tiny_args(
            "--data-dir", str(tiny_data), "--output-dir", str(run), "--epochs", "2",
            "--set", "selection.cv_folds=2", "--set", "predict.tta=false",
            "--set", "ensemble.n_boot=50",
        ),
        capsys,
    )  # fmt: skip
    assert code == 0, err
    selection = json.loads((run / "cv" / "selection.json").read_text())
    assert set(selection) == {"metric", "baseline"}
    assert selection["metric"]["k"] in (1, 3, 5) and selection["baseline"]["k"] is None
    for name, chosen in selection.items():
        assert 1 <= chosen["epochs"] <= 2
        oof = pd.read_csv(run / "cv" / "oof" / f"{name}_probs.csv")
        assert len(oof) == 24 and oof["image_id"].is_unique  # every labelled image once
        acc = (oof[["prob_normal", "prob_disease"]].to_numpy().argmax(1) == oof["target"]).mean()
        assert chosen["oof_accuracy"] == pytest.approx(acc)
        # The final model trained for the chosen number of epochs, with the chosen k.
        final = json.loads((run / name / "metrics.json").read_text())
        assert final["epochs_completed"] == chosen["epochs"]
    assert json.loads((run / "metric" / "knn.json").read_text())["k"] == selection["metric"]["k"]
    analysis = json.loads((run / "cv" / "analysis.json").read_text())
    assert analysis["n_images"] == 24 and "agreement_ci_low" in analysis["pairs"][0]
    assert "rule" in analysis and "cv out-of-fold (24 images): agreement" in out
    assert "ensemble rule" in err or "ensemble rule holds" in out


def test_predict_refuses_query_views_other_than_the_gallerys(
    tiny_data: Path, tmp_path: Path, capsys, tiny_args
) -> None:
    run = tmp_path / "metric"
    args = ("--model", "metric", "--data-dir", str(tiny_data), "--output-dir", str(run), "--smoke")
    code, _, err = call_main(train, tiny_args(*args), capsys)
    assert code == 0, err
    out_dir = ["--data-dir", str(tiny_data), "--output-dir", str(tmp_path / "p")]
    for flags in (["--no-tta"], ["--set", "predict.views=[identity,hflip]"]):
        code, _, err = call_main(predict, [str(run), *out_dir, *flags], capsys)
        assert code == 2 and "KNN gallery" in _error_line(err)
    assert not (tmp_path / "p").exists()
    code, out, err = call_main(predict, [str(run), *out_dir], capsys)
    assert code == 0 and "identity, hflip, vflip, rot90" in out  # the gallery's views


def test_training_learns(tmp_path: Path, capsys) -> None:
    """A seeded tiny run of the metric model beats the majority class by 0.15 on the test set.

    On this data (lesions twice the demo's contrast) the untrained model's KNN scores the
    majority rate (measured: 0.625 test accuracy with 0 epochs), 4 epochs 0.979: the margin
    needs learning. (The cross-entropy baseline needs more epochs than a test can afford.)
    """
    data = write_dataset(tmp_path / "d", 40, 24, 48, size=40, seed=5, lesion_strength=0.6)
    run = tmp_path / "run"
    code, _, err = call_main(
        train,
        [
            "--model", "metric", "--data-dir", str(data), "--output-dir", str(run),
            "--epochs", "4", "--set", "data.img_size=32", "--set", "model.hidden_dim=64",
            "--set", "model.embed_dim=32", "--set", "trainer.batch_size=16",
            "--set", "knn.ks=[1,3,5,9]", "--set", "predict.tta=false",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    labels = pd.read_csv(data / "TestSet_labels.csv")["label"]
    majority = max(labels.mean(), 1 - labels.mean())
    accuracy = json.loads((run / "metrics.json").read_text())["test/accuracy"]
    assert accuracy >= majority + 0.15, (accuracy, majority)
