"""Zero-shot evaluation report: per-finding and mean AUC, F1, precision, recall, accuracy with
bootstrap 95% CIs, ROC curves (PNG), predictions and metrics (CSV, JSON)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ctclip.ctrate import find_ctrate
from ctclip.data import CTVolumeDataset, check_store, match_names, read_labels
from ctclip.export import find_in_run
from ctclip.findings import FINDINGS
from ctclip.model import CTCLIP, KIND, build_model, checkpoint_config
from ctclip.predict import predict
from ctclip.preprocess import volume_shape
from ctclip.text import Tokenizer
from medcore.engine import inference
from medcore.errors import CheckpointError, DataError, UserError
from medcore.io import atomic_write_csv, atomic_write_json
from medcore.metrics import (
    bootstrap_ci,
    metrics_with_ci,
    multilabel_f1,
    roc_auc_per_class,
    select_threshold,
)
from medcore.report.plots import plot_roc_curves
from medcore.report.tables import format_table
from medcore.runtime.device import AmpPolicy, resolve_device

if TYPE_CHECKING:
    from medcore.cli.run_setup import RunContext

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


def _mean_metric(name: str, threshold: float | np.ndarray):
    """Mean over findings of one metric, for bootstrapping whole rows (volumes)."""

    def fn(y: np.ndarray, s: np.ndarray) -> float:
        if name == "auc":
            return float(np.nanmean(auc_per_finding(s, y))) if evaluable(y).any() else float("nan")
        pred = s >= threshold  # one threshold, or one per column
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


def choose_thresholds(
    probs: np.ndarray, labels: np.ndarray, default: float = 0.5
) -> tuple[np.ndarray, list[int]]:
    """Per-finding thresholds maximising Youden's J on (validation) data, and the columns that
    have one class only there (those keep ``default``)."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels).astype(int)
    ok = evaluable(labels)
    thresholds = np.full(probs.shape[1], float(default))
    for j in np.flatnonzero(ok):
        thresholds[j] = select_threshold(labels[:, j], probs[:, j], method="youden")
    return thresholds, [int(j) for j in np.flatnonzero(~ok)]


