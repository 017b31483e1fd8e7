"""Typed configuration of ctretrieval: the sections of ``configs/*.yaml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medcore.config import RunConfig, TrainerConfig
from medcore.weights.normalization import IMAGENET_MEAN, IMAGENET_STD

Mode = Literal["microf1", "triplet"]


@dataclass
class PreprocessConfig:
    """Raw DICOM / NIfTI -> fixed-size uint8 volumes (``ctretrieval-preprocess``)."""

    target_shape: tuple[int, int, int] = (300, 270, 270)  # slices, height, width
    hu_window: tuple[float, float] = (-1000.0, 400.0)  # HU mapped to 0 and 255
    # None: resize every study to target_shape; (z, y, x) mm: resample to this voxel size and
    # centre in target_shape (padded; cropped only where larger), recorded per volume.
    target_spacing: tuple[float, float, float] | None = None
    min_slices: int = 16  # a series with fewer slices is skipped
    workers: int = 0  # 0: one per CPU core (at most 8); 1: in-process


@dataclass
class DataConfig:
    data_dir: str | None = None  # None: the built-in demo
    labels_csv: str = "labels.csv"  # relative to data_dir unless absolute
    volumes: str = "volumes.h5"  # preprocessed HDF5, relative to data_dir unless absolute
    id_column: str = "CT"
    finding_columns: list[str] = field(
        default_factory=lambda: ["condensacion", "nodulos", "quistes"]
    )
    no_finding_name: str = "sin_hallazgos"  # the extra slot set when no finding is positive
    id_suffixes: list[str] = field(
        default_factory=lambda: [".nii.gz", ".nii", ".h5", ".npy", ".dcm"]
    )
    test_frac: float = 0.2
    train_eval_frac: float = 0.1  # stratified subset of train used for per-epoch embedding metrics
    demo_studies: int = 80  # size of the built-in demo
    demo_slices: int = 24  # source slices of a demo study (64 x 64 pixels)


@dataclass
class ModelConfig:
    """The network; the defaults are the original's ``base_local`` Proximity100x100."""

    name: Literal["Proximity100x100", "Proximity300x300"] = "Proximity100x100"
    num_slices: int = 300  # multiple of 3: viewed as num_slices / 3 three-slice images
    image_size: tuple[int, int] = (270, 270)  # in-plane size the trunk sees (inputs are resized)
    embedding_size: int = 1024
    reduce_channels: tuple[int, int, int] = (64, 32, 16)
    fc_hidden: int = 512
    dropout: float = 0.5
    num_classes: int = 0  # classification head size; set from the data in microf1 mode
    pretrained_weights: str | None = None  # torchvision / timm ResNet-18 weights for the trunk
    # The original starts the trunk from ImageNet weights: True refuses to train without
    # pretrained_weights (--pretrained-weights) unless --from-scratch sets it False.
    pretrained: bool = True
    # The trunk's input normalisation; set from the weights' config when it has one.
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        # Proximity300x300 has a fixed input; other sizes here would be silently ignored.
        if self.name == "Proximity300x300" and (
            self.num_slices != 300 or tuple(self.image_size) != (300, 300)
        ):
            raise ValueError(
                "Proximity300x300 takes 300 slices of 300 x 300: set model.num_slices=300 and "
                f"model.image_size=[300,300] (got {self.num_slices} and {list(self.image_size)})"
            )


@dataclass
class LossConfig:
    f1_average: Literal["micro", "sample"] = "micro"  # batch micro-F1, or per-study F1 averaged
    # binary: the 0/1 label slots; jaccard: graded targets, slot c of a study with finding set
    # L gets J(L, {c}) = 1/|L| when c is in L (see losses.graded_targets).
    targets: Literal["binary", "jaccard"] = "binary"
    bce_weight: float = 0.0  # > 0: hybrid BCE + F1
    margin: float = 0.2
    mining: Literal["hardest", "semihard", "random_hard"] = "hardest"


@dataclass
class SamplerConfig:
    n_classes: int = 2  # label ids per triplet batch
    n_samples: int = 3  # studies per label id


@dataclass
class AugmentConfig:
    enabled: bool = True
    degrees: float = 5.0
    scale: tuple[float, float] = (0.95, 1.05)
    affine_p: float = 0.5
    noise_std: float = 0.01
    noise_p: float = 0.5


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 20])
    relevance: Literal["jaccard", "binary"] = "jaccard"
    batch_size: int = 4
    threshold: float = 0.5  # probability (microf1) or neighbour vote (triplet) for a positive
    knn_k: int = 5  # neighbours voting the findings of a study in triplet mode
    # Bootstrap resamples of the queries for the 95% intervals of the test report; 0: none.
    n_boot: int = 1000

    def __post_init__(self) -> None:
        if self.n_boot < 0:
            raise ValueError(f"eval.n_boot must be >= 0 (0: no intervals), got {self.n_boot}")


@dataclass
class CTRetrievalTrainerConfig(TrainerConfig):
    """medcore's trainer section with the original's optimisation as defaults: Adam, lr 1e-5,
    weight decay 1e-4, StepLR(50 epochs, 0.1), 50 epochs, batch 8, mixed precision; the best
    checkpoint by micro-F1 (ties broken by mAP@10). A subclass, not a default instance, so that
    a config or ``--set`` naming one trainer key keeps the others."""

    epochs: int = 50
    batch_size: int | None = 8
    optimizer: Literal["adamw", "adam", "sgd"] = "adam"
    lr: float = 1e-5
    weight_decay: float = 1e-4
    scheduler: Literal["cosine", "plateau", "step", "none"] = "step"
    step_size: int = 50
    gamma: float = 0.1
    monitor: list[str] = field(
        default_factory=lambda: ["val/micro_f1_then_map@10", "val/micro_f1", "val/map@10"]
    )
    monitor_mode: Literal["max", "min"] = "max"


@dataclass
class CTRetrievalConfig(RunConfig):
    """The whole configuration; the defaults are the original's micro-F1 setup (``microf1``)."""

    mode: Mode = "microf1"
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: CTRetrievalTrainerConfig = field(default_factory=CTRetrievalTrainerConfig)
