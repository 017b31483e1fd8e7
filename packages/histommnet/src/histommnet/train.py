"""``histommnet-train``: patient-wise k-fold cross-validation, one training per fold.

Every image is decoded once at the input size (``histommnet.data.WorkingImages``) for all
folds. Each fold is a ``medcore.cli.stages`` stage ``fold_<i>`` (a resumed run skips finished
folds and resumes the interrupted one): the patient-wise folds with a nested validation split
(``histommnet.folds``), training (``train_fold``), thresholds chosen on validation and applied to
the test patients (``histommnet.evaluate.test_fold``). Then mean +- std over folds, tables (CSV +
Markdown) and plots (``histommnet.evaluate.write_summary``).

A fold's training: batched on-device augmentation (``histommnet.data.TrainAugment``), focal loss
(class weight on the fold's minority class), mixup, label smoothing and the optional subtype
head; early stopping and model selection on validation balanced accuracy at the
validation-optimal threshold; overfitting warnings.

Run directory::

    config.yaml  dataset.json  splits.json  metrics.json  metrics.jsonl
    fold_<i>/checkpoints/{fold_<i>_best.pth, final.pt} (and latest.pt until the fold finishes)
    fold_<i>/{stage.json, metrics.jsonl, tb/, result.json, predictions_{image,patient}.csv (test),
              predictions_val_{image,patient}.csv (validation, where thresholds were chosen)}
    plots/{roc_image.png, roc_patient.png, confusion_fold<i>_<level>.png, curves_fold<i>_*.png}
    tables/{cv_folds, cv_summary}.{csv,md}
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histommnet.breakhis import Patient
from histommnet.config import PACKAGE, HistoConfig
from histommnet.data import (
    MultiMagDataset,
    TrainAugment,
    WorkingImages,
    adjust_batch_size,
    input_size,
    load_index,
    normalization,
)
from histommnet.evaluate import selection_score, test_fold, validation_scores, write_summary
from histommnet.folds import fold_splits
from histommnet.losses import FocalLoss, HistoLoss, malignant_alpha, mixup, soft_targets
from histommnet.model import (
    NUM_SUBTYPES,
    build_model,
    check_model_config,
    checkpoint_kind,
    dry_run_config,
    resolve_normalization,
)
from histommnet.predict import predict_draws
from medcore.cli.dry_run import dry_run
from medcore.cli.run_setup import RunContext, resolve_run, start_run
from medcore.cli.stages import Stage, run_stage
from medcore.config import to_dict
from medcore.engine.inference import PredictOptions, checkpoint_precision
from medcore.engine.run_log import RunLogger
from medcore.engine.task import EvalContext
from medcore.engine.trainer import Trainer
from medcore.errors import UserError
from medcore.io import atomic_write_json
from medcore.runtime.device import device_defaults
from medcore.weights.checkpoint import (
    load_checkpoint,
    release_spares,
    save_checkpoint,
    unwrap_model,
)

SMOKE_OVERRIDES = ["cv.fold=0", "data.eval_max_draws=2", "data.max_draws_per_patient=3"]


def check_config(cfg: HistoConfig, dry: bool = False) -> None:
    """What refuses a config before the run directory exists."""
    if cfg.cv.fold is not None and not 0 <= cfg.cv.fold < cfg.cv.folds:
        raise UserError("--fold", f"must be in 0..{cfg.cv.folds - 1}")
    check_model_config(cfg, dry)


def main(args: argparse.Namespace) -> int:
    """``histommnet-train`` after parsing: resolve the run, then dry-run or cross-validate."""
    request = resolve_run(
        args, HistoConfig, PACKAGE, "default", smoke_overrides=SMOKE_OVERRIDES, staged=True
    )
    check_config(request.cfg, dry=args.dry_run)
    with start_run(request) as ctx:
        return _dry_run(ctx) if args.dry_run else cross_validate(ctx)


def _dry_run(ctx: RunContext) -> int:
    cfg: HistoConfig = ctx.cfg
    height, width = input_size(cfg.data)
    dry_run(
        lambda: build_model(dry_run_config(cfg)),
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
        write_summary(ctx.run_dir, cfg.model.name, results)
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


class _EpochLoss:
    """Mean training loss of the current epoch (for the train/validation gap warning), summed
    on the device: read once, at the epoch's evaluation."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total: torch.Tensor | None = None
        self.n = 0

    def add(self, value: torch.Tensor) -> None:
        """Add one micro-batch's loss: a device-side sum, no host sync."""
        value = value.detach().float()
        self.total = value if self.total is None else self.total + value
        self.n += 1

    @property
    def mean(self) -> float:
        return float(self.total) / self.n if self.total is not None else float("nan")