def summarize(
    probs: np.ndarray,
    labels: np.ndarray,
    findings: Sequence[str] = FINDINGS,
    threshold: float | Sequence[float] = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-finding rows and the mean over the evaluable findings, each metric with a 95% CI.

    ``threshold``: one probability cut-off for every finding, or one per finding (as chosen on
    validation by :func:`choose_thresholds`).
    """
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels).astype(int)
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=float), (len(findings),)).copy()
    ok = evaluable(labels)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j, finding in enumerate(findings):
            row: dict[str, Any] = {
                "finding": finding,
                "positives": int(labels[:, j].sum()),
                "n": int(labels.shape[0]),
                "threshold": float(thresholds[j]),
            }
            if ok[j]:
                m = metrics_with_ci(
                    labels[:, j], probs[:, j], threshold=thresholds[j], n_boot=n_boot, seed=seed
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
            fn = _mean_metric(name, thresholds[ok])
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
        "threshold": float(thresholds[0]) if np.all(thresholds == thresholds[0]) else "per finding",
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
    """Rebuild the model from a ctclip checkpoint alone (its config travels inside it), or
    from a run directory's model (its best checkpoint, else ``final.pt``)."""
    path = Path(path)
    if path.is_dir():
        found = find_in_run(path)
        if found is None:
            raise CheckpointError(path, "holds no ctclip checkpoint (checkpoints/*.pt)")
        path = found
    model, state = inference.load_model(
        path,
        KIND,
        lambda checkpoint: build_model(checkpoint_config(checkpoint), load_weights=False),
        device=device,
    )
    return model, state  # type: ignore[return-value]


def labelled_volumes(
    model: CTCLIP, data: Path, labels_csv: Path, allow_missing: bool
) -> CTVolumeDataset:
    """The labelled volumes of ``labels_csv`` in ``data``, checked against the model's input size."""
    labels = read_labels(labels_csv)
    names = match_names(list(labels.index), data, labels_csv, allow_missing)
    check_store(data)
    shape = volume_shape(data)
    if shape[1:] != model.visual.image_size:
        raise DataError(
            data,
            f"holds {shape[1]}x{shape[2]} slices; the model takes "
            f"{model.visual.image_size[0]}x{model.visual.image_size[1]}",
        )
    return CTVolumeDataset(data, labels, names)


def validation_thresholds(
    model: CTCLIP,
    dataset: CTVolumeDataset,
    tokenizer: Tokenizer,
    options: dict[str, Any],
    default: float,
    source: str,
) -> np.ndarray:
    """Per-finding thresholds (Youden's J) chosen on the validation volumes of ``dataset``."""
    probs, labels = predict(model, dataset, tokenizer, **options)
    thresholds, one_class = choose_thresholds(probs.numpy(), labels.numpy(), default)
    kept = f"; {len(one_class)} with one class there keep {default:g}" if one_class else ""
    print(
        f"thresholds: chosen per finding on {len(dataset)} validation volumes of {source} "
        f"(Youden's J){kept}",
        file=sys.stderr,
    )
    return thresholds


def test_inputs(args: argparse.Namespace) -> tuple[Path, Path]:
    """(``--test-data``, ``--test-labels``), defaulting to what ``--data-dir`` holds: a flat
    folder's ``ct_volumes.h5`` and ``test_predicted_labels.csv`` (ctclip-split's), the CT-RATE
    download's validation labels (the set CT-CLIP's zero-shot results are reported on; its HDF5
    is wherever ctclip-preprocess wrote it, so ``--test-data`` is needed)."""
    test_data, test_labels = args.test_data, args.test_labels
    if args.data_dir is not None:
        ctrate = find_ctrate(args.data_dir)
        if test_labels is None:
            if ctrate.download:
                test_labels = ctrate.table("labels", "valid")
            else:
                test_labels = ctrate.tables / "test_predicted_labels.csv"
        if test_data is None and not ctrate.download:
            test_data = ctrate.root / "ct_volumes.h5"
    for flag, value in (("--test-data", test_data), ("--test-labels", test_labels)):
        if value is None:
            why = (
                "required: the HDF5 file ctclip-preprocess wrote"
                if flag == "--test-data"
                else "required (or --data-dir with a CT-RATE copy)"
            )
            raise UserError(flag, why)
    return Path(test_data), Path(test_labels)


def main(args: argparse.Namespace) -> int:
    """ctclip-eval: zero-shot metrics of ``--model-path`` on the volumes of ``--test-labels``,
    the table printed, the report written to ``--output-dir``.

    With ``--val-labels`` the decision threshold of each finding is chosen on those validation
    volumes (in ``--val-data``, default ``--test-data``) and applied to test; otherwise every
    finding uses ``--threshold``. Inference runs in the checkpoint's training precision, with
    the device's default DataLoader workers.
    """
    test_data, test_labels = test_inputs(args)
    device = resolve_device(args.device)
    model, state = load_model(args.model_path, device)
    tokenizer = Tokenizer(model.context_length)
    options = {"device": device, "batch_size": args.batch_size}
    options["amp"] = inference.checkpoint_precision(state, device)
    dataset = labelled_volumes(model, test_data, test_labels, args.allow_missing)
    thresholds: float | np.ndarray = args.threshold
    if args.val_labels is not None:
        val_data = args.val_data or test_data
        val_ds = labelled_volumes(model, val_data, args.val_labels, args.allow_missing)
        overlap = set(val_ds.names) & set(dataset.names)
        if overlap:
            raise DataError(
                args.val_labels,
                f"{len(overlap)} of its volumes are also test volumes (first: "
                f"{sorted(overlap)[0]}): thresholds chosen on test data would bias the metrics",
            )
        thresholds = validation_thresholds(
            model, val_ds, tokenizer, options, args.threshold, str(args.val_labels)
        )
    else:
        print(
            f"thresholds: {args.threshold:g} for every finding (--val-labels chooses them on "
            "validation)",
            file=sys.stderr,
        )
    probs, y = predict(model, dataset, tokenizer, **options)
    summary = summarize(
        probs.numpy(), y.numpy(), threshold=thresholds, n_boot=args.n_boot, seed=args.seed
    )
    summary.update(
        {
            "checkpoint": str(args.model_path),
            "test_data": str(test_data),
            "test_labels": str(test_labels),
            "thresholds_from": str(args.val_labels) if args.val_labels is not None else "fixed",
        }
    )
    write_report(args.output_dir, dataset.names, probs.numpy(), y.numpy(), summary)
    print(format_summary(summary))
    print(f"written to {args.output_dir}", file=sys.stderr)
    return 0


def final_report(
    model: CTCLIP,
    weights: Path,
    val_ds: CTVolumeDataset,
    tokenizer: Tokenizer,
    amp: AmpPolicy,
    ctx: RunContext,
) -> dict[str, Any]:
    """After training, on the main rank: zero-shot report of ``model`` (holding the best, else
    the final, checkpoint's weights, ``weights``) on the validation set."""
    cfg = ctx.cfg
    options = {"batch_size": cfg.validation.batch_size, "num_workers": cfg.trainer.num_workers}
    # Rank 0 alone writes the report: it embeds every volume itself (no collective).
    probs, labels = predict(model, val_ds, tokenizer, ctx.device, amp, **options, shard=False)
    report = summarize(probs.numpy(), labels.numpy(), n_boot=cfg.validation.n_boot, seed=cfg.seed)
    write_report(ctx.run_dir, val_ds.names, probs.numpy(), labels.numpy(), report)
    print(
        f"\nzero-shot on {len(val_ds)} validation volumes ({Path(weights).name}):", file=sys.stderr
    )
    print(format_summary(report))
    return {
        "checkpoint": str(weights),
        "mean_auc": report["mean"]["auc"],
        "num_evaluated_findings": report["num_evaluated"],
        "zero_shot": report["mean"],
        "auc_per_finding": {
            r["finding"]: r["auc"] for r in report["per_finding"] if np.isfinite(r["auc"])
        },
    }
