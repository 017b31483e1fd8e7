"""``histommnet-train``'s orchestration: data, patient-wise folds, one training per fold, summary.

Per fold (``histommnet.train.run_fold``): nested patient-wise validation split, training with
medcore's Trainer, thresholds chosen on validation and applied to the test patients. Then
mean +- std over folds, tables (CSV + Markdown) and plots.

Run directory::

    config.yaml  dataset.json  splits.json  metrics.json  metrics.jsonl
    fold_<i>/checkpoints/{fold_<i>_best.pth, fold_<i>_best.safetensors, latest.pt, final.pt}
    fold_<i>/{metrics.jsonl, tb/, result.json, predictions_{image,patient}.csv (test),
              predictions_val_{image,patient}.csv (validation, where thresholds were chosen)}
    plots/{roc_image.png, roc_patient.png, confusion_fold<i>_<level>.png, curves_fold<i>_*.png}
    tables/{cv_folds, cv_summary}.{csv,md}
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histommnet.breakhis import BreakHisIndex, Patient, scan_breakhis
from histommnet.config import PACKAGE, HistoConfig
from histommnet.data import input_size, normalization
from histommnet.evaluate import (
    LEVELS,
    METRICS,
    summarize_folds,
    summary_display,
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
from histommnet.train import run_fold
from medcore.cli import (
    RunContext,
    continue_run,
    default_run_dir,
    find_run,
    format_table,
    setup_run,
)
from medcore.demo import ensure_demo_data
from medcore.errors import DataError, UserError
from medcore.io import atomic_write_json
from medcore.runlog import RunLogger
from medcore.splits import (
    SplitLeakError,
    check_no_leak,
    load_splits,
    nested_validation,
    save_splits,
    stratified_group_kfold,
)
from medcore.summary import dry_run
from medcore.weights import require_pretrained

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


def make_folds(patients: list[Patient], cfg: HistoConfig) -> list[dict[str, np.ndarray]]:
    """Patient-wise stratified folds with a nested validation split; indices into ``patients``."""
    labels = np.array([p.label for p in patients])
    strata = np.array([p.subtype for p in patients]) if cfg.cv.stratify_subtype else labels
    groups = np.array([p.patient_id for p in patients])
    n_groups = len(set(groups.tolist()))
    if cfg.cv.folds < 2 or n_groups < cfg.cv.folds:
        raise DataError(
            "cv.folds",
            f"{cfg.cv.folds} folds need at least 2 and at most {n_groups} (the patients)",
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            outer = stratified_group_kfold(strata, groups, n_splits=cfg.cv.folds, seed=cfg.seed)
        except ValueError as exc:  # every subtype has fewer patients than folds
            if not cfg.cv.stratify_subtype:
                raise DataError("cv.folds", str(exc)) from None
            print(
                f"note: cannot stratify by subtype ({exc}); stratifying by class only",
                file=sys.stderr,
            )
            outer = stratified_group_kfold(labels, groups, n_splits=cfg.cv.folds, seed=cfg.seed)
        folds = []
        for i, fold in enumerate(outer):
            train, val = nested_validation(
                fold["train"], labels, groups, cfg.cv.val_fraction, seed=cfg.seed + i
            )
            folds.append({"train": train, "val": val, "test": fold["test"]})
    for w in {str(w.message) for w in caught}:
        print(f"note: splitting: {w}", file=sys.stderr)
    for i, split in enumerate(folds):
        try:
            check_no_leak(split, groups)
        except SplitLeakError as exc:
            raise DataError(f"fold {i}", f"patient leak between splits ({exc})") from None
        for name, idx in split.items():
            if len(idx) == 0 or len(set(labels[idx].tolist())) < 2:
                raise DataError(
                    f"fold {i}",
                    f"the {name} split lacks a class (too few patients for "
                    f"{cfg.cv.folds} folds and a {cfg.cv.val_fraction:.0%} validation split)",
                )
    return folds


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
    path = run_dir / "splits.json"
    if path.is_file():
        return read_folds(path, patients)
    folds = make_folds(patients, cfg)
    if is_main:  # every rank computes the same folds; one writes them
        save_splits(
            path,
            folds,
            ids=[p.key for p in patients],
            meta={
                "seed": cfg.seed,
                "folds": cfg.cv.folds,
                "val_fraction": cfg.cv.val_fraction,
                "stratify_subtype": cfg.cv.stratify_subtype,
                "unit": "patient folder",
            },
        )
    return folds


def resume_run_dir(resume: str, output_dir: Path | None) -> Path:
    """The run directory to continue: ``latest`` (newest run) or a run dir / one of its checkpoints."""
    if resume == "latest":
        run_dir = find_run(PACKAGE, output_dir, "config.yaml")[0]
    else:
        path = Path(resume)
        # .../fold_<i>/checkpoints/latest.pt -> the run directory
        run_dir = path.parents[2] if path.is_file() and path.parent.name == "checkpoints" else path
    if not (run_dir / "config.yaml").is_file():
        raise UserError(
            f"--resume {resume}", "no histommnet run directory (with config.yaml) to continue"
        )
    return run_dir


def run(args: argparse.Namespace) -> int:
    """``histommnet-train`` after parsing: resolve the run, then dry-run or cross-validate."""
    if args.resume:
        continue_run(args, resume_run_dir(args.resume, args.output_dir))
        args.resume = None  # cross-validation resumes fold by fold (see run_fold)
    extra = [f"model.name={args.model}"] if args.model else []
    extra += [f"cv.folds={args.folds}"] if args.folds is not None else []
    extra += [f"cv.fold={args.fold}"] if args.fold is not None else []
    args.overrides = [*args.overrides, *extra]
    if args.output_dir is None:
        args.output_dir = default_run_dir(PACKAGE)
    fresh = not Path(args.output_dir).exists()
    ctx = setup_run(args, HistoConfig, PACKAGE, "default", smoke_overrides=SMOKE_OVERRIDES)
    try:
        cfg: HistoConfig = ctx.cfg
        if args.dry_run:
            return _dry_run(ctx)
        try:
            require_pretrained(
                cfg.model.pretrained,
                cfg.model.pretrained_weights,
                "model.pretrained",
                weights_hint(cfg.model.backbone),
            )
        except UserError:
            if fresh and ctx.dist.is_main:  # refused before any work: leave no run behind
                ctx.release()
                shutil.rmtree(ctx.run_dir, ignore_errors=True)
            raise
        if cfg.cv.fold is not None and not 0 <= cfg.cv.fold < cfg.cv.folds:
            raise UserError("--fold", f"must be in 0..{cfg.cv.folds - 1}")
        return cross_validate(ctx)
    finally:
        ctx.release()


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
    results = [run_fold(ctx, patients, folds[i], i) for i in chosen]
    if ctx.dist.is_main:
        _summarize(ctx, results)
    return 0


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
    print(f"\nmean ± std over {len(results)} fold(s)")
    print(format_table(summary_display(summary), ["level", "folds", *METRICS]))
    print(f"\nrun directory: {ctx.run_dir}")