def make_step_fn(cfg: HistoConfig, objective: HistoLoss, tracker: _EpochLoss):
    """The training step: augmentation, soft targets, mixup, ``objective``; returns
    ``(loss, terms)``, the terms tensors on the device (the trainer logs them)."""
    loss_cfg = cfg.loss
    augment = TrainAugment(cfg.data)

    def step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        images, labels, subtypes = batch["images"], batch["label"], batch["subtype"]
        images = augment.to(images.device)(images)
        target = soft_targets(labels, 2, loss_cfg.label_smoothing)
        sub_target = soft_targets(subtypes, NUM_SUBTYPES, loss_cfg.label_smoothing)
        if loss_cfg.mixup_alpha > 0 and torch.rand(()) < loss_cfg.mixup_prob:
            images, perm, lam = mixup(images, loss_cfg.mixup_alpha)
            target = lam * target + (1 - lam) * target[perm]
            sub_target = lam * sub_target + (1 - lam) * sub_target[perm]
        loss, terms = objective(model(images), target, sub_target)
        tracker.add(terms["focal"])  # compared with the validation focal loss
        return loss, terms

    return step_fn


def _warn(fold: int, ctx: EvalContext, message: str) -> None:
    if not ctx.is_main:  # every rank evaluates; one reports
        return
    print(f"warning: fold {fold} epoch {ctx.epoch + 1}: {message}", file=sys.stderr)
    ctx.logger.log_jsonl({"event": "overfitting_warning", "epoch": ctx.epoch, "message": message})


def make_evaluate_fn(
    cfg: HistoConfig,
    fold: int,
    val_ds: MultiMagDataset,
    focal: FocalLoss,
    tracker: _EpochLoss,
    eval_bs: int,
    workers: int | None,
):
    """The epoch's validation: focal loss, balanced accuracy and AUC at the validation-optimal
    thresholds, the selection score, the epoch's training loss; overfitting warnings."""
    warned_perfect: list[int] = []

    def evaluate_fn(model: torch.nn.Module, ctx: EvalContext) -> dict[str, float]:
        draws = predict_draws(model, val_ds, PredictOptions(ctx.device, ctx.amp, eval_bs, workers))
        logits = torch.tensor(
            draws[["logit_benign", "logit_malignant"]].to_numpy(), device=ctx.device
        )
        labels = torch.tensor(draws["label"].to_numpy(), device=ctx.device)
        val_loss = float(focal(logits, labels))
        scores = validation_scores(draws, cfg.cv.threshold_method)
        train_loss = tracker.mean  # the epoch's one read of the training loss sum
        metrics = {
            "val/loss": val_loss,
            **{f"val/{name}": value for name, value in scores.items()},
            "val/selection": selection_score(scores["balanced_accuracy"], val_loss),
            "train/epoch_loss": train_loss,
        }
        gap = val_loss - train_loss
        if np.isfinite(gap) and gap > cfg.cv.overfit_loss_gap:
            _warn(
                fold,
                ctx,
                f"validation loss {val_loss:.3f} exceeds training loss {train_loss:.3f} "
                f"by {gap:.3f} (> cv.overfit_loss_gap={cfg.cv.overfit_loss_gap})",
            )
        if scores["balanced_accuracy"] >= 1.0 and not warned_perfect:
            warned_perfect.append(ctx.epoch)  # once per fold: it stays true once reached
            _warn(
                fold,
                ctx,
                "perfect validation balanced accuracy: the validation split may be too "
                "small or too easy to reveal overfitting",
            )
        return metrics

    return evaluate_fn


def fold_alpha(train_ds: MultiMagDataset, cfg: HistoConfig) -> float:
    """The focal weight of the malignant class for this fold's training draws (see config)."""
    labels = [train_ds.patients[p].label for p, _ in train_ds.draws]
    return malignant_alpha(labels, cfg.loss.focal_alpha, cfg.loss.focal_alpha_class)


@dataclass
class TrainedFold:
    """A fold's training: the model with the selected (best, else final) weights, and how."""

    model: torch.nn.Module
    state: dict[str, Any]  # the selected checkpoint
    weights_path: Path
    best_path: Path  # fold_<i>_best.pth, rewritten by ``save_fold_model`` once tested
    meta: dict[str, Any]  # what rebuilds and feeds the model (config, input size, normalisation)
    history: list[dict[str, Any]]
    alpha: float  # focal weight of the malignant class
    eval_batch_size: int


