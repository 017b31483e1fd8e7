"""Zero-shot evaluation report: per-finding and mean AUC, F1, precision, recall, accuracy with
bootstrap 95% CIs, ROC curves (PNG), predictions and metrics (CSV, JSON)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ctclip.config import ModelConfig
from ctclip.data import CTVolumeDataset, check_store, match_names, read_labels
from ctclip.findings import FINDINGS
from ctclip.model import CTCLIP
from ctclip.preprocess import volume_shape
from ctclip.text import Tokenizer
from ctclip.zeroshot import predict
from medcore.checkpoint import load_checkpoint
from medcore.cli import format_table
from medcore.config import from_dict
from medcore.errors import CheckpointError, DataError
from medcore.io import atomic_write_csv, atomic_write_json
from medcore.metrics import bootstrap_ci, metrics_with_ci, multilabel_f1, roc_auc_per_class
from medcore.plots import plot_roc_curves

KIND = "ctclip.CTCLIP"
METRICS = ("auc", "f1", "precision", "recall", "accuracy")


def evaluable(labels: np.ndarray) -> np.ndarray:
    """Columns with both classes present: the only ones with a defined AUC."""
    positives = labels.sum(0)
    return (positives > 0) & (positives < labels.shape[0])


def auc_per_finding(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUC of each finding; NaN (silently) where a finding has one class only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return roc_auc_per_class(labels.astype(int), probs)


def _mean_metric(name: str, threshold: float):
    """Mean over findings of one metric, for bootstrapping whole rows (volumes)."""

    def fn(y: np.ndarray, s: np.ndarray) -> float:
        if name == "auc":
            return float(np.nanmean(auc_per_finding(s, y))) if evaluable(y).any() else float("nan")
        pred = s >= threshold
        if name == "f1":
            return multilabel_f1(y, pred)["macro_f1"]
        # Column-wise counts (medcore's binary metrics take one column at a time; this runs per resample).
        y = y.astype(bool)
        tp, fp, fn = (y & pred).sum(0), (~y & pred).sum(0), (y & ~pred).sum(0)
        if name == "precision":
            return float(
                np.mean(np.divide(tp, tp + fp, out=np.zeros(len(tp)), where=(tp + fp) > 0))
            )
        if name == "recall":
            return float(
                np.mean(np.divide(tp, tp + fn, out=np.zeros(len(tp)), where=(tp + fn) > 0))
            )
        return float(np.mean(y == pred))

    return fn


def summarize(
    probs: np.ndarray,
    labels: np.ndarray,
    findings: Sequence[str] = FINDINGS,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-finding rows and the mean over the evaluable findings, each metric with a 95% CI."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels).astype(int)
    ok = evaluable(labels)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j, finding in enumerate(findings):
            row: dict[str, Any] = {
                "finding": finding,
                "positives": int(labels[:, j].sum()),
                "n": int(labels.shape[0]),
            }
            if ok[j]:
                m = metrics_with_ci(
                    labels[:, j], probs[:, j], threshold=threshold, n_boot=n_boot, seed=seed
                )
                for name in METRICS:
                    row.update(
                        {
                            name: m[name]["value"],
                            f"{name}_ci_low": m[name]["ci_low"],
                            f"{name}_ci_high": m[name]["ci_high"],
                        }
                    )
            else:
                row.update({name: float("nan") for name in METRICS})
            rows.append(row)
        mean: dict[str, Any] = {
            "finding": "mean",
            "positives": int(labels[:, ok].sum()),
            "n": int(labels.shape[0]),
        }
        for name in METRICS:
            if not ok.any():
                mean[name] = float("nan")
                continue
            fn = _mean_metric(name, threshold)
            y, s = labels[:, ok], probs[:, ok]
            mean[name] = fn(y, s)
            if n_boot:
                low, high = bootstrap_ci(fn, y, s, n_boot=n_boot, seed=seed)
                mean[f"{name}_ci_low"], mean[f"{name}_ci_high"] = low, high
    return {
        "per_finding": rows,
        "mean": mean,
        "evaluated_findings": [f for f, k in zip(findings, ok, strict=True) if k],
        "num_evaluated": int(ok.sum()),
        "num_findings": len(findings),
        "threshold": threshold,
        "n_boot": n_boot,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The per-finding table (AUC with CI, F1, precision, recall, accuracy) for the terminal."""

    def ci(row: dict[str, Any], name: str) -> str:
        value = row.get(name, float("nan"))
        if not np.isfinite(value):
            return "n/a"
        low, high = row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
        return f"{value:.3f}" if low is None else f"{value:.3f} [{low:.3f}, {high:.3f}]"

    table = []
    for row in [*summary["per_finding"], summary["mean"]]:
        if row["finding"] != "mean" and not np.isfinite(row["auc"]):
            continue
        table.append(
            {
                "finding": row["finding"],
                "pos/n": f"{row['positives'] if row['finding'] != 'mean' else '-'}/{row['n']}",
                "AUC [95% CI]": ci(row, "auc"),
                **{name: ci(row, name).split(" ")[0] for name in METRICS[1:]},
            }
        )
    skipped = summary["num_findings"] - summary["num_evaluated"]
    note = (
        f"\n{summary['num_evaluated']} of {summary['num_findings']} findings evaluated; {skipped} have one class only "
        "in these labels (AUC undefined, left out of the mean)."
        if skipped
        else ""
    )
    return format_table(table) + note


