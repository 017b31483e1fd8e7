"""``binensemble-train``: the research pipeline from data to voted predictions, and the training
of one model (its step and evaluation functions).

No ``--model`` (or ``--model both``): train the metric model (triplet loss, KNN with automatic
k) and the baseline (cross-entropy), predict the validation split and ``TestSet/`` with 4-view
TTA, soft-vote the two, analyse their agreement and print the accuracy table. ``--model
metric|baseline`` trains one model. With ``selection.cv_folds >= 2`` a cross-validation stage
(:mod:`binensemble.selection`) chooses the epoch count and k first.

The metric model trains with batch-hard triplet loss on class-balanced batches and is scored
per epoch by KNN (automatic k) against the training split's embeddings; the baseline trains
with cross-entropy.

Run directory (``--model both``; with one model the model directory is the run directory)::

    config.yaml  metrics.json
    metric/    a model directory (below)
    baseline/  the same, without the KNN files
    cv/        the cross-validation stage, when asked for
    predictions/  metric.csv metric_probs.csv baseline.csv ... vote.csv vote_probs.csv
                  *_val_probs.csv (validation split, with targets)
    analysis/  <split>/analysis.json disagreements.csv analysis.png

A model directory::

    config.yaml metrics.jsonl metrics.json tb/ checkpoints/ plots/ splits.json
    model.pt (weights + k + KNN gallery) model.safetensors knn.json
    heldout/ (cross-validation folds only: the held-out probabilities of every epoch)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from binensemble.config import BinEnsembleConfig
from binensemble.data import (
    BalancedBatchSampler,
    ImageDataset,
    ImageSet,
    data_root,
    read_labels,
    scan_labelled,
    scan_unlabelled,
    train_augmentation,
)
from binensemble.evaluate import (
    baseline_evaluator,
    extract,
    knn_select,
    metric_evaluator,
    summarise,
)
from binensemble.losses import BatchHardTripletLoss, cross_entropy_loss
from binensemble.model import (
    MEMBER_KINDS,
    MODEL_CLASSES,
    build_model,
    check_pretrained,
    init_description,
    weight_sources,
    with_normalisation,
)
from binensemble.predict import BUNDLE_NAME
from binensemble.report import predict_vote_report
from binensemble.tta import tta_views
from medcore.cli.dry_run import build_on_meta, count_parameters, dry_run
from medcore.cli.run_setup import RunContext, resolve_run, start_run
from medcore.cli.stages import STAGE_FILE, Stage, run_stage
from medcore.config import save_config, to_dict
from medcore.data.splits import load_or_make_splits, save_splits, stratified_split
from medcore.engine.rng import seed_everything
from medcore.engine.run_log import RunLogger
from medcore.engine.task import EvaluateFn, StepFn
from medcore.engine.trainer import Trainer
from medcore.errors import DataError, UserError
from medcore.io import atomic_write_json
from medcore.metrics import multiclass_metrics
from medcore.report.plots import plot_confusion_matrix, plot_roc_curves, plot_training_curves
from medcore.runtime.device import amp_policy, device_defaults
from medcore.runtime.distributed import barrier, get_rank, get_world_size
from medcore.weights.checkpoint import export_best, save_checkpoint

if TYPE_CHECKING:
    from lightning_fabric import Fabric

PACKAGE = "binensemble"
SMOKE_OVERRIDES = ["data.demo=small", "trainer.batch_size=8"]


def main(args: argparse.Namespace) -> int:
    """``binensemble-train``: a dry run, or the models of ``--model`` and their predictions."""
    request = resolve_run(args, BinEnsembleConfig, PACKAGE, "default", SMOKE_OVERRIDES, staged=True)
    cfg: BinEnsembleConfig = request.cfg
    model = _model_choice(args, cfg)
    if not args.dry_run:
        check_pretrained(cfg.model)
        if args.from_scratch and any(weight_sources(cfg.model).values()):
            raise UserError("--from-scratch", "contradicts the pretrained weights also given")
    with start_run(request) as ctx:
        return _dry_run(ctx, model) if args.dry_run else _train_models(ctx, model)


def _model_choice(args: argparse.Namespace, cfg: BinEnsembleConfig) -> str:
    """``--model``; a resumed run keeps its own choice (one model lives in the run itself)."""
    if not args.resume:
        return args.model or "both"
    run_dir = Path(cfg.output_dir)
    single = ("splits.json", "checkpoints", BUNDLE_NAME, STAGE_FILE)
    trained = cfg.model.kind if any((run_dir / n).exists() for n in single) else "both"
    if args.model not in (None, trained):
        raise UserError(
            "--model", f"{run_dir} holds a --model {trained} run; resume it with that choice"
        )
    return trained


def _dry_run(ctx: RunContext, model: str) -> int:
    """Build the model(s) on the meta device: config.yaml, model_summary.json, the table."""
    cfg: BinEnsembleConfig = ctx.cfg
    names = list(MODEL_CLASSES) if model == "both" else [model]

    def build(name: str):
        return build_model(_with_kind(cfg, name), load_weights=False)

    first = build_on_meta(lambda: build(names[0]))
    extra = {
        "img_size": cfg.data.img_size,
        "normalisation": first.backbone.normalisation(),
        "branches": {
            cfg.model.convnext_name: count_parameters(first.backbone.convnext)["total"],
            cfg.model.vit_name: count_parameters(first.backbone.vit)["total"],
        },
        **{
            f"{n}_parameters": count_parameters(build_on_meta(lambda n=n: build(n)))
            for n in names[1:]
        },
    }
    dry_run(lambda: build(names[0]), ctx.run_dir, extra=extra)
    return 0


def _test_images(root: Path, cfg: BinEnsembleConfig) -> tuple[ImageSet | None, np.ndarray | None]:
    """``TestSet/`` and its optional labels, checked before any training.

    A test folder without a usable image is named and left out (the models are still trained);
    a broken label file is an error.
    """
    if not (root / cfg.data.test_dir).is_dir():
        return None, None
    try:
        test_set = scan_unlabelled(root, cfg.data)
    except DataError as exc:
        print(f"warning: {exc.what}: {exc.why}; no test predictions", file=sys.stderr)
        return None, None
    labels_path = root / cfg.data.test_labels
    if not labels_path.is_file():
        return test_set, None
    test_labels = read_labels(labels_path)
    missing = [i for i in test_set.ids if i not in test_labels]
    if missing:
        raise DataError(
            labels_path, f"no label for {len(missing)} test image(s) (e.g. {missing[0]!r})"
        )
    return test_set, np.asarray([test_labels[i] for i in test_set.ids])


def _train_models(ctx: RunContext, model: str) -> int:
    """Each model (and each cross-validation fold) is a stage of the run: a resumed run skips
    the finished ones and continues the unfinished one from its ``checkpoints/latest.pt``."""
    cfg: BinEnsembleConfig = ctx.cfg
    names = list(MODEL_CLASSES) if model == "both" else [model]
    root = data_root(cfg.data)
    labelled = scan_labelled(root, cfg.data)
    test_set, test_y = _test_images(root, cfg) if ctx.dist.is_main else (None, None)
    cv_lines: list[str] = []
    chosen: dict[str, tuple[int, int | None]] = {}
    if cfg.selection.cv_folds:
        from binensemble.selection import cross_validate

        chosen, cv_lines = cross_validate(ctx, labelled, names)
    bundles: dict[str, Path] = {}
    for name in names:
        model_cfg = _with_kind(cfg, name)
        weights = "best"
        if name in chosen:  # the cross-validated epoch count (and k) replace validation's
            epochs, k = chosen[name]
            model_cfg = dataclasses.replace(
                model_cfg,
                trainer=dataclasses.replace(cfg.trainer, epochs=epochs),
                knn=dataclasses.replace(cfg.knn, ks=[k] if k is not None else cfg.knn.ks),
            )
            weights = "final"

        def train(stage: Stage, model_cfg=model_cfg, weights=weights) -> dict[str, str]:
            seed_everything(cfg.seed + ctx.dist.rank)  # each model's result independent of order
            bundle = train_model(
                model_cfg, labelled, stage.dir, ctx.fabric, stage.resume, weights=weights
            )
            return {"bundle": str(bundle)}

        # One model lives in the run directory itself: its stage is the run directory.
        result = run_stage(ctx, name if len(names) > 1 else ".", train)
        bundles[name] = Path(result["bundle"])
    if not ctx.dist.is_main:
        return 0
    report = predict_vote_report(
        cfg, labelled, test_set, test_y, bundles, ctx.run_dir, ctx.device, cv_lines
    )
    print(report)
    return 0


def _with_kind(cfg: BinEnsembleConfig, name: str) -> BinEnsembleConfig:
    """``cfg`` for the model ``name`` (``metric`` or ``baseline``)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kind=name))


