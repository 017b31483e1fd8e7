"""The BreakHis recognition rates (Spanhol et al. 2016) and the size of the fold checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histommnet.cli import analyze, train
from histommnet.evaluate import METRICS, recognition_rates, summarize_folds
from histommnet.predict import patient_table
from medcore.testing import call_main
from medcore.weights.checkpoint import finish_releasing, load_checkpoint


def test_recognition_rates_by_hand() -> None:
    # patient a (benign): 2 of 3 draws right; b (malignant): 1 of 1; c (malignant): 1 of 4,
    # its 0.5 counting as malignant (P >= threshold)
    draws = pd.DataFrame(
        {
            "patient": ["a", "a", "a", "b", "c", "c", "c", "c"],
            "label": [0, 0, 0, 1, 1, 1, 1, 1],
            "subtype": ["A", "A", "A", "DC", "LC", "LC", "LC", "LC"],
            "prob_malignant": [0.2, 0.7, 0.4, 0.9, 0.1, 0.3, 0.5, 0.2],
        }
    )
    rates = recognition_rates(draws, 0.5)
    assert rates["image"] == pytest.approx(4 / 8)  # N_rec / N_all
    assert rates["patient"] == pytest.approx((2 / 3 + 1 / 1 + 1 / 4) / 3)  # mean of N_rec / N_P
    # not the patient-level accuracy of the thresholded mean probability (c: 0.275 < 0.5)
    patients = patient_table(draws)
    accuracy = float(((patients["prob_malignant"] >= 0.5) == patients["label"]).mean())
    assert accuracy == pytest.approx(2 / 3) and rates["patient"] != pytest.approx(accuracy)
    # one patient per draw: both rates are the image accuracy
    single = draws.assign(patient=[f"p{i}" for i in range(len(draws))])
    assert recognition_rates(single, 0.5) == pytest.approx({"image": 0.5, "patient": 0.5})


def test_summary_carries_the_rates_per_fold_and_overall() -> None:
    def result(fold: int, image: float, patient: float) -> dict:
        levels = {
            "image": {m: 0.5 for m in METRICS} | {"recognition_rate": image},
            "patient": {m: 0.5 for m in METRICS} | {"recognition_rate": patient},
        }
        return {"fold": fold, "thresholds": {"image": 0.5, "patient": 0.5}, "test": levels}

    per_fold, summary = summarize_folds([result(0, 0.8, 0.7), result(1, 0.6, 0.9)])
    rows = per_fold.set_index(["fold", "level"])["recognition_rate"]
    assert rows[(1, "patient")] == pytest.approx(0.9)
    patient = summary.set_index("level").loc["patient"]
    assert patient["recognition_rate_mean"] == pytest.approx(0.8)
    assert patient["recognition_rate_std"] == pytest.approx(np.std([0.7, 0.9], ddof=1))


def _rates_from_csv(fold_dir: Path, threshold: float) -> tuple[float, float]:
    """Independent of ``recognition_rates``: plain loops over the saved test draws."""
    draws = pd.read_csv(fold_dir / "predictions_image.csv")
    right: dict[str, list[bool]] = {}
    columns = (draws["patient"], draws["label"], draws["prob_malignant"])
    for patient, label, prob in zip(*columns, strict=True):
        right.setdefault(patient, []).append(int(prob >= threshold) == label)
    every = [r for rs in right.values() for r in rs]
    return sum(every) / len(every), sum(sum(rs) / len(rs) for rs in right.values()) / len(right)


def test_training_reports_the_rates_and_keeps_a_weights_only_best(
    tiny_args, tiny_tree: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    argv = ["--data-dir", str(tiny_tree), "--output-dir", str(out), *tiny_args()]
    code, stdout, err = call_main(train, argv, capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert "recognition_rate" in stdout and "Spanhol" in stdout
    for fold in metrics["folds"]:
        fold_dir = out / f"fold_{fold['fold']}"
        image, patient = _rates_from_csv(fold_dir, fold["thresholds"]["image"])
        assert fold["test"]["image"]["recognition_rate"] == pytest.approx(image)
        assert fold["test"]["image"]["recognition_rate"] == pytest.approx(
            fold["test"]["image"]["accuracy"]
        )
        assert fold["test"]["patient"]["recognition_rate"] == pytest.approx(patient)
        assert 0.0 <= fold["val"]["patient"]["recognition_rate"] <= 1.0
    overall = np.mean([f["test"]["patient"]["recognition_rate"] for f in metrics["folds"]])
    assert metrics["summary"]["patient"]["recognition_rate_mean"] == pytest.approx(overall)
    table = pd.read_csv(out / "tables" / "cv_folds.csv")
    assert table["recognition_rate"].notna().all()

    # the best checkpoint holds the weights and what evaluation needs, no optimizer state
    finish_releasing()
    for fold in metrics["folds"]:
        ckpts = out / f"fold_{fold['fold']}" / "checkpoints"
        best = load_checkpoint(ckpts / f"fold_{fold['fold']}_best.pth", kind="histommnet.MMNet")
        for gone in ("optimizer", "scheduler", "scaler", "rng", "rng_ranks", "history"):
            assert gone not in best
        assert best["thresholds"] == fold["thresholds"]
        assert best["threshold_method"] == "youden" and best["normalization"]["mean"]
        assert best["model_config"]["name"] == "mmnet" and best["epoch"] == fold["best_epoch"]
        assert not (ckpts / "latest.pt").exists()  # a finished fold is never resumed
        weights = sum(t.numel() * t.element_size() for t in best["model"].values())
        size = (ckpts / f"fold_{fold['fold']}_best.pth").stat().st_size
        assert weights <= size < weights * 1.15 + 200_000  # the full one is about 3x
        assert not list(ckpts.glob(".*"))  # no spare copy of the replaced checkpoint left

    # the analyze command reports the run's rates beside its other metrics
    code, stdout, err = call_main(analyze, ["--run", str(out)], capsys)
    assert code == 0, err
    assert "recognition_rate" in stdout and "finished fold(s)" in stdout
    folds = pd.read_csv(out / "analysis" / "tables" / "test_folds.csv")
    for fold in metrics["folds"]:
        row = folds[(folds["fold"] == fold["fold"]) & (folds["level"] == "patient")].iloc[0]
        assert row["recognition_rate"] == pytest.approx(fold["test"]["patient"]["recognition_rate"])
    report = json.loads((out / "analysis" / "analysis.json").read_text())
    patient = next(r for r in report["test_summary"] if r["level"] == "patient")
    assert patient["recognition_rate_mean"] == pytest.approx(overall)
