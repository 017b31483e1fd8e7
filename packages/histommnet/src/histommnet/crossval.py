"""``histommnet-train``'s orchestration: data, patient-wise folds, one training per fold, summary.

Every image is decoded once at the input size (``histommnet.data.WorkingImages``) for all
folds. Each fold is a ``medcore.cli.stages`` stage ``fold_<i>`` (a resumed run skips finished folds
and resumes the interrupted one): nested patient-wise validation split, training
(``histommnet.train.train_fold``), thresholds chosen on validation and applied to the test
patients (``histommnet.evaluate.test_fold``). Then mean +- std over folds, tables (CSV +
Markdown) and plots.

Run directory::

    config.yaml  dataset.json  splits.json  metrics.json  metrics.jsonl
    fold_<i>/checkpoints/{fold_<i>_best.pth, fold_<i>_best.safetensors, final.pt}
                        (and latest.pt until the fold finishes)
    fold_<i>/{stage.json, metrics.jsonl, tb/, result.json, predictions_{image,patient}.csv (test),
              predictions_val_{image,patient}.csv (validation, where thresholds were chosen)}
    plots/{roc_image.png, roc_patient.png, confusion_fold<i>_<level>.png, curves_fold<i>_*.png}
    tables/{cv_folds, cv_summary}.{csv,md}
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm

from histommnet.breakhis import (
    CLASSES,
    SUBTYPE_NAMES,
    SUBTYPES,
    BreakHisIndex,
    Patient,
    scan_breakhis,
)
from histommnet.config import PACKAGE, HistoConfig
from histommnet.data import MultiMagDataset, WorkingImages, input_size, normalization
from histommnet.evaluate import (
    LEVELS,
    METRICS,
    RATES_NOTE,
    summarize_folds,
    summary_display,
    test_fold,
    write_roc_plots,
    write_table,
)
from histommnet.model import (
    build_model,
    dry_run_model_config,
    resolve_normalization,
    weights_hint,
)
from histommnet.synthetic import generate_breakhis
from histommnet.train import save_fold_model, train_fold
from medcore.cli.dry_run import dry_run
from medcore.cli.run_setup import RunContext, resolve_run, start_run
from medcore.cli.stages import Stage, run_stage
from medcore.data.demo_cache import ensure_demo_data
from medcore.data.splits import (
    SplitLeakError,
    check_no_leak,
    load_or_make_splits,
    load_splits,
    nested_validation,
    stratified_group_kfold,
)
from medcore.engine.inference import PredictOptions, checkpoint_precision
from medcore.engine.run_log import RunLogger
from medcore.errors import ConfigError, DataError, UserError
from medcore.io import atomic_write_json
from medcore.report.tables import format_table
from medcore.weights.pretrained import require_pretrained

DEMO_VERSION = "v2"
SMOKE_OVERRIDES = ["cv.fold=0", "data.eval_max_draws=2", "data.max_draws_per_patient=3"]


def _generate_demo(path: Path) -> None:
    generate_breakhis(
        path, patients_per_subtype=4, images_per_magnification=(4, 9), size=64, seed=0
    )


def resolve_data_dir(cfg: HistoConfig) -> Path:
    """``data.data_dir``, or the cached synthetic demo tree (generated on first use)."""
    if cfg.data.data_dir:
        return Path(cfg.data.data_dir)
    print("no --data-dir: using the built-in synthetic BreakHis demo data", file=sys.stderr)
    return ensure_demo_data(PACKAGE, _generate_demo, version=DEMO_VERSION)


def load_index(cfg: HistoConfig, verbose: bool = True) -> BreakHisIndex:
    return scan_breakhis(
        resolve_data_dir(cfg),
        cfg.data.magnifications,
        cfg.data.missing_magnification,
        cfg.data.check_images,
        verbose=verbose,
    )


@dataclass
class FoldPlan:
    """Patient-wise folds (indices into the patients) and what they are stratified by."""

    folds: list[dict[str, np.ndarray]]
    stratify: str  # "subtype" or "class"
    fallback: str | None = None  # why subtype stratification was given up

    def meta(self) -> dict[str, Any]:
        """What ``splits.json`` records about the stratification."""
        return {"stratified_by": self.stratify, "stratify_fallback": self.fallback}


def _patient_counts(values: np.ndarray, groups: np.ndarray) -> dict[int, int]:
    """Patients (splitting groups) per value of ``values``."""
    return {int(v): len(set(groups[values == v].tolist())) for v in sorted(set(values.tolist()))}


def _split_folds(
    strata: np.ndarray, labels: np.ndarray, groups: np.ndarray, cfg: HistoConfig
) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """Outer folds stratified on ``strata``, each with a class-stratified nested validation
    split, and the splitters' warnings; ValueError when the strata cannot fill the folds."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outer = stratified_group_kfold(strata, groups, n_splits=cfg.cv.folds, seed=cfg.seed)
        folds = []
        for i, fold in enumerate(outer):
            train, val = nested_validation(
                fold["train"], labels, groups, cfg.cv.val_fraction, seed=cfg.seed + i
            )
            folds.append({"train": train, "val": val, "test": fold["test"]})
    return folds, list(dict.fromkeys(str(w.message) for w in caught))