def write_report(
    out_dir: Path,
    names: Sequence[str],
    probs: np.ndarray,
    labels: np.ndarray,
    summary: dict[str, Any],
    findings: Sequence[str] = FINDINGS,
    prefix: str = "zero_shot",
) -> dict[str, Path]:
    """Write ``<prefix>_metrics.{csv,json}``, ``<prefix>_predictions.csv`` and ``plots/<prefix>_roc.png``."""
    out_dir = Path(out_dir)
    metrics_csv = atomic_write_csv(
        out_dir / f"{prefix}_metrics.csv", pd.DataFrame([*summary["per_finding"], summary["mean"]])
    )
    metrics_json = atomic_write_json(out_dir / f"{prefix}_metrics.json", json_safe(summary))
    preds = pd.DataFrame(np.asarray(probs), columns=list(findings))
    preds.insert(0, "VolumeName", list(names))
    predictions = atomic_write_csv(out_dir / f"{prefix}_predictions.csv", preds)
    ok = evaluable(np.asarray(labels).astype(int))
    curves = {
        f: (np.asarray(labels)[:, j].astype(int), np.asarray(probs)[:, j])
        for j, f in enumerate(findings)
        if ok[j]
    }
    paths = {"metrics_csv": metrics_csv, "metrics_json": metrics_json, "predictions": predictions}
    if curves:
        paths["roc"] = plot_roc_curves(
            curves, out_dir / "plots" / f"{prefix}_roc.png", title="Zero-shot ROC"
        )
    return paths


def json_safe(obj: Any) -> Any:
    """NaN -> None so that the JSON is standard."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def load_model(path: Path, device: torch.device) -> tuple[CTCLIP, dict[str, Any]]:
    """Rebuild the model from a ctclip checkpoint alone (its config travels inside it)."""
    state = load_checkpoint(path, map_location="cpu", kind=KIND)
    if "model_config" not in state or "model" not in state:
        raise CheckpointError(
            path, "has no model_config/model entries (not written by ctclip-train)"
        )
    cfg = from_dict(
        ModelConfig, {**state["model_config"], "pretrained_weights": None, "freeze_dinov2": False}
    )
    model = CTCLIP.from_config(cfg, load_weights=False)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            path, f"weights do not fit its own config ({str(exc).splitlines()[0][:160]})"
        ) from None
    return model.to(device).eval(), state


def run_evaluation(
    checkpoint: Path,
    test_data: Path,
    test_labels: Path,
    out_dir: Path,
    device: torch.device,
    batch_size: int = 8,
    n_boot: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
    allow_missing: bool = False,
) -> dict[str, Any]:
    """ctclip-eval: zero-shot metrics of ``checkpoint`` on the volumes of ``test_labels``."""
    model, _ = load_model(checkpoint, device)
    labels = read_labels(test_labels)
    names = match_names(list(labels.index), test_data, test_labels, allow_missing)
    check_store(test_data)
    shape = volume_shape(test_data)
    if shape[1:] != model.visual.image_size:
        raise DataError(
            test_data,
            f"holds {shape[1]}x{shape[2]} slices; the model takes "
            f"{model.visual.image_size[0]}x{model.visual.image_size[1]}",
        )
    dataset = CTVolumeDataset(test_data, labels, names)
    tokenizer = Tokenizer(model.context_length)
    probs, y = predict(model, dataset, tokenizer, device, batch_size=batch_size)
    summary = summarize(probs.numpy(), y.numpy(), threshold=threshold, n_boot=n_boot, seed=seed)
    summary.update(
        {
            "checkpoint": str(checkpoint),
            "test_data": str(test_data),
            "test_labels": str(test_labels),
        }
    )
    write_report(out_dir, names, probs.numpy(), y.numpy(), summary)
    return summary