Splits = dict[str, np.ndarray]


def train_val_splits(labelled: ImageSet, cfg: BinEnsembleConfig, path: Path) -> Splits:
    """The stratified train/validation split: loaded if the run saved one, else made and saved."""
    assert labelled.labels is not None
    labels = labelled.labels

    def make() -> Splits:
        try:
            return stratified_split(
                labels,
                {"train": 1.0 - cfg.data.val_fraction, "val": cfg.data.val_fraction},
                seed=cfg.data.split_seed,
            )
        except ValueError as exc:  # too few labelled images for a train and a validation part
            raise DataError("data.val_fraction", f"{exc} (labelled images)") from None

    meta = {"seed": cfg.data.split_seed, "val_fraction": cfg.data.val_fraction}
    splits = load_or_make_splits(path, make, ids=labelled.ids, meta=meta, is_main=get_rank() == 0)
    assert isinstance(splits, dict)
    return splits


def make_step_fn(cfg: BinEnsembleConfig) -> StepFn:
    """The training step of ``cfg.model.kind``: augment the uint8 batch on its device, then the
    triplet loss on the embeddings (metric) or cross-entropy on the logits (baseline); returns
    the loss and its terms as device tensors (read by the trainer at logging steps only)."""
    augment = train_augmentation(cfg.data)

    def images(batch: dict[str, Any]) -> torch.Tensor:
        """The batch's augmented crops: uint8 working-size images in, on their device, in fp32."""
        pixels = batch["image"]
        with torch.autocast(pixels.device.type, enabled=False):
            return augment(pixels.float() / 255.0)

    if cfg.model.kind == "metric":
        loss_fn = BatchHardTripletLoss(cfg.loss.margin, cfg.loss.gather_across_ranks)

        def metric_step(model: torch.nn.Module, batch: dict[str, Any]):
            emb = model(images(batch))
            return loss_fn(emb.float(), batch["label"])

        return metric_step

    def baseline_step(model: torch.nn.Module, batch: dict[str, Any]):
        logits = model(images(batch)).float()
        return cross_entropy_loss(logits, batch["label"], cfg.loss.label_smoothing)

    return baseline_step


