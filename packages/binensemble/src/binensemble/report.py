"""After training: predict the validation split and ``TestSet/`` with every model, soft-vote,
analyse the models' agreement (with intervals and the seed's ensemble rule), print the table.

Writes under the run directory: ``predictions/`` (``<model>.csv``, ``<model>_probs.csv``,
``*_val*`` for the validation split, ``vote*``), ``analysis/<split>/`` (``analysis.json``,
``disagreements.csv``, ``analysis.png``) and ``metrics.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from binensemble.config import BinEnsembleConfig
from binensemble.data import ImageSet
from binensemble.ensemble import (
    analyse,
    check_rule,
    disagreement_frame,
    plot_analysis,
    rule_message,
    soft_vote,
    write_predictions,
)
from binensemble.evaluate import summarise
from binensemble.predict import load_bundle, predict_probs
from binensemble.tta import tta_views
from medcore.data.splits import load_splits
from medcore.errors import UserError
from medcore.io import atomic_write_csv, atomic_write_json
from medcore.report.tables import format_table


def _predict_all(
    cfg: BinEnsembleConfig,
    bundle_paths: dict[str, Path],
    sets: dict[str, ImageSet],
    device: torch.device,
) -> dict[str, dict[str, np.ndarray]]:
    """``{split: {model: probs}}`` for every model and every image set given."""
    views = tta_views(cfg)
    out: dict[str, dict[str, np.ndarray]] = {split: {} for split in sets}
    for name, path in bundle_paths.items():
        bundle = load_bundle(path, device)
        for split, images in sets.items():
            out[split][name] = predict_probs(bundle, images, cfg, device, views, f"{name}: {split}")
    return out


def predict_vote_report(
    cfg: BinEnsembleConfig,
    labelled: ImageSet,
    test_set: ImageSet | None,
    test_y: np.ndarray | None,
    bundle_paths: dict[str, Path],
    run_dir: Path,
    device: torch.device,
    extra_lines: list[str] | None = None,
) -> str:
    """Predict validation and test images with every model, vote, analyse; the printed table."""
    pred_dir = run_dir / "predictions"
    splits = load_splits(next(iter(bundle_paths.values())).parent / "splits.json", ids=labelled.ids)
    val_set = labelled.subset(splits["val"])
    sets = {"val": val_set, **({"test": test_set} if test_set is not None else {})}
    targets = {"val": val_set.labels, "test": test_y}
    probs = _predict_all(cfg, bundle_paths, sets, device)
    names = list(bundle_paths)
    weights = cfg.predict.vote_weights or None
    if len(names) > 1:
        if weights is not None and len(weights) != len(names):
            raise UserError(
                "predict.vote_weights", f"needs {len(names)} weights ({', '.join(names)})"
            )
        for split in sets:
            probs[split]["vote"] = soft_vote([probs[split][n] for n in names], weights)
    for split, images in sets.items():
        for name, p in probs[split].items():
            stem = name if split == "test" else f"{name}_val"
            write_predictions(pred_dir, stem, images.ids, p, cfg.data.classes, targets[split])

    rows, summary = [], {}
    for name in probs["val"]:
        entry = summarise(val_set.labels, probs["val"][name])
        if test_y is not None:
            entry.update(summarise(test_y, probs["test"][name], prefix="test/"))
        summary[name] = entry
        row = {"model": name, "val_acc": entry["val/accuracy"], "val_auc": entry["val/roc_auc"]}
        if test_y is not None:
            row.update(test_acc=entry["test/accuracy"], test_auc=entry["test/roc_auc"])
        rows.append(row)
    lines = [format_table(rows), *(extra_lines or [])]
    if len(names) > 1:
        for split, images in sets.items():
            lines += _analysis(cfg, names, probs[split], targets[split], images, split, run_dir)
            summary[f"{split}_agreement"] = json.loads(
                (run_dir / "analysis" / split / "analysis.json").read_text()
            )["pairs"][0]
    if test_set is not None:
        final = pred_dir / ("vote.csv" if len(names) > 1 else f"{names[0]}.csv")
        lines.append(f"predictions for {cfg.data.test_dir}/: {final}")
    if len(names) == 1:
        merged = {**_read_json(run_dir / "metrics.json"), **summary[names[0]]}
        atomic_write_json(run_dir / "metrics.json", merged)
    else:
        atomic_write_json(run_dir / "metrics.json", summary)
    lines.append(f"run directory: {run_dir}")
    return "\n".join(lines)


def _analysis(
    cfg: BinEnsembleConfig,
    names: list[str],
    probs: dict[str, np.ndarray],
    y: np.ndarray | None,
    images: ImageSet,
    split: str,
    run_dir: Path,
) -> list[str]:
    """One split's analysis files; the lines for the table (the rule's warning on stderr)."""
    weights = cfg.predict.vote_weights or None
    e = cfg.ensemble
    per_model = [probs[n] for n in names]
    analysis = analyse(names, per_model, y, weights, e.confidence, e.n_boot, cfg.seed)
    analysis["rule"] = check_rule(analysis, e.min_accuracy, e.max_disagreement)
    out = run_dir / "analysis" / split
    atomic_write_json(out / "analysis.json", analysis)
    atomic_write_csv(
        out / "disagreements.csv", disagreement_frame(images.ids, names, per_model, y, weights)
    )
    plot_analysis(names, per_model, y, analysis, out / "analysis.png")
    pair = analysis["pairs"][0]
    line = (
        f"{split}: agreement {pair['agreement']:.3f} "
        f"[{pair['agreement_ci_low']:.3f}, {pair['agreement_ci_high']:.3f}] "
        f"({e.confidence:.0%} CI), {pair['disagreements']} disagreement(s)"
    )
    if y is not None:
        line += f", oracle accuracy {pair['oracle_accuracy']:.3f}"
    message = rule_message(analysis["rule"], f"{split} ({analysis['n_images']} images)")
    if not analysis["rule"]["holds"]:
        print(message, file=sys.stderr)
    return [line] if not analysis["rule"]["holds"] else [line, message]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
