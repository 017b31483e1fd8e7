"""``histommnet-train``: patient-wise k-fold cross-validation of MMNet or a baseline.

Per fold: nested patient-wise validation split, training with medcore's Trainer (focal loss,
mixup, early stopping on validation balanced accuracy, overfitting warnings), the decision
threshold chosen on validation and applied to the test patients, metrics at image and patient
level. Then mean +- std over folds, tables (CSV + Markdown) and plots.

Run directory::

    config.yaml  dataset.json  splits.json  metrics.json  metrics.jsonl
    fold_<i>/checkpoints/{fold_<i>_best.pth, fold_<i>_best.safetensors, latest.pt, final.pt}
    fold_<i>/{metrics.jsonl, tb/, result.json, predictions_image.csv, predictions_patient.csv}
    plots/{roc_image.png, roc_patient.png, confusion_fold<i>_<level>.png, curves_fold<i>_*.png}
    tables/{cv_folds, cv_summary}.{csv,md}
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from histommnet.breakhis import BreakHisIndex, Patient, scan_breakhis
from histommnet.config import HistoConfig
from histommnet.data import MultiMagDataset, adjust_batch_size
from histommnet.evaluate import (
    LEVELS,
    METRICS,
    level_metrics,
    patient_table,
    predict,
    summarize_folds,
    summary_display,
    write_fold_plots,
    write_roc_plots,
    write_table,
)
from histommnet.losses import FocalLoss, mixup, soft_targets
from histommnet.model import NUM_SUBTYPES, build_model, checkpoint_kind
from histommnet.synthetic import generate_breakhis
from medcore.checkpoint import export_safetensors, load_checkpoint
from medcore.cli import (
    RunContext,
    add_common_args,
    continue_run,
    default_run_dir,
    find_run,
    format_table,
    setup_run,
)
from medcore.config import to_dict
from medcore.demo import ensure_demo_data
from medcore.device import device_defaults
from medcore.errors import DataError, UserError
from medcore.io import RunLock, atomic_write_csv, atomic_write_json
from medcore.logging import RunLogger
from medcore.metrics import select_threshold
from medcore.plots import plot_training_curves
from medcore.splits import (
    SplitLeakError,
    check_no_leak,
    load_splits,
    nested_validation,
    save_splits,
    stratified_group_kfold,
)
from medcore.trainer import EvalContext, Trainer

PACKAGE = "histommnet"
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


def _fold_splits(
    run_dir: Path, patients: list[Patient], cfg: HistoConfig, is_main: bool = True
) -> list[dict[str, np.ndarray]]:
    """The folds, saved to ``splits.json``; a resumed run reuses (and checks) the saved ones."""
    path = run_dir / "splits.json"
    ids = [p.key for p in patients]
    if path.is_file():
        try:
            return load_splits(path, ids=ids)
        except ValueError as exc:
            raise DataError(path, str(exc).removeprefix(f"{path}: ")) from None
    folds = make_folds(patients, cfg)
    if is_main:  # every rank computes the same folds; one writes them
        save_splits(
            path,
            folds,
            ids=ids,
            meta={
                "seed": cfg.seed,
                "folds": cfg.cv.folds,
                "val_fraction": cfg.cv.val_fraction,
                "stratify_subtype": cfg.cv.stratify_subtype,
                "unit": "patient folder",
            },
        )
    return folds


class _EpochLoss:
    """Mean training loss of the current epoch (for the train/validation gap warning)."""

    def __init__(self) -> None:
        self.total, self.n = 0.0, 0

    def reset(self) -> None:
        self.total, self.n = 0.0, 0

    def add(self, value: float) -> None:
        self.total += value
        self.n += 1

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")


def _make_step_fn(cfg: HistoConfig, criterion: FocalLoss, tracker: _EpochLoss):
    loss_cfg = cfg.loss

    def step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        images, labels, subtypes = batch["images"], batch["label"], batch["subtype"]
        if not torch.isfinite(images).all():
            # Not fed to the model: a forward pass in training mode would write the NaNs into
            # the BatchNorm running statistics even though the Trainer skips the step.
            print("warning: non-finite pixel values in a training batch; skipped", file=sys.stderr)
            return images.new_tensor(float("nan")), {}
        target = soft_targets(labels, 2, loss_cfg.label_smoothing)
        sub_target = soft_targets(subtypes, NUM_SUBTYPES, loss_cfg.label_smoothing)
        if loss_cfg.mixup_alpha > 0 and torch.rand(()) < loss_cfg.mixup_prob:
            images, perm, lam = mixup(images, loss_cfg.mixup_alpha)
            target = lam * target + (1 - lam) * target[perm]
            sub_target = lam * sub_target + (1 - lam) * sub_target[perm]
        out = model(images)
        focal = criterion(out["logits"], target)
        loss = focal
        extras = {"focal": float(focal.detach())}
        if "subtype_logits" in out and loss_cfg.subtype_weight > 0:
            sub = torch.nn.functional.cross_entropy(out["subtype_logits"].float(), sub_target)
            loss = loss + loss_cfg.subtype_weight * sub
            extras["subtype_ce"] = float(sub.detach())
        tracker.add(float(focal.detach()))  # compared with the validation focal loss
        return loss, extras

    return step_fn


def _warn(fold: int, epoch: int, message: str, logger: RunLogger) -> None:
    print(f"warning: fold {fold} epoch {epoch + 1}: {message}", file=sys.stderr)
    logger.log_jsonl({"event": "overfitting_warning", "epoch": epoch, "message": message})


def _make_evaluate_fn(
    cfg: HistoConfig,
    fold: int,
    val_ds: MultiMagDataset,
    criterion: FocalLoss,
    tracker: _EpochLoss,
    eval_bs: int,
):
    warned_perfect: list[int] = []

    def evaluate_fn(model: torch.nn.Module, ctx: EvalContext) -> dict[str, float]:
        draws = predict(model, val_ds, ctx.device, ctx.amp, eval_bs)
        logits = torch.tensor(
            draws[["logit_benign", "logit_malignant"]].to_numpy(), device=ctx.device
        )
        labels = torch.tensor(draws["label"].to_numpy(), device=ctx.device)
        val_loss = float(criterion(logits, labels))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one-class validation sets: NaN AUC, reported as such
            image = level_metrics(draws, 0.5)
            patient = level_metrics(patient_table(draws), 0.5)
        metrics = {
            "val/loss": val_loss,
            "val/balanced_accuracy": image["balanced_accuracy"],
            "val/auc": image["roc_auc"],
            "val/patient_balanced_accuracy": patient["balanced_accuracy"],
            "val/patient_auc": patient["roc_auc"],
            "train/epoch_loss": tracker.mean,
        }
        gap = val_loss - tracker.mean
        if np.isfinite(gap) and gap > cfg.cv.overfit_loss_gap:
            _warn(
                fold,
                ctx.epoch,
                f"validation loss {val_loss:.3f} exceeds training loss {tracker.mean:.3f} "
                f"by {gap:.3f} (> cv.overfit_loss_gap={cfg.cv.overfit_loss_gap})",
                ctx.logger,
            )
        if image["balanced_accuracy"] >= 1.0 and not warned_perfect:
            warned_perfect.append(ctx.epoch)  # once per fold: it stays true once reached
            _warn(
                fold,
                ctx.epoch,
                "perfect validation balanced accuracy: the validation split may be too "
                "small or too easy to reveal overfitting",
                ctx.logger,
            )
        return metrics

    return evaluate_fn


def _threshold(draws, method: str, fold: int) -> float:
    labels = draws["label"].to_numpy()
    if len(set(labels.tolist())) < 2:
        print(f"note: fold {fold}: validation has one class; using threshold 0.5", file=sys.stderr)
        return 0.5
    return select_threshold(labels, draws["prob_malignant"].to_numpy(), method=method)


def run_fold(
    ctx: RunContext, patients: list[Patient], split: dict[str, np.ndarray], fold: int
) -> dict[str, Any]:
    """Train and evaluate one fold; a finished fold is read back, an interrupted one resumed."""
    cfg: HistoConfig = ctx.cfg
    fold_dir = ctx.run_dir / f"fold_{fold}"
    result_path = fold_dir / "result.json"
    if result_path.is_file():
        print(f"fold {fold}: finished earlier, reusing {result_path}", file=sys.stderr)
        return json.loads(result_path.read_text(encoding="utf-8"))
    subsets = {name: [patients[j] for j in split[name]] for name in ("train", "val", "test")}
    train_ds = MultiMagDataset(subsets["train"], cfg.data, train=True, seed=cfg.seed * 1000 + fold)
    val_ds = MultiMagDataset(subsets["val"], cfg.data, train=False, seed=cfg.seed)
    test_ds = MultiMagDataset(subsets["test"], cfg.data, train=False, seed=cfg.seed)

    requested = cfg.trainer.batch_size or device_defaults(ctx.device).batch_size
    batch_size, drop_last = adjust_batch_size(
        requested, len(train_ds) // ctx.dist.world_size, cfg.data.min_batches_per_epoch
    )
    eval_bs = cfg.cv.eval_batch_size or 2 * requested
    tcfg = dataclasses.replace(
        cfg.trainer,
        batch_size=batch_size,
        drop_last=drop_last or cfg.trainer.drop_last,
        best_name=f"fold_{fold}_best.pth",
    )
    print(
        f"fold {fold}: {len(subsets['train'])} train / {len(subsets['val'])} val / {len(subsets['test'])} test "
        f"patients; {len(train_ds)} training draws per epoch, batch size {batch_size}",
        file=sys.stderr,
    )

    model = build_model(cfg.model, cfg.data.magnifications)
    criterion = FocalLoss(cfg.loss.focal_alpha, cfg.loss.focal_gamma, cfg.loss.label_smoothing).to(
        ctx.device
    )
    tracker = _EpochLoss()

    def on_epoch_start(epoch: int) -> None:
        train_ds.set_epoch(epoch)
        tracker.reset()

    kind = checkpoint_kind(model)
    logger = RunLogger(fold_dir, enabled=ctx.dist.is_main)
    trainer = Trainer(
        model,
        tcfg,
        train_data=train_ds,
        step_fn=_make_step_fn(cfg, criterion, tracker),
        run_dir=fold_dir,
        device=ctx.device,
        kind=kind,
        evaluate_fn=_make_evaluate_fn(cfg, fold, val_ds, criterion, tracker, eval_bs),
        seed=cfg.seed + fold,
        extra_state={
            "model_config": to_dict(cfg.model),
            "magnifications": list(cfg.data.magnifications),
            "image_size": cfg.data.image_size,
            "fold": fold,
        },
        on_epoch_start=on_epoch_start,
        logger=logger,
    )
    ckpt_dir = fold_dir / "checkpoints"
    final_path = ckpt_dir / "final.pt"
    if final_path.is_file():
        history = load_checkpoint(final_path, kind=kind).get("history", [])
    else:
        latest = ckpt_dir / "latest.pt"
        history = trainer.fit(resume=latest if latest.is_file() else None).history
    if not ctx.dist.is_main:
        return {}

    best_path = ckpt_dir / tcfg.best_name
    weights_path = best_path if best_path.is_file() else final_path
    state = load_checkpoint(weights_path, kind=kind)
    model.load_state_dict(state["model"])
    model.to(ctx.device)
    export_safetensors(
        state["model"], best_path.with_suffix(".safetensors"), metadata={"kind": kind}
    )

    val_draws = predict(model, val_ds, ctx.device, trainer.amp, eval_bs)
    threshold = _threshold(val_draws, cfg.cv.threshold_method, fold)
    test_draws = predict(model, test_ds, ctx.device, trainer.amp, eval_bs)
    frames = {
        "val": (val_draws, patient_table(val_draws)),
        "test": (test_draws, patient_table(test_draws)),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = {
            split_name: {
                level: level_metrics(frame, threshold)
                for level, frame in zip(LEVELS, pair, strict=True)
            }
            for split_name, pair in frames.items()
        }
    result: dict[str, Any] = {
        "fold": fold,
        "threshold": threshold,
        "threshold_method": cfg.cv.threshold_method,
        "checkpoint": str(weights_path),
        "best_epoch": int(state.get("epoch", 0)),
        "patients": {name: len(subsets[name]) for name in subsets},
        "draws": {"train_per_epoch": len(train_ds), "val": len(val_ds), "test": len(test_ds)},
        **scores,
    }
    if "subtype_pred" in test_draws:
        result["test_subtype_accuracy"] = float(
            (test_draws["subtype_pred"] == test_draws["subtype"]).mean()
        )

    atomic_write_csv(fold_dir / "predictions_image.csv", test_draws)
    atomic_write_csv(fold_dir / "predictions_patient.csv", frames["test"][1])
    plots = ctx.run_dir / "plots"
    write_fold_plots(plots, fold, test_draws, frames["test"][1], threshold)
    if history:
        plot_training_curves(
            history, ["train/epoch_loss", "val/loss"], plots / f"curves_fold{fold}_loss.png"
        )
        plot_training_curves(
            history,
            ["val/balanced_accuracy", "val/patient_balanced_accuracy", "val/auc"],
            plots / f"curves_fold{fold}_val.png",
        )
    logger.write_final(result, "result.json")
    logger.close()
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histommnet-train", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument(
        "--model", choices=("mmnet", "single", "concat"), help="model kind (default: mmnet)"
    )
    parser.add_argument("--folds", type=int, help="number of cross-validation folds (default 5)")
    parser.add_argument("--fold", type=int, help="run only this fold (0-based)")
    return parser


def _resume_run_dir(resume: str, output_dir: Path | None) -> Path:
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


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume:
        continue_run(args, _resume_run_dir(args.resume, args.output_dir))
        args.resume = None  # cross-validation resumes fold by fold (see run_fold)
    extra = [f"model.name={args.model}"] if args.model else []
    extra += [f"cv.folds={args.folds}"] if args.folds is not None else []
    extra += [f"cv.fold={args.fold}"] if args.fold is not None else []
    args.overrides = [*args.overrides, *extra]
    if args.output_dir is None:
        args.output_dir = default_run_dir(PACKAGE)
    # The lock is taken before setup_run writes config.yaml: a second job aimed at a running
    # job's directory is refused before it changes anything there.
    is_main = int(os.environ.get("RANK", "0")) == 0
    with _run_lock(Path(args.output_dir)) if is_main else contextlib.nullcontext():
        ctx = setup_run(args, HistoConfig, PACKAGE, "default", smoke_overrides=SMOKE_OVERRIDES)
        cfg: HistoConfig = ctx.cfg
        if cfg.cv.fold is not None and not 0 <= cfg.cv.fold < cfg.cv.folds:
            raise UserError("--fold", f"must be in 0..{cfg.cv.folds - 1}")
        return _cross_validate(ctx)


def _run_lock(run_dir: Path) -> RunLock:
    try:  # created first so that the lock is always <run_dir>/.lock
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            run_dir, f"cannot create the run directory ({exc.strerror or exc})"
        ) from None
    return RunLock(run_dir)


def _cross_validate(ctx: RunContext) -> int:
    cfg: HistoConfig = ctx.cfg
    index = load_index(cfg, verbose=ctx.dist.is_main)
    patients = index.patients
    folds = _fold_splits(ctx.run_dir, patients, cfg, ctx.dist.is_main)
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
    if not ctx.dist.is_main:
        return 0

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

    print(f"\n{cfg.model.name}: per-fold test metrics (threshold chosen on validation)")
    print(
        format_table(
            per_fold.to_dict("records"), ["fold", "level", "threshold", *METRICS], floatfmt=".3f"
        )
    )
    print(f"\nmean ± std over {len(results)} fold(s)")
    print(format_table(summary_display(summary), ["level", "folds", *METRICS]))
    print(f"\nrun directory: {ctx.run_dir}")
    return 0
