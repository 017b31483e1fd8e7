"""Typed configuration: the ``data``, ``augment``, ``model``, ``loss``, ``phases`` and ``trainer`` sections.

The dataclass defaults are the spec's (paper) values: ``--config paper`` is exactly these, and
``configs/default.yaml`` is the complete CPU-sized demo preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from cxrlandmarks.anatomy import CATEGORIES
from medcore.config import RunConfig, TrainerConfig

PHASES = ("phase1", "phase2", "phase3", "phase4")


@dataclass
class DataConfig:
    """Where the coordinates CSV and the images are (relative paths are under ``data_dir``).

    The defaults follow the original layout: ``<data_dir>/coordenadas/coordenadas_maestro.csv``
    and ``<data_dir>/dataset/<category>/<image>.png``; the Kaggle COVID-19 Radiography
    release's ``COVID-19_Radiography_Dataset/<category>/images/`` is found as well.
    """

    data_dir: str | None = None
    csv: str = "coordenadas/coordenadas_maestro.csv"
    images_dir: str = "dataset"
    # Where each image is under images_dir, e.g. "{category}/images/{name}.png"; None: the
    # layout is detected (the original dataset/<category>/ or the Kaggle release's tree).
    image_pattern: str | None = None
    categories: list[str] = field(default_factory=lambda: list(CATEGORIES))
    image_size: int = 224  # model input; errors are reported at 224 px whatever this is
    split_ratios: dict[str, float] = field(
        default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15}
    )
    split_seed: int = 42
    splits_file: str | None = None  # reuse a saved splits.json instead of splitting again
    eval_batch_size: int = 32
    # LandmarkDataset's in-process cache when it decodes files itself. Training, validation and
    # test always read medcore's image store (each image decoded once, for every phase and run).
    cache_images: bool = False
    # More than 2% of annotated rows without an image file is an error (a misspelt category
    # folder would otherwise drop a whole category); True (``--allow-missing``) accepts them.
    allow_missing: bool = False
    # The built-in demo: synthetic images per category (299 x 299, like the original data).
    demo_images_per_category: int = 200


@dataclass
class AugmentConfig:
    """Training augmentation; the geometric ones move the landmarks with the image."""

    enabled: bool = True
    # True: augment whole batches on the training device (cxrlandmarks.augment, kornia); False:
    # per sample in the loader workers (the same ops on the CPU, kept to compare against).
    batched: bool = True
    hflip_p: float = 0.7  # mirrors x and swaps the symmetric pairs
    rotation_deg: float = 15.0  # uniform in +-rotation_deg about the image centre
    brightness: float = 0.4
    contrast: float = 0.4


@dataclass
class ModelConfig:
    """ResNet-18 trunk and the regression head of the spec; ``coord_attention`` adds CoordAtt."""

    num_landmarks: int = 15
    head_dropout: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.125])
    coord_attention: bool = False
    # This config starts the trunk from pretrained (ImageNet) weights: without
    # pretrained_weights it refuses to start unless --from-scratch sets this to False.
    pretrained: bool = True
    pretrained_weights: str | None = None


@dataclass
class LossConfig:
    """Loss parameters shared by the phases (each phase names its loss)."""

    wing_w: float = 10.0
    wing_epsilon: float = 2.0
    pixel_scale: float = 224.0
    symmetry_weight: float = 0.3
    distance_weight: float = 0.2
    # "prior": the original's unsupervised prior, symmetry about the axis fitted through the
    # mediastinal landmarks at that axis' own angle; "target": the prediction keeps the ground
    # truth's asymmetry about its own fitted axis (zero at a perfect prediction).
    symmetry_reference: Literal["prior", "target"] = "prior"


@dataclass
class PhaseConfig:
    """One training phase: its loss, epochs, learning rates and the checkpoint it writes."""

    loss: Literal["wing", "symmetry", "complete", "mse"] = "wing"
    epochs: int = 15
    freeze_trunk: bool = False
    trunk_lr: float = 2e-5
    head_lr: float = 2e-4
    weight_decay: float = 5e-5
    batch_size: int = 8
    max_steps_per_epoch: int | None = None  # None: the trainer section's value
    checkpoint: str = "phase1_best.pt"
    init_from: str | None = None  # the phase whose best checkpoint this one starts from


@dataclass
class PhasesConfig:
    phase1: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(
            "wing", 15, True, 0.0, 2e-4, 5e-5, 8, None, "phase1_best.pt"
        )
    )
    phase2: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(
            "wing", 55, False, 2e-5, 2e-4, 5e-5, 8, None, "phase2_best.pt", "phase1"
        )
    )
    phase3: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(
            "symmetry", 50, False, 2e-5, 2e-4, 5e-5, 8, None, "geometric_symmetry.pt", "phase2"
        )
    )
    phase4: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(
            "complete", 40, False, 2e-5, 2e-4, 5e-5, 8, None, "geometric_complete.pt", "phase3"
        )
    )


@dataclass
class EvalConfig:
    grid_images: int = 16  # test images drawn in the annotated PNG grid
    # Flip test-time augmentation (the mirrored image's prediction, flipped back, averaged in):
    # the run's test report, cxrlandmarks-eval/-predict without --[no-]tta-flip, and
    # cxrlandmarks.load(...).predict all follow it (an export records it).
    tta_flip: bool = False


@dataclass
class CxrConfig(RunConfig):
    # Each phase trains for its own epochs: --epochs N sets all four (trainer.epochs is unused,
    # and a config or --set that changes it is refused).
    epochs_keys: ClassVar[tuple[str, ...]] = tuple(f"phases.{p}.epochs" for p in PHASES)

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    phases: PhasesConfig = field(default_factory=PhasesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(
            monitor=["val/mean_px"], monitor_mode="min", grad_clip=5.0, log_every_steps=20
        )
    )
