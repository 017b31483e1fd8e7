"""Typed configuration of binensemble (the ``configs/*.yaml`` files fill these dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from medcore.config import RunConfig, TrainerConfig

TTA_VIEWS = ("identity", "hflip", "vflip", "rot90")


@dataclass
class DataConfig:
    """Where the images are and how they are augmented."""

    data_dir: str | None = None  # None: the built-in demo data
    demo: Literal["standard", "small"] = "standard"  # which built-in set (small: --smoke)
    train_dir: str = "TrainSet"  # holds one sub-folder per class
    test_dir: str = "TestSet"  # unlabelled images; ids are the file names
    classes: list[str] = field(default_factory=lambda: ["normal", "disease"])  # label = position
    test_labels: str = "TestSet_labels.csv"  # optional (image_id,label); scored when present
    extensions: list[str] = field(
        default_factory=lambda: [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"]
    )
    img_size: int = 448
    resize_scale: float = 1.1  # resize to img_size * scale, then (random / centre) crop img_size
    hflip: float = 0.5
    vflip: float = 0.5
    rotation: float = 15.0
    color_jitter: list[float] = field(default_factory=lambda: [0.2, 0.2, 0.1, 0.02])  # b, c, s, h
    val_fraction: float = 0.15
    split_seed: int = 42
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        if len(self.classes) != 2:
            raise ValueError("classes must name exactly two folders (label 0, label 1)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must lie in (0, 1)")
        if self.resize_scale < 1.0:
            raise ValueError("resize_scale must be >= 1 (resize, then crop)")
        if len(self.color_jitter) != 4:
            raise ValueError("color_jitter needs 4 values: brightness, contrast, saturation, hue")


@dataclass
class ModelConfig:
    """The dual backbone and its head; ``kind`` picks triplet + KNN or cross-entropy.

    The defaults are the research model: ConvNeXt-Large + ViT-Large/16 (built for the 448 input,
    its position embeddings resampled from 224 weights), the last 2 ConvNeXt stages and 8 ViT
    blocks trained, activation checkpointing on.
    """

    kind: Literal["metric", "baseline"] = "metric"
    convnext_name: str = "convnext_large"
    vit_name: str = "vit_large_patch16_224"
    pretrained: bool = True  # this config starts from pretrained weights (--from-scratch: False)
    pretrained_weights: str | None = None  # one file holding both backbones (convnext.*, vit.*)
    convnext_weights: str | None = None  # a timm ConvNeXt state dict
    vit_weights: str | None = None  # a timm ViT state dict (any input size: pos-embed resampled)
    # Input normalisation of each branch: per-channel mean and std of [0, 1] pixels. None: from
    # the backbone's pretrained configuration (ViT-L augreg weights: 0.5 / 0.5, ConvNeXt-L:
    # ImageNet's), resolved when training starts and recorded in the checkpoint for predict.
    convnext_mean: list[float] | None = None
    convnext_std: list[float] | None = None
    vit_mean: list[float] | None = None
    vit_std: list[float] | None = None
    # Extra timm constructor arguments, e.g. {ls_init_value: 1.0} to train a ConvNeXt from scratch.
    convnext_kwargs: dict[str, Any] = field(default_factory=dict)
    vit_kwargs: dict[str, Any] = field(default_factory=dict)
    hidden_dim: int = 512
    embed_dim: int = 128
    dropout: float = 0.3
    num_classes: int = 2
    drop_path_rate: float = 0.1
    # Only the last stages / blocks and the final norms train: keeps the pretrained features.
    train_convnext_stages: int = 2  # last N stages (+ norms) train; -1: all, 0: frozen
    train_vit_blocks: int = 8  # last N blocks (+ final norm) train; -1: all, 0: frozen
    # Recompute the backbones' activations in the backward pass (timm set_grad_checkpointing).
    # Needed for the seed's batch 24 at 448 on a 24 GB GPU: counted on the meta device, one
    # bf16 step of this model saves about 22 GiB of activations (+7 GiB of attention matrices
    # where no fused attention kernel runs) besides ~5.5 GB of fp32 weights, gradients and Adam
    # state; with checkpointing the saved activations drop to about 2.3 GiB.
    grad_checkpointing: bool = True


@dataclass
class LossConfig:
    margin: float = 0.5  # triplet margin (metric model)
    label_smoothing: float = 0.0  # cross-entropy (baseline model)
    gather_across_ranks: bool = True  # mine triplets over the global batch under torchrun


@dataclass
class OptimConfig:
    """Per-group learning rates (trainer.weight_decay, scheduler, epochs apply to both)."""

    backbone_lr: float = 5e-6
    head_lr: float = 1e-3


@dataclass
class KnnConfig:
    ks: list[int] = field(default_factory=lambda: [5, 9, 15, 20, 25, 30, 40, 50])
    weighted: bool = True  # 1 / distance votes
    metric: Literal["euclidean", "cosine"] = "euclidean"


@dataclass
class PredictConfig:
    tta: bool = True
    views: list[str] = field(default_factory=lambda: list(TTA_VIEWS))
    vote_weights: list[float] = field(default_factory=list)  # metric, baseline; empty: equal

    def __post_init__(self) -> None:
        unknown = [v for v in self.views if v not in TTA_VIEWS]
        if unknown:
            raise ValueError(
                f"unknown TTA view {unknown[0]!r} (choose from {', '.join(TTA_VIEWS)})"
            )
        if not self.views:
            raise ValueError("views must name at least one view")


@dataclass
class SelectionConfig:
    """How the epoch and k are chosen: on the validation split, or by k-fold cross-validation."""

    # >= 2: before the final models, train both models on each of cv_folds folds of the labelled
    # set; the epoch and k with the best mean held-out accuracy are used, and the out-of-fold
    # predictions (every labelled image once) feed the agreement analysis. 0: validation split.
    cv_folds: int = 0
    cv_seed: int = 42

    def __post_init__(self) -> None:
        if self.cv_folds == 1 or self.cv_folds < 0:
            raise ValueError("cv_folds must be 0 (validation split) or at least 2")


@dataclass
class EnsembleConfig:
    """The seed's rule for voting two models, checked on every analysis, and its intervals."""

    min_accuracy: float = 0.90  # both models above this accuracy
    max_disagreement: float = 0.05  # and disagreeing on fewer than this fraction of images
    confidence: float = 0.95  # level of the reported confidence intervals
    n_boot: int = 2000  # bootstrap resamples for the vote-minus-model accuracy intervals


def _research_trainer() -> TrainerConfig:
    """The seed's schedule: 25 epochs of batch 24, weight decay 1e-3, cosine, AMP, clip 1."""
    return TrainerConfig(
        epochs=25,
        batch_size=24,
        num_workers=8,
        weight_decay=1e-3,
        scheduler="cosine",
        amp=True,
        grad_clip=1.0,
        monitor=["val/accuracy"],
        monitor_mode="max",
        log_every_steps=10,
    )


@dataclass
class BinEnsembleConfig(RunConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    trainer: TrainerConfig = field(default_factory=_research_trainer)
