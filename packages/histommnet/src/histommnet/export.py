"""``histommnet-export``: one fold of a cross-validation run -> a Hugging Face model folder.

The model of a run is one fold's selected weights with that fold's decision thresholds. By
default the fold whose selected checkpoint scored best on its own validation split by the
run's selection metric (``val/selection``: balanced accuracy at the validation-optimal
threshold, ties broken by the lower validation loss; equal scores go to the lower fold);
``--fold K`` (``histommnet.load(run, fold=K)``) names another. One fold rather than the fold
ensemble because a fold's thresholds were chosen on that fold's validation patients for that
fold's probabilities, and evaluation applies them so: an average of five models has no
threshold chosen the way evaluation chooses one.

The folder's ``config.json`` carries what predicting needs without the run: the model config,
the magnifications, input size, normalisation and resize filter, how a patient's image tuples
are drawn (seed, cap, missing magnifications), the image- and patient-level thresholds, the
training precision. Its ``README.md`` card lists the fold's test metrics with bootstrap
intervals (from the fold's saved predictions) and the run's cross-validation means.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from histommnet.breakhis import CLASSES, SUBTYPE_NAMES
from histommnet.config import PACKAGE, DataConfig
from histommnet.model import KINDS
from medcore.config import read_yaml
from medcore.report.model_card import MetricRow, ModelCard, split_sizes
from medcore.weights.export import ModelExport
from medcore.weights.sources import ModelSource, ModelSourceError

LEVELS = ("image", "patient")
CARD_METRICS = ("balanced_accuracy", "sensitivity", "specificity", "recognition_rate")
BOOT = 1000


def fold_checkpoint(run_dir: Path, fold: int) -> Path:
    return run_dir / f"fold_{fold}" / "checkpoints" / f"fold_{fold}_best.pth"


def tested_folds(run_dir: Path) -> list[int]:
    """The folds of a run whose selected checkpoint was tested (``result.json`` written)."""
    folds = []
    for result in sorted(Path(run_dir).glob("fold_*/result.json")):
        name = result.parent.name.removeprefix("fold_")
        if name.isdigit() and fold_checkpoint(run_dir, int(name)).is_file():
            folds.append(int(name))
    return sorted(folds)


def selection_value(checkpoint: Path) -> float:
    """The validation selection score a fold's checkpoint was selected with (``best.value``).

    Memory-mapped: only the small entries are read, not the weights.
    """
    import torch

    from medcore.weights.checkpoint import load_checkpoint

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # medcore's reader below names what is wrong with the file
        state = load_checkpoint(checkpoint)
    best = state.get("best") if isinstance(state, dict) else None
    value = best.get("value") if isinstance(best, dict) else None
    return float(value) if isinstance(value, (int, float)) else -math.inf


def find_in_run(run_dir: str | Path, fold: int | None = None) -> Path | None:
    """The checkpoint that is the run's model: fold ``fold``'s, else the best tested fold's
    (module docstring). None when ``run_dir`` has no fold at all (not a histommnet run)."""
    run_dir = Path(run_dir)
    folds = tested_folds(run_dir)
    if fold is not None:
        if fold not in folds:
            have = ", ".join(map(str, folds)) or "none"
            raise ModelSourceError(
                run_dir, f"fold {fold} has no tested fold_{fold}_best.pth (tested folds: {have})"
            )
        return fold_checkpoint(run_dir, fold)
    if not folds:
        if any(run_dir.glob("fold_*/checkpoints")):
            raise ModelSourceError(
                run_dir,
                "no fold was tested yet (finish the run: histommnet-train --resume "
                f"{run_dir}), or name a checkpoint",
            )
        return None
    scores = {k: selection_value(fold_checkpoint(run_dir, k)) for k in folds}
    best = max(folds, key=lambda k: (scores[k], -k))
    return fold_checkpoint(run_dir, best)


def fold_thresholds(checkpoint: Path, state: dict[str, Any]) -> dict[str, float]:
    """The decision thresholds (``image``, ``patient``) of a checkpoint's fold: stored in the
    fold's tested ``fold_<i>_best.pth``, else in the fold's ``result.json`` beside its other
    checkpoints; {} when neither has them (an untested fold)."""
    stored = state.get("thresholds")
    if not isinstance(stored, dict):
        result = Path(checkpoint).resolve().parent.parent / "result.json"
        if Path(checkpoint).parent.name != "checkpoints" or not result.is_file():
            return {}
        stored = json.loads(result.read_text(encoding="utf-8")).get("thresholds", {})
    return {level: float(stored[level]) for level in LEVELS if level in stored}


def _run_config(source: ModelSource) -> dict[str, Any]:
    if source.run_dir is None or not (source.run_dir / "config.yaml").is_file():
        return {}
    return read_yaml(source.run_dir / "config.yaml")


def preprocessing(source: ModelSource) -> dict[str, Any]:
    """What predicting needs besides the weights, from the checkpoint (its run's config.yaml
    for checkpoints written before they carried the draw settings)."""
    state = source.config
    norm = state.get("normalization")
    if not isinstance(norm, dict):
        raise ModelSourceError(
            source.source, "records no input normalisation (written by an older release)"
        )
    draws = state.get("draws")
    if not isinstance(draws, dict):
        cfg = _run_config(source)
        if not cfg:
            raise ModelSourceError(
                source.source,
                "records no evaluation draw settings and is not inside its run directory "
                "(config.yaml): pass the run directory",
            )
        data = cfg.get("data", {})
        draws = {
            "seed": int(cfg.get("seed", 42)),
            "eval_max_draws": data.get("eval_max_draws"),
            "missing_magnification": data.get("missing_magnification", "nearest"),
        }
    image_size = int(state.get("image_size", DataConfig.image_size))
    aspect = float(state.get("aspect_ratio", DataConfig.aspect_ratio))
    return {
        "magnifications": list(state["magnifications"]),
        "image_size": image_size,
        "aspect_ratio": aspect,
        "input_size": [image_size, max(1, round(image_size * aspect))],
        "resize": "scaled to cover the input size keeping the shape, centre crop",
        "mean": list(norm["mean"]),
        "std": list(norm["std"]),
        "interpolation": norm["interpolation"],
        "draw_seed": int(draws["seed"]),
        "eval_max_draws": draws["eval_max_draws"],
        "missing_magnification": draws["missing_magnification"],
    }


def _fold_metrics(run_dir: Path, fold: int, thresholds: dict[str, float]) -> dict[str, Any]:
    """The fold's test metrics: bootstrap intervals from its saved predictions at the fold's
    thresholds, the other figures of its ``result.json``."""
    import pandas as pd

    from medcore.metrics.classification import metrics_with_ci

    fold_dir = run_dir / f"fold_{fold}"
    result = json.loads((fold_dir / "result.json").read_text(encoding="utf-8"))
    out: dict[str, Any] = {}
    for level in LEVELS:
        frame = pd.read_csv(fold_dir / f"predictions_{level}.csv")
        labels, scores = frame["label"].to_numpy(), frame["prob_malignant"].to_numpy()
        level_out: dict[str, Any] = {"n": len(frame)}
        if len(set(labels.tolist())) == 2:
            level_out.update(
                metrics_with_ci(labels, scores, thresholds[level], n_boot=BOOT, seed=fold)
            )
        tested = result.get("test", {}).get(level, {})
        level_out.update({m: tested[m] for m in CARD_METRICS if isinstance(tested.get(m), float)})
        out[level] = level_out
    return out


def _cv_means(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text(encoding="utf-8")).get("summary", {})
    return {
        level: {
            "folds": int(values["folds"]),
            **{
                m: values[f"{m}_mean"]
                for m in ("roc_auc", "balanced_accuracy", "accuracy")
                if isinstance(values.get(f"{m}_mean"), float) and math.isfinite(values[f"{m}_mean"])
            },
        }
        for level, values in summary.items()
        if isinstance(values, dict) and "folds" in values
    }


def _rows(tree: dict[str, Any], prefix: str = "") -> list[MetricRow]:
    """Card rows of a nested metrics tree (dotted names; ``{value, ci_low, ci_high}`` leaves)."""
    rows = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and "value" in value:
            rows.append(MetricRow(name, value["value"], value["ci_low"], value["ci_high"]))
        elif isinstance(value, dict):
            rows += _rows(value, f"{name}.")
        else:
            rows.append(MetricRow(name, value))
    return rows


def _card(source: ModelSource, fold: int, thresholds: dict[str, float], pre: dict) -> ModelCard:
    model_cfg = source.model_config
    name = {"mmnet": "MMNet", "single": "single-magnification", "concat": "concatenation"}.get(
        model_cfg.get("name"), model_cfg.get("name")
    )
    mags = ", ".join(pre["magnifications"])
    h, w = pre["input_size"]
    card = ModelCard(
        title=f"histommnet {name} (BreakHis benign / malignant), fold {fold}",
        description=(
            f"{'An' if name == 'MMNet' else 'A'} {name} classifier of breast histopathology patients from their images at {mags} "
            f"({model_cfg.get('backbone')} trunks, {h}x{w} px inputs). One prediction takes one "
            "image per magnification (a draw); a patient's P(malignant) is the mean over its "
            "draws. The decision thresholds were chosen on this fold's validation patients "
            f"(image level {thresholds['image']:.4f}, patient level "
            f"{thresholds['patient']:.4f}) and are applied by `predict`. This is fold {fold} of "
            "a patient-wise cross-validation run, the fold selected by its validation score "
            "unless another was asked for."
        ),
        pipeline_tag="image-classification",
        tags=["histopathology", "breakhis", "breast-cancer"],
        usage='result = model.predict("patients/")  # patient folders of 40X/100X/200X/400X\n'
        "print(result.patients)",
        command="histommnet-predict --model {source} patients/ --output predictions.csv",
        intended_use=(
            "Research on benign / malignant classification of H&E breast tumour tissue imaged "
            "as BreakHis is (700x460 px tiles at 40X, 100X, 200X and 400X of one patient)."
        ),
        limitations=(
            "The metrics come from one fold of a cross-validation on one data set (BreakHis "
            "has 82 patients): few test patients, wide intervals. Staining, scanner and "
            "magnification differences from the training data are not measured. The intervals "
            "resample draws or patients independently (draws of one patient are correlated)."
        ),
    )
    weights = model_cfg.get("pretrained_weights") or ""
    if weights.startswith("hf-hub:"):
        card.base_model = weights.removeprefix("hf-hub:").split("@")[0]
    run_dir = source.run_dir
    if run_dir is None:
        return card
    cfg = _run_config(source)
    dataset = run_dir / "dataset.json"
    counts = json.loads(dataset.read_text(encoding="utf-8")) if dataset.is_file() else {}
    where = (
        "the built-in synthetic BreakHis demo tree"
        if not cfg.get("data", {}).get("data_dir")
        else "a BreakHis v1 tree"
    )
    card.training_data = (
        f"{counts.get('patients', '?')} patient folders, {counts.get('images', '?')} images from "
        f"{where}; patient-wise folds (no patient in two splits), sizes in patient folders "
        f"below. This model is fold {fold}."
    )
    if (run_dir / "splits.json").is_file():
        card.splits = split_sizes(run_dir / "splits.json")
    if (run_dir / f"fold_{fold}" / "result.json").is_file():
        tree = {
            f"fold_{fold}_test": _fold_metrics(run_dir, fold, thresholds),
            "cross_validation_mean": _cv_means(run_dir),
        }
        card.metrics = _rows(tree)
        card.metrics_note = (
            f"fold_{fold}_test: this fold's test patients at its thresholds; auc, f1, precision, "
            f"recall and accuracy with 95% bootstrap intervals ({BOOT} resamples of draws or "
            "patients), the rest without. cross_validation_mean: the mean over the run's "
            "tested folds (each its own model)."
        )
    return card


def describe(source: ModelSource, card: bool = True) -> ModelExport:
    """The exported form of a histommnet checkpoint (a fold's ``fold_<i>_best.pth``);
    ``card=False`` leaves out the model card (``histommnet.load`` has no use for it)."""
    state = source.config
    thresholds = fold_thresholds(source.path, state)
    if set(thresholds) != set(LEVELS):
        raise ModelSourceError(
            source.source,
            "records no decision thresholds: its fold was not tested (finish the run with "
            "histommnet-train --resume RUN, or export the run's tested fold_<i>_best.pth)",
        )
    pre = preprocessing(source)
    fold = int(state.get("fold", -1))
    model_config = {**source.model_config, "pretrained": False, "pretrained_weights": None}
    extras: dict[str, Any] = {
        "fold": fold,
        "threshold_method": state.get("threshold_method"),
        "selection": state.get("best") or {},
        "precision": state.get("precision"),
        "subtypes": list(SUBTYPE_NAMES) if model_config.get("subtype_head") else [],
        "levels": {
            "image": "one draw: one image per magnification",
            "patient": "the mean P(malignant) over a patient's draws",
        },
    }
    return ModelExport(
        kind=source.kind,
        package=PACKAGE,
        model_config=model_config,
        tensors=source.tensors,
        preprocessing=pre,
        labels=list(CLASSES),
        thresholds=thresholds,
        extras=extras,
        card=_card(source, fold, thresholds, pre) if card else None,
    )


def main(args: argparse.Namespace) -> int:
    """``histommnet-export`` after parsing: ``--fold`` picks a run's fold."""
    from medcore.cli.export import run_export
    from medcore.errors import UserError

    if args.fold is not None and not Path(args.source).is_dir():
        raise UserError("--fold", f"applies to a run directory; {args.source} is not one")
    return run_export(args, KINDS, describe, lambda run: find_in_run(run, args.fold))
