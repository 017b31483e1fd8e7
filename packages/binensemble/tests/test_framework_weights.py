"""ViT weights under the prefixes training frameworks add load with their positions resampled:
medcore strips the prefix (a LightningModule's compiled ``encoder._orig_mod.``, DDP's
``module.``, this package's own ``backbone.``) before the package resamples ``pos_embed``."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from binensemble.config import BinEnsembleConfig, DataConfig, ModelConfig
from binensemble.model import DualBackbone, build_model
from medcore.testing import save_weights_as
from medcore.weights.checkpoint import export_safetensors

TINY = dict(
    convnext_name="test_convnext",
    vit_name="test_vit",
    hidden_dim=32,
    embed_dim=16,
    pretrained=True,
    train_convnext_stages=-1,
    train_vit_blocks=-1,
    grad_checkpointing=False,
)


def _build(model: ModelConfig, img_size: int, **kwargs) -> torch.nn.Module:
    """``build_model`` of the package config holding ``model`` at ``img_size`` inputs."""
    return build_model(BinEnsembleConfig(model=model, data=DataConfig(img_size=img_size)), **kwargs)


@pytest.mark.parametrize("how", ["lightning_compiled_attribute", "ddp", "plain"])
def test_vit_file_of_a_framework_is_resampled_to_the_grid(how, tmp_path) -> None:
    torch.manual_seed(0)
    source = DualBackbone("test_convnext", "test_vit", img_size=32)  # 2 x 2 token grid
    torch.save(source.convnext.state_dict(), tmp_path / "convnext.pt")
    vit = save_weights_as(how, source.vit, tmp_path / "vit.ckpt")
    cfg = ModelConfig(**TINY, convnext_weights=str(tmp_path / "convnext.pt"), vit_weights=str(vit))
    model = _build(cfg, 64)  # 4 x 4 token grid
    expected = resample_abs_pos_embed(
        source.vit.pos_embed.detach(), new_size=(4, 4), num_prefix_tokens=1
    )
    torch.testing.assert_close(model.backbone.vit.pos_embed.detach(), expected)
    for name, value in source.vit.state_dict().items():
        if name != "pos_embed":
            assert torch.equal(model.backbone.vit.state_dict()[name], value), name


def test_combined_file_under_a_prefix_is_resampled(tmp_path) -> None:
    """This package's exported model (``backbone.*``, ``head.*``) at another input size."""
    torch.manual_seed(0)
    source = _build(ModelConfig(**{**TINY, "pretrained": False}), 32)
    export_safetensors(source.state_dict(), tmp_path / "model.safetensors")
    cfg = ModelConfig(**TINY, pretrained_weights=str(tmp_path / "model.safetensors"))
    model = _build(cfg, 64)
    expected = resample_abs_pos_embed(
        source.backbone.vit.pos_embed.detach(), new_size=(4, 4), num_prefix_tokens=1
    )
    torch.testing.assert_close(model.backbone.vit.pos_embed.detach(), expected)
    torch.testing.assert_close(
        model.backbone.convnext.stem[0].weight, source.backbone.convnext.stem[0].weight
    )