def make_evaluate_fn(
    cfg: BinEnsembleConfig, train_set: ImageSet, val_set: ImageSet, heldout_dir: Path | None
) -> EvaluateFn:
    """The per-epoch validation of ``cfg.model.kind``: KNN with automatic k against the
    training split's embeddings (metric), softmax probabilities (baseline); with
    ``heldout_dir`` every evaluation's validation probabilities are kept there."""
    workers = cfg.trainer.num_workers
    if cfg.model.kind == "metric":
        return metric_evaluator(train_set, val_set, cfg.data, cfg.knn, workers, heldout_dir)
    return baseline_evaluator(val_set, cfg.data, workers, heldout_dir)


def train_model(
    cfg: BinEnsembleConfig,
    labelled: ImageSet,
    model_dir: Path,
    fabric: Fabric,
    resume: Path | None,
    splits: Splits | None = None,
    weights: Literal["best", "final"] = "best",
    keep_heldout: bool = False,
) -> Path:
    """Train ``cfg.model.kind`` in ``model_dir`` on the run's ``fabric`` and write its
    ``model.pt`` bundle; returns its path.

    ``splits`` (``train``/``val`` indices into ``labelled``) default to the saved or a new
    stratified split; ``weights`` picks the bundle's weights (best validation epoch, or the
    last epoch when the epoch count was chosen elsewhere); ``keep_heldout`` saves the
    validation probabilities of every epoch under ``heldout/`` (cross-validation folds).
    """
    name = cfg.model.kind
    device = fabric.device
    model_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg)
    # The branches' input normalisation as resolved from the backbones, recorded for predict.
    cfg = dataclasses.replace(cfg, model=with_normalisation(cfg.model, model.backbone))
    if get_rank() == 0:
        save_config(cfg, model_dir / "config.yaml")
    if splits is None:
        splits = train_val_splits(labelled, cfg, model_dir / "splits.json")
    elif get_rank() == 0:
        save_splits(model_dir / "splits.json", splits, meta={"source": "fold"}, ids=labelled.ids)
    train_set, val_set = labelled.subset(splits["train"]), labelled.subset(splits["val"])
    assert train_set.labels is not None and val_set.labels is not None
    logger = RunLogger(model_dir, enabled=get_rank() == 0)
    init = init_description(cfg.model)
    if get_rank() == 0:
        print(f"{name}: {init}", file=sys.stderr)
    logger.log_jsonl({"event": "init", "model": name, "backbones": init})
    batch_size = cfg.trainer.batch_size or device_defaults(device).batch_size
    heldout = model_dir / "heldout" if keep_heldout else None
    if name == "metric":
        # Every batch is full: batch_size // 2 images of each class.
        sampler = BalancedBatchSampler(
            train_set.labels, batch_size, cfg.seed, get_rank(), get_world_size()
        )
    else:
        # Shuffled batches: a last batch too small for the heads' BatchNorm (the real TrainSet's
        # 1393 images at batch 24 leave 1) is dropped by the trainer (trainer.min_batch_size).
        sampler = None
    trainer = Trainer(
        model,
        cfg.trainer,
        fabric=fabric,
        train_data=ImageDataset(train_set),  # uint8 from the store; step_fn augments the batch
        step_fn=make_step_fn(cfg),
        run_dir=model_dir,
        kind=MEMBER_KINDS[name],
        evaluate_fn=make_evaluate_fn(cfg, train_set, val_set, heldout),
        param_groups=model.param_groups(cfg.optim.backbone_lr, cfg.optim.head_lr),
        batch_sampler=sampler,
        seed=cfg.seed,
        extra_state={"model_config": to_dict(cfg.model), "data_config": to_dict(cfg.data)},
        logger=logger,
    )
    result = trainer.fit(resume=resume)
    if get_rank() == 0:
        chosen = export_best(
            result.best_path if weights == "best" else None,
            result.final_path,
            model,
            model_dir / "model.safetensors",
            metadata={"kind": MEMBER_KINDS[name]},
        )
        metrics = _finalise(cfg, model, train_set, val_set, model_dir, device, trainer)
        metrics.update(
            best_epoch=_best_epoch(result.history, result.best_metric_name, result.best_metric),
            epochs_completed=result.epochs_completed,
            weights=chosen.name,  # the checkpoint model.pt took its weights from
            init=init,
        )
        if chosen != result.final_path:
            # model.pt and model.safetensors hold the best epoch's weights now: its checkpoint
            # would be a third copy (2 GB a model for `full`); final.pt stays (the last epoch).
            chosen.unlink()
        logger.write_final(metrics)
        logger.close()
    barrier()
    return model_dir / BUNDLE_NAME


