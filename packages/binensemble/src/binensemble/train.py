"""Training of one model into its own directory, ending with its ``model.pt`` bundle.

The metric model trains with batch-hard triplet loss on class-balanced batches and is scored
per epoch by KNN (automatic k) against the training split's embeddings; the baseline trains
with cross-entropy. A model directory holds::

    config.yaml metrics.jsonl metrics.json tb/ checkpoints/ plots/ splits.json
    model.pt (weights + k + KNN gallery) model.safetensors knn.json
    heldout/ (cross-validation folds only: the held-out probabilities of every epoch)
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from binensemble.config import BinEnsembleConfig
from binensemble.data import BalancedBatchSampler, ImageDataset, ImageSet, train_augmentation
from binensemble.evaluate import (
    baseline_evaluator,
    extract,
    knn_select,
    metric_evaluator,
    summarise,
)
from binensemble.losses import BatchHardTripletLoss
from binensemble.model import build_model, init_description, model_kind, with_normalisation
from binensemble.predict import BUNDLE_NAME
from medcore.config import save_config, to_dict
from medcore.data.splits import load_or_make_splits, save_splits, stratified_split
from medcore.engine.run_log import RunLogger
from medcore.engine.trainer import Trainer
from medcore.errors import DataError
from medcore.io import atomic_write_json
from medcore.metrics import multiclass_metrics
from medcore.report.plots import plot_confusion_matrix, plot_roc_curves, plot_training_curves
from medcore.runtime.device import amp_policy, device_defaults
from medcore.runtime.distributed import barrier, get_rank, get_world_size
from medcore.weights.checkpoint import export_best, save_checkpoint

if TYPE_CHECKING:
    from lightning_fabric import Fabric

Splits = dict[str, np.ndarray]


def tta_views(cfg: BinEnsembleConfig) -> list[str]:
    """The views of the configured test-time augmentation (identity only without TTA)."""
    return list(cfg.predict.views) if cfg.predict.tta else ["identity"]


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


def _step_fn(cfg: BinEnsembleConfig):
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
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=cfg.loss.label_smoothing)
        return loss, {"accuracy": (logits.argmax(1) == batch["label"]).float().mean()}

    return baseline_step


def train_one(
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
    model = build_model(cfg.model, cfg.data.img_size)
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
    workers = cfg.trainer.num_workers
    heldout = model_dir / "heldout" if keep_heldout else None
    if name == "metric":
        evaluate_fn = metric_evaluator(train_set, val_set, cfg.data, cfg.knn, workers, heldout)
        # Every batch is full: batch_size // 2 images of each class.
        sampler = BalancedBatchSampler(
            train_set.labels, batch_size, cfg.seed, get_rank(), get_world_size()
        )
    else:
        evaluate_fn = baseline_evaluator(val_set, cfg.data, workers, heldout)
        # Shuffled batches: a last batch too small for the heads' BatchNorm (the real TrainSet's
        # 1393 images at batch 24 leave 1) is dropped by the trainer (trainer.min_batch_size).
        sampler = None
    trainer = Trainer(
        model,
        cfg.trainer,
        fabric=fabric,
        train_data=ImageDataset(train_set),  # uint8 from the store; step_fn augments the batch
        step_fn=_step_fn(cfg),
        run_dir=model_dir,
        kind=model_kind(name),
        evaluate_fn=evaluate_fn,
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
            metadata={"kind": model_kind(name)},
        )
        metrics = _finalise(cfg, model, train_set, val_set, model_dir, device, trainer)
        metrics.update(
            best_epoch=_best_epoch(result.history, result.best_metric_name, result.best_metric),
            epochs_completed=result.epochs_completed,
            weights=str(chosen),
            init=init,
        )
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
    save_checkpoint(bundle, model_dir / BUNDLE_NAME, kind=model_kind(name))
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