def _missing_class(
    folds: list[dict[str, np.ndarray]], labels: np.ndarray
) -> tuple[int, str, int] | None:
    """The first (fold, split, absent class) of a split without both classes, else None."""
    for i, split in enumerate(folds):
        for name, idx in split.items():
            present = set(labels[idx].tolist())
            for label in range(len(CLASSES)):
                if label not in present:
                    return i, name, label
    return None


def make_folds(patients: list[Patient], cfg: HistoConfig) -> FoldPlan:
    """Patient-wise stratified folds with a nested validation split; indices into ``patients``.

    Stratified by subtype when ``cv.stratify_subtype``, unless that cannot give every split
    both classes (subtypes with fewer patients than folds): then by class, said in one line.
    A DataError only when class-stratified folds cannot give every split both classes either.
    """
    labels = np.array([p.label for p in patients])
    subtypes = np.array([p.subtype for p in patients])
    groups = np.array([p.patient_id for p in patients])
    n_groups = len(set(groups.tolist()))
    if cfg.cv.folds < 2 or n_groups < cfg.cv.folds:
        raise DataError(
            "cv.folds",
            f"{cfg.cv.folds} folds need at least 2 and at most {n_groups} (the patients)",
        )
    k = cfg.cv.folds
    per_class = _patient_counts(labels, groups)
    fallback = None
    if cfg.cv.stratify_subtype:
        per_subtype = _patient_counts(subtypes, groups)
        try:
            folds, notes = _split_folds(subtypes, labels, groups, cfg)
            gap = _missing_class(folds, labels)
        except ValueError:  # every subtype has fewer patients than folds
            gap = None
            why = f"every subtype has fewer than {k} patients, at most {max(per_subtype.values())}"
        else:
            if gap is None:
                _check_folds(folds, groups)
                for note in notes:
                    print(f"note: splitting: {note}", file=sys.stderr)
                return FoldPlan(folds, "subtype")
            fold, split, label = gap
            scarce = ", ".join(
                f"{SUBTYPE_NAMES[s]} {n}"
                for s, n in per_subtype.items()
                if SUBTYPES[s][2] == label and n < k
            )
            why = f"fold {fold}'s {split} split would get no {CLASSES[label]} patient; " + (
                f"{CLASSES[label]} subtypes with fewer than {k} patients: {scarce}"
                if scarce
                else f"{per_class.get(label, 0)} {CLASSES[label]} patients"
            )
        fallback = f"cannot stratify {k} folds by subtype ({why})"
        print(
            f"note: cv.stratify_subtype: {fallback}; stratifying by class instead "
            "(the folds stay patient-wise)",
            file=sys.stderr,
        )
    counts = ", ".join(f"{per_class.get(c, 0)} {name}" for c, name in enumerate(CLASSES))
    need = f"too few patients ({counts}) for {k} folds and a {cfg.cv.val_fraction:.0%} validation split"
    try:
        folds, notes = _split_folds(labels, labels, groups, cfg)
    except ValueError as exc:
        raise DataError("cv.folds", f"{exc} ({need})") from None
    gap = _missing_class(folds, labels)
    if gap is not None:
        fold, split, label = gap
        raise DataError(
            f"fold {fold}", f"the {split} split lacks {CLASSES[label]} patients: {need}"
        )
    _check_folds(folds, groups)
    for note in notes:
        print(f"note: splitting: {note}", file=sys.stderr)
    return FoldPlan(folds, "class", fallback)


