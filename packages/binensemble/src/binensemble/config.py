"""Typed configuration of binensemble (the ``configs/*.yaml`` files fill these dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from medcore.cli import RunConfig

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
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
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
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
    """The dual backbone and its head; ``kind`` picks triplet + KNN or cross-entropy."""

    kind: Literal["metric", "baseline"] = "metric"
    convnext_name: str = "convnext_large"
    vit_name: str = "vit_large_patch16_224"
    pretrained: bool = False  # True: weights must come from local files (see README)
    pretrained_weights: str | None = None  # one file holding both backbones (convnext.*, vit.*)
    convnext_weights: str | None = None  # a timm ConvNeXt state dict
    vit_weights: str | None = None  # a timm ViT state dict (any input size: pos-embed resampled)
    # Extra timm constructor arguments, e.g. {ls_init_value: 1.0} to train a ConvNeXt from scratch.
    convnext_kwargs: dict[str, Any] = field(default_factory=dict)
    vit_kwargs: dict[str, Any] = field(default_factory=dict)
    hidden_dim: int = 512
    embed_dim: int = 128
    dropout: float = 0.3
    num_classes: int = 2
    drop_path_rate: float = 0.1
    train_convnext_stages: int = -1  # last N stages (+ norms) train; -1: all, 0: frozen
    train_vit_blocks: int = -1  # last N blocks (+ final norm) train; -1: all, 0: frozen


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
class BinEnsembleConfig(RunConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