def save_fold_model(trained: TrainedFold, extra: dict[str, Any]) -> Path:
    """Rewrite ``fold_<i>_best.pth`` to hold what evaluation and export need, nothing more.

    The selected weights, the model config, magnifications, input size, normalisation,
    precision, the selection (epoch, metric) and ``extra`` (the fold's thresholds). A
    trainer's checkpoint also carries the optimizer's moments and the RNG states, which only
    resuming needs (``latest.pt`` keeps them): with AdamW three times the weights' size.
    """
    state = trained.state
    slim = {
        "model": {k: v.detach().cpu() for k, v in unwrap_model(trained.model).state_dict().items()},
        **trained.meta,
        **{key: state[key] for key in ("precision", "epoch", "global_step") if key in state},
        # which validation metric selected these weights, and its value (no file path)
        "best": {k: v for k, v in (state.get("best") or {}).items() if k in ("name", "value")},
        **extra,
    }
    path = save_checkpoint(slim, trained.best_path, kind=checkpoint_kind(trained.model))
    release_spares(path.parent)  # the replaced full checkpoint is kept as a spare otherwise
    return path


def train_fold(
    ctx: RunContext,
    stage: Stage,
    train_ds: MultiMagDataset,
    val_ds: MultiMagDataset,
    fold: int,
    logger: RunLogger,
) -> TrainedFold | None:
    """Train one fold in ``stage.dir`` (resumed from ``stage.resume``); on the main rank the
    model with the selected weights is returned (None on the others)."""
    cfg: HistoConfig = ctx.cfg
    fold_dir = stage.dir
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
    alpha = fold_alpha(train_ds, cfg)
    init = (
        f"pretrained from {cfg.model.pretrained_weights}"
        if cfg.model.pretrained_weights
        else "random (from scratch)"
    )
    print(
        f"fold {fold}: {len(train_ds.patients)} train / {len(val_ds.patients)} val patients; "
        f"{len(train_ds)} training draws per epoch, batch size {batch_size}; focal weights "
        f"benign {1 - alpha:.2f} / malignant {alpha:.2f}; {cfg.model.backbone} init: {init}",
        file=sys.stderr,
    )

    model = build_model(cfg)
    focal = FocalLoss(alpha, cfg.loss.focal_gamma, cfg.loss.label_smoothing)
    objective = HistoLoss(focal, cfg.loss.subtype_weight).to(ctx.device)
    tracker = _EpochLoss()

    def on_epoch_start(epoch: int) -> None:
        train_ds.set_epoch(epoch)
        tracker.reset()

    kind = checkpoint_kind(model)
    meta = {
        "model_config": to_dict(cfg.model),
        "magnifications": list(cfg.data.magnifications),
        "image_size": cfg.data.image_size,
        "aspect_ratio": cfg.data.aspect_ratio,
        "normalization": normalization(cfg.data),
        # how evaluation draws a patient's image tuples (``histommnet.load`` draws the same)
        "draws": {
            "seed": cfg.seed,
            "eval_max_draws": cfg.data.eval_max_draws,
            "missing_magnification": cfg.data.missing_magnification,
        },
        "fold": fold,
    }
    trainer = Trainer(
        model,
        tcfg,
        train_data=train_ds,
        fabric=ctx.fabric,
        step_fn=make_step_fn(cfg, objective, tracker),
        run_dir=fold_dir,
        kind=kind,
        evaluate_fn=make_evaluate_fn(
            cfg, fold, val_ds, objective.focal, tracker, eval_bs, cfg.trainer.num_workers
        ),
        seed=cfg.seed + fold,
        extra_state=meta,
        on_epoch_start=on_epoch_start,
        logger=logger,
    )
    ckpt_dir = fold_dir / "checkpoints"
    final_path = ckpt_dir / "final.pt"
    if final_path.is_file():  # interrupted after training, before the fold's result
        history = load_checkpoint(final_path, kind=kind).get("history", [])
    else:
        history = trainer.fit(resume=stage.resume).history
    if not ctx.dist.is_main:
        return None
    best_path = ckpt_dir / tcfg.best_name
    # The weights that won model selection (the final ones when no best was kept) go into the
    # model for the fold's test; fold_<i>_best.pth is then their one weights-only copy.
    weights_path = best_path if best_path.is_file() else final_path
    state = load_checkpoint(weights_path, kind=kind)
    unwrap_model(model).load_state_dict(state["model"])
    return TrainedFold(
        model.to(ctx.device), state, weights_path, best_path, meta, history, alpha, eval_bs
    )
