"""Image- and patient-level metrics, validation thresholds, a fold's test, cross-validation
summaries, tables and plots (the predictions they score: ``histommnet.predict``).

"Image level" means one draw (one image per magnification); "patient level" averages the
malignant probability over all draws of a patient. Beside them, the recognition rates the
BreakHis literature reports (Spanhol et al. 2016), from the draws classified one by one at the
image-level threshold: image level N_rec / N_all (the image accuracy), patient level the mean
over patients of N_rec / N_P (each patient's fraction of correctly classified draws).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix
from torch import nn

from histommnet.breakhis import CLASSES
from histommnet.data import MultiMagDataset
from histommnet.predict import patient_table, predict_draws
from medcore.engine import inference
from medcore.engine.run_log import RunLogger
from medcore.io import atomic_write_csv, atomic_write_text
from medcore.metrics import binary_metrics, select_threshold
from medcore.report.plots import plot_confusion_matrix, plot_roc_curves, plot_training_curves
from medcore.report.tables import format_table, markdown_table

METRICS = (
    "accuracy",
    "balanced_accuracy",
    "roc_auc",
    "f1",
    "sensitivity",
    "specificity",
    "recognition_rate",
)
LEVELS = ("image", "patient")
RATES_NOTE = (
    "recognition_rate: image level N_rec / N_all, patient level the mean over patients of "
    "N_rec / N_P, draws classified at the image-level threshold (Spanhol et al. 2016)"
)


def level_metrics(frame: pd.DataFrame, threshold: float) -> dict[str, float]:
    """The six reported metrics (plus precision and PR AUC) at ``prob >= threshold``.

    AUCs are NaN (with a warning) when ``frame`` holds one class only.
    """
    return binary_metrics(frame["label"].to_numpy(), frame["prob_malignant"].to_numpy(), threshold)


def recognition_rates(draws: pd.DataFrame, threshold: float) -> dict[str, float]:
    """The BreakHis recognition rates of ``draws`` classified one by one at ``threshold``.

    ``image``: correctly classified draws over all draws (N_rec / N_all); ``patient``: the
    mean over patients of each patient's N_rec / N_P (Spanhol et al. 2016, the patient
    recognition rate), so every patient weighs the same whatever its number of images.
    """
    pred = (draws["prob_malignant"].to_numpy(dtype=float) >= threshold).astype(int)
    correct = pd.Series(pred == draws["label"].to_numpy(), index=draws.index, dtype=float)
    return {
        "image": float(correct.mean()),
        "patient": float(correct.groupby(draws["patient"]).mean().mean()),
    }


def choose_threshold(frame: pd.DataFrame, method: str, what: str = "validation") -> float:
    """The decision threshold maximising ``method`` (Youden's J or F1) on ``frame``, centred
    in its gap.

    ``medcore.metrics.select_threshold`` returns the highest optimal cut-off, which sits on the
    lowest-scoring malignant unit: on a handful of validation patients that edge misses test
    patients just below it. Half-way down to the next lower score makes the same decisions on
    ``frame`` with a margin on both sides. A one-class ``frame`` has no such threshold: 0.5,
    said on stderr.
    """
    labels = frame["label"].to_numpy()
    if len(set(labels.tolist())) < 2:
        print(f"note: {what} has one class; using threshold 0.5", file=sys.stderr)
        return 0.5
    scores = frame["prob_malignant"].to_numpy(dtype=float)
    threshold = select_threshold(labels, scores, method=method)
    below = scores[scores < threshold]
    return float((threshold + below.max()) / 2) if below.size else threshold


def validation_scores(draws: pd.DataFrame, method: str) -> dict[str, float]:
    """Model-selection metrics of one validation pass, free of a fixed 0.5 cut-off.

    ``balanced_accuracy`` is taken at the validation-optimal threshold (``method``), the
    patient-level one at the patients' own optimal threshold; the 0.5 figure is kept for
    reference only. One-class validation sets give NaN AUCs.
    """
    patients = patient_table(draws)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one-class validation sets: NaN AUC, reported as such
        t_image = choose_threshold(draws, method, "validation")
        t_patient = choose_threshold(patients, method, "validation patients")
        image = level_metrics(draws, t_image)
        patient = level_metrics(patients, t_patient)
        fixed = level_metrics(draws, 0.5)
    return {
        "balanced_accuracy": image["balanced_accuracy"],
        "auc": image["roc_auc"],
        "threshold": t_image,
        "balanced_accuracy_at_0.5": fixed["balanced_accuracy"],
        "patient_balanced_accuracy": patient["balanced_accuracy"],
        "patient_auc": patient["roc_auc"],
        "patient_threshold": t_patient,
    }


def selection_score(balanced_accuracy: float, val_loss: float) -> float:
    """What model selection maximises: the balanced accuracy at the validation-optimal
    threshold, ties broken by the lower validation loss.

    On a small validation split that balanced accuracy reaches 1.0 early and stays there; the
    loss term (at most 1e-5, below any balanced-accuracy step of a split under 50,000 draws)
    then keeps the later, better-fitted epoch instead of the first one to reach 1.0.
    """
    return balanced_accuracy - 1e-5 * min(max(val_loss, 0.0), 1.0)


def confusion(frame: pd.DataFrame, threshold: float) -> np.ndarray:
    pred = (frame["prob_malignant"].to_numpy() >= threshold).astype(int)
    return confusion_matrix(frame["label"].to_numpy(), pred, labels=[0, 1])


def summarize_folds(fold_results: Sequence[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-fold table, mean +- std table) over folds, one row per fold (and level)."""
    rows = []
    for res in fold_results:
        for level in LEVELS:
            rows.append(
                {
                    "fold": res["fold"],
                    "level": level,
                    "threshold": res["thresholds"][level],
                    # NaN for a metric a fold's result lacks (written by an older release)
                    **{m: res["test"][level].get(m, math.nan) for m in METRICS},
                }
            )
    per_fold = pd.DataFrame(rows)
    summary_rows = []
    for level in LEVELS:
        part = per_fold[per_fold["level"] == level]
        row: dict[str, Any] = {"level": level, "folds": len(part)}
        for m in METRICS:
            values = part[m].to_numpy(dtype=float)
            finite = values[np.isfinite(values)]
            row[f"{m}_mean"] = float(finite.mean()) if finite.size else math.nan
            row[f"{m}_std"] = (
                float(finite.std(ddof=1)) if finite.size > 1 else 0.0 if finite.size else math.nan
            )
        summary_rows.append(row)
    return per_fold, pd.DataFrame(summary_rows)


def summary_display(summary: pd.DataFrame) -> list[dict[str, Any]]:
    """Summary rows as ``metric: "mean ± std"`` strings for printing."""
    out = []
    for _, row in summary.iterrows():
        shown: dict[str, Any] = {"level": row["level"], "folds": int(row["folds"])}
        for m in METRICS:
            shown[m] = f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_std']:.3f}"
        out.append(shown)
    return out


def write_table(frame: pd.DataFrame, path_stem: Path) -> None:
    """``<stem>.csv`` and ``<stem>.md`` (atomic)."""
    atomic_write_csv(path_stem.with_suffix(".csv"), frame)
    atomic_write_text(path_stem.with_suffix(".md"), markdown_table(frame.to_dict("records")))


def write_fold_plots(
    plots_dir: Path,
    fold: int,
    draws: pd.DataFrame,
    patients: pd.DataFrame,
    thresholds: dict[str, float],
) -> None:
    for level, frame in (("image", draws), ("patient", patients)):
        threshold = thresholds[level]
        plot_confusion_matrix(
            confusion(frame, threshold),
            list(CLASSES),
            plots_dir / f"confusion_fold{fold}_{level}.png",
            title=f"fold {fold}, {level} level (threshold {threshold:.3f})",
        )


def test_fold(
    model: nn.Module,
    fold: int,
    val_ds: MultiMagDataset,
    test_ds: MultiMagDataset,
    *,
    options: inference.PredictOptions,
    method: str,
    fold_dir: Path,
    plots_dir: Path,
    history: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """A trained fold on its validation and test patients (the main rank's own unsharded
    passes): thresholds chosen on validation, both splits' metrics; predictions and plots
    written. Returns ``thresholds``, ``threshold_method``, ``val``, ``test`` (and
    ``test_subtype_accuracy`` with a subtype head)."""
    val_draws = predict_draws(model, val_ds, options.but(shard=False))
    test_draws = predict_draws(model, test_ds, options.but(shard=False))
    frames = {
        "val": (val_draws, patient_table(val_draws)),
        "test": (test_draws, patient_table(test_draws)),
    }
    # Each level's threshold is chosen on its own validation units: draws, then patients
    # (a patient's mean probability is distributed unlike a single draw's).
    thresholds = {
        level: choose_threshold(frame, method, f"fold {fold} validation ({level} level)")
        for level, frame in zip(LEVELS, frames["val"], strict=True)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = {
            split_name: {
                level: level_metrics(frame, thresholds[level])
                for level, frame in zip(LEVELS, pair, strict=True)
            }
            for split_name, pair in frames.items()
        }
    for split_name, (draws, _) in frames.items():
        for level, rate in recognition_rates(draws, thresholds["image"]).items():
            scores[split_name][level]["recognition_rate"] = rate
    out: dict[str, Any] = {"thresholds": thresholds, "threshold_method": method, **scores}
    if "subtype_pred" in test_draws:
        out["test_subtype_accuracy"] = float(
            (test_draws["subtype_pred"] == test_draws["subtype"]).mean()
        )
    atomic_write_csv(fold_dir / "predictions_image.csv", test_draws)
    atomic_write_csv(fold_dir / "predictions_patient.csv", frames["test"][1])
    # The validation predictions the thresholds were chosen on, for auditing them.
    atomic_write_csv(fold_dir / "predictions_val_image.csv", val_draws)
    atomic_write_csv(fold_dir / "predictions_val_patient.csv", frames["val"][1])
    write_fold_plots(plots_dir, fold, test_draws, frames["test"][1], thresholds)
    if history:
        plot_training_curves(
            history, ["train/epoch_loss", "val/loss"], plots_dir / f"curves_fold{fold}_loss.png"
        )
        plot_training_curves(
            history,
            ["val/balanced_accuracy", "val/patient_balanced_accuracy", "val/auc"],
            plots_dir / f"curves_fold{fold}_val.png",
        )
    return out


def write_roc_plots(
    plots_dir: Path, per_fold_frames: dict[int, tuple[pd.DataFrame, pd.DataFrame]]
) -> None:
    for i, level in enumerate(LEVELS):
        curves = {
            f"fold {f}": (frames[i]["label"].to_numpy(), frames[i]["prob_malignant"].to_numpy())
            for f, frames in sorted(per_fold_frames.items())
        }
        plot_roc_curves(curves, plots_dir / f"roc_{level}.png", title=f"ROC, {level} level")


def write_summary(run_dir: Path, model_name: str, results: list[dict[str, Any]]) -> None:
    """The cross-validation summary of a run's tested folds: per-fold and mean +- std tables
    (``tables/cv_{folds,summary}``), ROC plots, ``metrics.json``, printed."""
    per_fold, summary = summarize_folds(results)
    tables = run_dir / "tables"
    write_table(per_fold, tables / "cv_folds")
    write_table(summary, tables / "cv_summary")
    frames = {}
    for res in results:
        fold_dir = run_dir / f"fold_{res['fold']}"
        frames[res["fold"]] = (
            pd.read_csv(fold_dir / "predictions_image.csv"),
            pd.read_csv(fold_dir / "predictions_patient.csv"),
        )
    write_roc_plots(run_dir / "plots", frames)
    final = {
        "model": model_name,
        "folds": results,
        "summary": {
            row["level"]: {k: v for k, v in row.items() if k != "level"}
            for row in summary.to_dict("records")
        },
    }
    logger = RunLogger(run_dir)
    logger.log_jsonl(
        {
            "event": "cv_summary",
            **{
                f"{lvl}/{m}_mean": final["summary"][lvl][f"{m}_mean"]
                for lvl in LEVELS
                for m in METRICS
            },
        }
    )
    logger.write_final(final)
    logger.close()

    print(f"\n{model_name}: per-fold test metrics (thresholds chosen on validation)")
    print(
        format_table(
            per_fold.to_dict("records"), ["fold", "level", "threshold", *METRICS], floatfmt=".3f"
        )
    )
    print(RATES_NOTE)
    print(f"\nmean ± std over {len(results)} fold(s)")
    print(format_table(summary_display(summary), ["level", "folds", *METRICS]))
    print(f"\nrun directory: {run_dir}")