def _best_epoch(
    history: list[dict[str, float]], name: str | None, value: float | None
) -> int | None:
    for record in history:
        if name is not None and record.get(name) == value:
            return int(record["epoch"]) + 1
    return None


def _finalise(
    cfg: BinEnsembleConfig,
    model: torch.nn.Module,
    train_set: ImageSet,
    val_set: ImageSet,
    model_dir: Path,
    device: torch.device,
    trainer: Trainer,
) -> dict[str, Any]:
    """Choose k on the validation split (metric model), write the bundle, plots and metrics."""
    name = cfg.model.kind
    views = tta_views(cfg)
    amp = amp_policy(device, cfg.trainer.amp, cfg.trainer.amp_dtype)
    bundle: dict[str, Any] = {
        "model": model.state_dict(),
        "model_config": to_dict(cfg.model),
        "data_config": to_dict(cfg.data),
        "trainer_config": to_dict(cfg.trainer),  # its precision, for predict
        "classes": list(cfg.data.classes),
    }

    def predict(images: ImageSet, desc: str) -> torch.Tensor:  # this process alone (rank 0)
        workers = cfg.trainer.num_workers
        return extract(model, images, cfg.data, device, amp, workers, views, desc, shard=False)

    extra: dict[str, Any] = {}
    if name == "metric":
        # Gallery and queries both use the TTA embedding; prediction is held to these views.
        train_emb = predict(train_set, "embedding gallery")
        val_emb = predict(val_set, "embedding validation")
        knn = knn_select(
            train_emb, train_set.labels, val_emb, val_set.labels, cfg.knn, cfg.model.num_classes
        )
        knn_info = {
            "k": knn.k,
            "scores": {str(k): v for k, v in knn.scores.items()},
            "weighted": cfg.knn.weighted,
            "metric": cfg.knn.metric,
            "views": views,
        }
        bundle["knn"] = knn_info
        bundle["gallery"] = {
            "embeddings": train_emb,
            "labels": torch.as_tensor(train_set.labels),
            "ids": list(train_set.ids),
        }
        atomic_write_json(model_dir / "knn.json", knn_info)
        plot_training_curves(
            [{"k": k, "val_accuracy": s} for k, s in knn.scores.items()],
            ["val_accuracy"],
            model_dir / "plots" / "knn_k_search.png",
            x="k",
        )
        val_probs = knn.val_probs.numpy()
        extra["k"] = knn.k
    else:
        val_probs = predict(val_set, "predicting validation").numpy()
    save_checkpoint(bundle, model_dir / BUNDLE_NAME, kind=MEMBER_KINDS[name])
    y = val_set.labels
    plot_training_curves(
        trainer.state.history, ["val/accuracy", "val/roc_auc"], model_dir / "plots" / "curves.png"
    )
    plot_roc_curves({f"{name} (val)": (y, val_probs[:, 1])}, model_dir / "plots" / "roc_val.png")
    confusion = multiclass_metrics(y, val_probs)["confusion_matrix"]
    plot_confusion_matrix(
        confusion,
        cfg.data.classes,
        model_dir / "plots" / "confusion_val.png",
        title=f"{name} (val)",
    )
    return {**summarise(y, val_probs), **extra, "tta_views": views}
