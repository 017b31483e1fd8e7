"""Shared fixtures: tiny configs of the real classes and a tiny demo dataset on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctclip.config import ModelConfig
from ctclip.preprocess import run_preprocess
from ctclip.synthetic import generate_demo

TINY_SHAPE = (8, 28, 28)
# `--set` overrides that shrink ctclip-train to a tiny config.
TINY_SETS = [
    "model.backbone_overrides={depth: 1, embed_dim: 32, num_heads: 2}",
    "model.image_size=28",
    "model.fusion_depth=1",
    "model.fusion_heads=2",
    "model.embed_dim=16",
    "model.text_width=32",
    "model.text_heads=2",
    "model.text_layers=1",
    "model.context_length=32",
    "data.demo_train_volumes=8",
    "data.demo_valid_volumes=6",
    "data.demo_target_shape=[8, 28, 28]",
    "trainer.batch_size=4",
    "validation.batch_size=4",
    "validation.n_boot=20",
]


def tiny_model_config(**changes) -> ModelConfig:
    base = dict(
        dinov2_model_name="dinov2_vits14",
        backbone_overrides={"depth": 1, "embed_dim": 32, "num_heads": 2},
        image_size=28,
        fusion_depth=1,
        fusion_heads=2,
        embed_dim=16,
        context_length=32,
        text_width=32,
        text_heads=2,
        text_layers=1,
        slice_chunk_size=64,
        pretrained=False,
        grad_checkpointing=False,
    )
    base.update(changes)
    return ModelConfig(**base)


@pytest.fixture(scope="session")
def tiny_sets() -> list[str]:
    """``--set`` arguments for a tiny ctclip-train (plus any extra overrides)."""
    return [arg for item in TINY_SETS for arg in ("--set", item)]


@pytest.fixture
def tiny_cfg():
    """Factory of tiny model configs: ``tiny_cfg(image_size=42)``."""
    return tiny_model_config


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A small CT-RATE-layout dataset (NIfTI + CSVs) preprocessed to ``ct_volumes.h5``."""
    root = tmp_path_factory.mktemp("demo")
    generate_demo(root, n_train=8, n_valid=6, seed=3)
    csv = root / "ct_rate"
    run_preprocess(
        root / "ct_volumes",
        root / "ct_volumes.h5",
        [csv / "train_metadata.csv", csv / "validation_metadata.csv"],
        TINY_SHAPE,
        num_workers=0,
        show_progress=False,
    )
    return root
