"""Typed configuration of ctclip: the ``data``, ``model`` and ``trainer`` sections of a YAML config.

The dataclass defaults are the research setting of the original work (CT-RATE, DINOv2 ViT-B/14
on 160 slices of 224x224, batch 32 for 40 epochs); ``configs/default.yaml`` is the CPU demo and
each research YAML holds only what differs from these defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from medcore.config import RunConfig, TrainerConfig

TextColumn = Literal["findings", "impressions", "both"]
# ctclip-preprocess --hu-source: how stored voxel values become HU (see ctclip.preprocess).
HU_SOURCES = ("auto", "header", "metadata")


@dataclass
class DataConfig:
    """Where the volumes and texts are.

    ``data_dir`` is a CT-RATE copy (:mod:`ctclip.ctrate`): the Hugging Face download (its root or
    ``dataset/``) or a flat folder (``ct_rate/`` CSVs, ``ct_volumes.h5``). The reports and labels
    default to its tables: ``train_reports.csv`` and ``valid_predicted_labels.csv``.
    Relative paths are taken relative to ``data_dir``.
    """

    data_dir: str | None = None
    ct_filepath: str = "ct_volumes.h5"  # written by ctclip-preprocess
    txt_filepath: str | None = None  # None: the CT-RATE copy's train reports
    val_ct_filepath: str | None = (
        None  # None: the training HDF5 (CT-RATE keeps all volumes in one file)
    )
    val_label_path: str | None = None  # None: the CT-RATE copy's validation labels
    text_column: TextColumn = "findings"
    # The JSON written by ctclip-impressions: its generated impressions fill the reports' missing
    # Impressions_EN before the texts are built (needs text_column impressions or both).
    completed_impressions: str | None = None
    allow_missing: bool = False  # use only CSV names that have a volume instead of failing
    # Each time a report is drawn, keep a random subset of its sentences (1 to all, in order):
    # long reports then contribute all their sentences across epochs despite the 77-token
    # context, and short prompts like "<finding> is present." are in the training distribution.
    sentence_sampling: bool = False
    # What the HDF5 store must have been written with (ctclip-preprocess --target-shape,
    # --slide-b2u); None accepts the store's value. The HU range and orientation are always checked.
    target_shape: list[int] | None = None
    slide_b2u: bool | None = None
    # The built-in demo: how many synthetic volumes, and the preprocessed shape (D, H, W).
    demo_train_volumes: int = 160
    demo_valid_volumes: int = 60
    demo_target_shape: list[int] = field(default_factory=lambda: [16, 56, 56])


@dataclass
class ModelConfig:
    """The 3D CLIP model: DINOv2 per slice, x-transformers slice fusion, CLIP text transformer."""

    dinov2_model_name: str = "dinov2_vitb14"
    # Extra timm constructor arguments (depth, embed_dim, num_heads, mlp_ratio ...) for small variants.
    backbone_overrides: dict[str, int | float] = field(default_factory=dict)
    image_size: int = 224
    # The backbone starts from pretrained DINOv2 weights (--pretrained-weights); false (or
    # --from-scratch) trains it from random initialisation.
    pretrained: bool = True
    freeze_dinov2: bool = False
    pretrained_weights: str | None = None
    # The text tower's start: an open_clip CLIP checkpoint (FILE, DIR or hf-hub:NAME) whose text
    # transformer has these widths (the defaults are CLIP ViT-B's); None: random init.
    text_weights: str | None = None
    # The text transformer's MLP activation: QuickGELU (OpenAI CLIP and open_clip's -quickgelu
    # models) or GELU. None: what the text weights say (their open_clip_config.json, else
    # open_clip's pretrained registry), GELU without text weights; a value the weights
    # contradict is an error. Resolved when training starts and recorded in the checkpoint.
    text_quick_gelu: bool | None = None
    # Per-channel input normalisation the backbone's weights expect (after the per-slice min-max
    # to [0, 1]); None: from the weights' own config or the architecture's timm pretrained_cfg,
    # resolved when training starts and recorded in the checkpoint, which eval uses unchanged.
    mean: list[float] | None = None
    std: list[float] | None = None
    slice_chunk_size: int = 32  # slices per backbone call; bounds activation memory
    grad_checkpointing: bool = True
    fusion_depth: int = 4
    fusion_heads: int = 8
    embed_dim: int = 512  # joint image-text dimension
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    init_logit_scale: float = math.log(1 / 0.07)


@dataclass
class ValidationConfig:
    """Zero-shot validation on the 18 findings during training."""

    do_validate: bool = (
        True  # how often: trainer.eval_every_steps (--valid-interval; 0 = every epoch)
    )
    batch_size: int = 8
    n_boot: int = 1000  # bootstrap resamples for the confidence intervals of the final evaluation


@dataclass
class CTClipTrainerConfig(TrainerConfig):
    """medcore's training loop with the original work's settings as defaults."""

    epochs: int = 40
    batch_size: int | None = 32
    num_workers: int | None = 8
    drop_last: bool = True
    lr: float = 1e-4
    weight_decay: float = 0.2
    warmup_ratio: float = 0.03
    grad_clip: float | None = 1.0
    eval_every_steps: int = 200
    monitor: list[str] = field(default_factory=lambda: ["val/mean_auc"])
    monitor_mode: Literal["max", "min"] = "max"
    save_every_steps: int = 200


@dataclass
class CTClipConfig(RunConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    trainer: CTClipTrainerConfig = field(default_factory=CTClipTrainerConfig)
    backbone_lr_scale: float = 0.1  # backbone learning rate = trainer.lr * backbone_lr_scale
    # Gradient cache: the whole trainer.batch_size is the contrastive batch (every volume sees
    # every other text as a negative), while the towers run with grad on this many volumes at a
    # time; 0 embeds the batch in one pass. trainer.grad_accum_steps does NOT enlarge the
    # contrastive batch: each accumulated micro-batch only sees its own negatives.
    grad_cache_chunk_size: int = 0
    use_ddp: bool = False


# ctclip-train flags in the original work's spelling -> (config key, type); bool: --x / --no-x.
# Each one given becomes a --set item (ctclip.train.flag_overrides).
TRAIN_FLAGS: dict[str, tuple[str, type]] = {
    "ct_filepath": ("data.ct_filepath", str),
    "txt_filepath": ("data.txt_filepath", str),
    "val_ct_filepath": ("data.val_ct_filepath", str),
    "val_label_path": ("data.val_label_path", str),
    "text_column": ("data.text_column", str),
    "completed_impressions": ("data.completed_impressions", str),
    "dinov2_model_name": ("model.dinov2_model_name", str),
    "text_weights": ("model.text_weights", str),
    "text_quick_gelu": ("model.text_quick_gelu", bool),
    "context_length": ("model.context_length", int),
    "batch_size": ("trainer.batch_size", int),
    "lr": ("trainer.lr", float),
    "valid_interval": ("trainer.eval_every_steps", int),
    "freeze_dinov2": ("model.freeze_dinov2", bool),
    "do_validate": ("validation.do_validate", bool),
    "use_ddp": ("use_ddp", bool),
}