def _check_folds(folds: list[dict[str, np.ndarray]], groups: np.ndarray) -> None:
    for i, split in enumerate(folds):
        try:
            check_no_leak(split, groups)
        except SplitLeakError as exc:
            raise DataError(f"fold {i}", f"patient leak between splits ({exc})") from None


def read_folds(path: Path, patients: list[Patient]) -> list[dict[str, np.ndarray]]:
    """A run's saved ``splits.json``, checked against the patients found in the data now."""
    try:
        return load_splits(path, ids=[p.key for p in patients])
    except ValueError as exc:
        raise DataError(path, str(exc).removeprefix(f"{path}: ")) from None


def fold_splits(
    run_dir: Path, patients: list[Patient], cfg: HistoConfig, is_main: bool = True
) -> list[dict[str, np.ndarray]]:
    """The folds, saved to ``splits.json``; a resumed run reuses (and checks) the saved ones."""
    meta = {
        "seed": cfg.seed,
        "folds": cfg.cv.folds,
        "val_fraction": cfg.cv.val_fraction,
        "stratify_subtype": cfg.cv.stratify_subtype,
        "unit": "patient folder",
    }

    def make() -> list[dict[str, np.ndarray]]:
        plan = make_folds(patients, cfg)
        meta.update(plan.meta())  # saved with the folds, after make() returns
        return plan.folds

    return load_or_make_splits(
        run_dir / "splits.json", make, ids=[p.key for p in patients], meta=meta, is_main=is_main
    )


def check_config(cfg: HistoConfig, dry: bool = False) -> None:
    """What refuses a config before the run directory exists."""
    if not dry:
        require_pretrained(
            cfg.model.pretrained,
            cfg.model.pretrained_weights,
            "model.pretrained",
            weights_hint(cfg.model.backbone),
        )
    if cfg.cv.fold is not None and not 0 <= cfg.cv.fold < cfg.cv.folds:
        raise UserError("--fold", f"must be in 0..{cfg.cv.folds - 1}")
    if not timm.is_model(cfg.model.backbone):
        raise ConfigError("model.backbone", f"unknown timm model {cfg.model.backbone!r}")
    mags = list(cfg.data.magnifications)
    if cfg.model.name == "single" and cfg.model.single_magnification not in mags:
        raise ConfigError(
            "model.single_magnification",
            f"{cfg.model.single_magnification} is not among data.magnifications {mags}",
        )


def run(args: argparse.Namespace) -> int:
    """``histommnet-train`` after parsing: resolve the run, then dry-run or cross-validate."""
    request = resolve_run(
        args, HistoConfig, PACKAGE, "default", smoke_overrides=SMOKE_OVERRIDES, staged=True
    )
    check_config(request.cfg, dry=args.dry_run)
    with start_run(request) as ctx:
        return _dry_run(ctx) if args.dry_run else cross_validate(ctx)


def _dry_run(ctx: RunContext) -> int:
    cfg: HistoConfig = ctx.cfg
    model_cfg = dry_run_model_config(cfg.model)
    height, width = input_size(cfg.data)
    dry_run(
        lambda: build_model(model_cfg, cfg.data.magnifications),
        ctx.run_dir,
        extra={
            "backbone": cfg.model.backbone,
            "trunks": 1
            if cfg.model.shared_backbone or cfg.model.name == "single"
            else len(cfg.data.magnifications),
            "input_size": [len(cfg.data.magnifications), 3, height, width],
        },
    )
    return 0


def cross_validate(ctx: RunContext) -> int:
    """Every chosen fold (finished ones read back), then the summary tables, plots and JSON."""
    cfg = dataclasses.replace(ctx.cfg, data=resolve_normalization(ctx.cfg.model, ctx.cfg.data))
    ctx.cfg = cfg
    if ctx.dist.is_main:
        norm = normalization(cfg.data)
        print(
            f"input: {'x'.join(map(str, input_size(cfg.data)))} px, mean {norm['mean']}, "
            f"std {norm['std']}, {norm['interpolation']} resize ({cfg.model.backbone})",
            file=sys.stderr,
        )
    index = load_index(cfg, verbose=ctx.dist.is_main)
    patients = index.patients
    folds = fold_splits(ctx.run_dir, patients, cfg, ctx.dist.is_main)
    if ctx.dist.is_main:
        atomic_write_json(
            ctx.run_dir / "dataset.json",
            {
                "patients": len(patients),
                "images": len(index.images),
                "skipped": index.skipped,
                "filled_magnifications": {p.key: p.filled_from for p in patients if p.filled_from},
            },
        )
    chosen = [cfg.cv.fold] if cfg.cv.fold is not None else list(range(len(folds)))
    # decoded once at the input size, for every fold, split and DataLoader worker
    mags = cfg.data.magnifications
    images = WorkingImages(
        [path for p in patients for m in mags for path in p.images[m]],
        cfg.data,
        progress=ctx.dist.is_main,
    )
    results = [
        run_stage(
            ctx, f"fold_{i}", lambda stage, i=i: _fold(ctx, stage, images, patients, folds[i], i)
        )
        for i in chosen
    ]
    if ctx.dist.is_main:
        _summarize(ctx, results)
    return 0


