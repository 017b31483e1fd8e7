"""Typed configuration of histommnet (the sections of ``configs/*.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medcore.config import RunConfig, TrainerConfig

PACKAGE = "histommnet"
MAGNIFICATIONS = ["40X", "100X", "200X", "400X"]


@dataclass
class AugmentConfig:
    """Training augmentation, applied to each magnification's image independently."""

    rotation_degrees: float = 90.0
    flip: bool = True
    elastic_p: float = 0.3
    elastic_alpha: float = 30.0
    elastic_sigma: float = 5.0
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.15
    hue: float = 0.04
    erasing_p: float = 0.25


@dataclass
class DataConfig:
    data_dir: str | None = None
    magnifications: list[str] = field(default_factory=lambda: list(MAGNIFICATIONS))
    image_size: int = 224  # input height in pixels
    # Input width / height. BreakHis tiles are 700x460: 700/460 keeps their shape (224x341 at
    # 224 px). Every image is scaled to cover the input and centre-cropped, never squashed, so
    # 1.0 takes the central square of each tile.
    aspect_ratio: float = 700 / 460
    # Input normalisation and resize filter; None takes them from the backbone's pretrained
    # configuration (timm's pretrained_cfg, or the weights' own config.json) when training
    # starts. What was used is stored in every checkpoint and reused by gradcam.
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    # A patient without some magnification folders: "nearest" fills each missing one from the
    # nearest available magnification (ties go to the lower one), "skip" drops the patient.
    missing_magnification: Literal["nearest", "skip"] = "nearest"
    check_images: bool = True  # verify every PNG while indexing (corrupt files become named skips)
    # Adaptive multi-image sampling: per epoch a patient contributes
    # max(base_images, ceil(fraction * n)) draws, n = its images per magnification (the smallest
    # count over magnifications) and fraction chosen by volume: n <= 15, 16..30, > 30.
    base_images: int = 3
    volume_bounds: tuple[int, int] = (15, 30)
    utilization: tuple[float, float, float] = (0.60, 0.40, 0.25)
    max_draws_per_patient: int | None = None
    eval_max_draws: int | None = None  # evaluation covers every image unless capped
    min_batches_per_epoch: int = 4  # batch size shrinks so small datasets still give this many
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    name: Literal["mmnet", "single", "concat"] = "mmnet"
    backbone: str = "efficientnet_b1"
    shared_backbone: bool = False  # one trunk for all magnifications instead of one each
    pretrained: bool = True  # start from ImageNet weights (--pretrained-weights or --from-scratch)
    pretrained_weights: str | None = None
    drop_path_rate: float = 0.1
    embed_dim: int = 256
    num_heads: int = 4
    attention_scales: list[int] = field(default_factory=lambda: [1, 3, 5])
    channel_reduction: int = 16
    dropout: float = 0.7
    subtype_head: bool = True
    single_magnification: str = "200X"  # the input of the single-magnification baseline


@dataclass
class LossConfig:
    # Focal class weight: ``focal_alpha`` for the class named by ``focal_alpha_class`` and
    # 1 - alpha for the other. "minority" is the class with fewer training draws in the fold
    # (benign in BreakHis: 24 of 82 patients), which is the imbalance the seed's 0.7 counters.
    focal_alpha: float = 0.7
    focal_alpha_class: Literal["minority", "malignant", "benign"] = "minority"
    focal_gamma: float = 2.0
    label_smoothing: float = 0.2
    mixup_alpha: float = 0.2  # 0 disables mixup
    mixup_prob: float = 1.0
    subtype_weight: float = 0.3


@dataclass
class CVConfig:
    folds: int = 5
    fold: int | None = None  # run only this fold (0-based)
    val_fraction: float = 0.3
    stratify_subtype: bool = True
    # How the decision threshold is chosen on the validation split, separately for draws
    # (image level) and patients; model selection and early stopping use the balanced accuracy
    # at the validation-optimal image threshold, never a fixed 0.5 (the smoothed focal loss
    # keeps probabilities in about 0.4-0.75).
    threshold_method: Literal["youden", "f1"] = "youden"
    # Overfitting warnings: validation loss above training loss by more than this.
    overfit_loss_gap: float = 0.3
    eval_batch_size: int | None = None


def _spec_trainer() -> TrainerConfig:
    return TrainerConfig(
        epochs=25,
        lr=5e-5,
        weight_decay=5e-3,
        grad_clip=1.0,
        scheduler="plateau",
        plateau_patience=3,
        early_stopping_patience=7,
        monitor=["val/selection"],  # balanced accuracy at the optimal threshold (train.py)
        monitor_mode="max",
    )


@dataclass
class HistoConfig(RunConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    trainer: TrainerConfig = field(default_factory=_spec_trainer)