def _fold(
    ctx: RunContext,
    stage: Stage,
    images: WorkingImages,
    patients: list[Patient],
    split: dict[str, np.ndarray],
    fold: int,
) -> dict[str, Any]:
    """Stage ``fold_<i>``: train on the fold's training patients, then test; its result."""
    cfg: HistoConfig = ctx.cfg
    subsets = {name: [patients[j] for j in split[name]] for name in ("train", "val", "test")}
    seeds = {"train": cfg.seed * 1000 + fold, "val": cfg.seed, "test": cfg.seed}
    ds = {
        name: MultiMagDataset(part, cfg.data, name == "train", seeds[name], images=images)
        for name, part in subsets.items()
    }
    logger = RunLogger(stage.dir, enabled=ctx.dist.is_main)
    trained = train_fold(ctx, stage, ds["train"], ds["val"], fold, logger)
    if trained is None:  # not the main rank
        return {}
    tested = test_fold(
        trained.model,
        fold,
        ds["val"],
        ds["test"],
        options=PredictOptions(
            ctx.device,
            checkpoint_precision(trained.state, ctx.device),
            trained.eval_batch_size,
            cfg.trainer.num_workers,
        ),
        method=cfg.cv.threshold_method,
        fold_dir=stage.dir,
        plots_dir=ctx.run_dir / "plots",
        history=trained.history,
    )
    thresholds = tested.pop("thresholds")
    method = tested.pop("threshold_method")
    model_path = save_fold_model(trained, {"thresholds": thresholds, "threshold_method": method})
    result: dict[str, Any] = {
        "fold": fold,
        "thresholds": thresholds,
        "threshold_method": method,
        "focal_class_weights": {"benign": 1.0 - trained.alpha, "malignant": trained.alpha},
        "checkpoint": str(model_path),
        "selected_from": trained.weights_path.name,
        "best_epoch": int(trained.state.get("epoch", 0)),
        "patients": {name: len(part) for name, part in subsets.items()},
        "draws": {
            "train_per_epoch": len(ds["train"]),
            "val": len(ds["val"]),
            "test": len(ds["test"]),
        },
        **tested,
    }
    logger.write_final(result, "result.json")
    logger.close()
    return result


def _summarize(ctx: RunContext, results: list[dict[str, Any]]) -> None:
    cfg: HistoConfig = ctx.cfg
    per_fold, summary = summarize_folds(results)
    tables = ctx.run_dir / "tables"
    write_table(per_fold, tables / "cv_folds")
    write_table(summary, tables / "cv_summary")
    frames = {}
    for res in results:
        fold_dir = ctx.run_dir / f"fold_{res['fold']}"
        frames[res["fold"]] = (
            pd.read_csv(fold_dir / "predictions_image.csv"),
            pd.read_csv(fold_dir / "predictions_patient.csv"),
        )
    write_roc_plots(ctx.run_dir / "plots", frames)
    final = {
        "model": cfg.model.name,
        "folds": results,
        "summary": {
            row["level"]: {k: v for k, v in row.items() if k != "level"}
            for row in summary.to_dict("records")
        },
    }
    logger = RunLogger(ctx.run_dir)
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

    print(f"\n{cfg.model.name}: per-fold test metrics (thresholds chosen on validation)")
    print(
        format_table(
            per_fold.to_dict("records"), ["fold", "level", "threshold", *METRICS], floatfmt=".3f"
        )
    )
    print(RATES_NOTE)
    print(f"\nmean ± std over {len(results)} fold(s)")
    print(format_table(summary_display(summary), ["level", "folds", *METRICS]))
    print(f"\nrun directory: {ctx.run_dir}")
