from __future__ import annotations

import dataclasses

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from binensemble.config import BinEnsembleConfig, DataConfig, ModelConfig
from binensemble.model import BaselineModel, DualBackbone, MetricModel, build_model
from medcore.errors import UserError
from medcore.weights.checkpoint import export_safetensors

# timm's test_* models from scratch, all of them trained, no checkpointing (like the demo).
TINY = ModelConfig(
    convnext_name="test_convnext",
    vit_name="test_vit",
    hidden_dim=32,
    embed_dim=16,
    pretrained=False,
    train_convnext_stages=-1,
    train_vit_blocks=-1,
    grad_checkpointing=False,
)


def _build(model: ModelConfig, img_size: int, **kwargs) -> torch.nn.Module:
    """``build_model`` of the package config holding ``model`` at ``img_size`` inputs."""
    return build_model(BinEnsembleConfig(model=model, data=DataConfig(img_size=img_size)), **kwargs)


def test_full_size_architecture_on_meta_device() -> None:
    cfg = ModelConfig()  # ConvNeXt-Large + ViT-Large, the research defaults
    with torch.device("meta"):
        model = _build(cfg, 448, load_weights=False).eval()
        baseline = _build(dataclasses.replace(cfg, kind="baseline"), 448, load_weights=False)
        baseline.eval()
        x = torch.empty(2, 3, 448, 448)
        emb = model(x)
        logits = baseline(x)
    assert isinstance(model, MetricModel) and isinstance(baseline, BaselineModel)
    assert model.backbone.convnext.num_features == 1536
    assert model.backbone.vit.num_features == 1024
    assert model.backbone.num_features == 2560
    # Position embeddings built for the 448 input: 28 x 28 patches + the class token.
    assert tuple(model.backbone.vit.pos_embed.shape) == (1, 28 * 28 + 1, 1024)
    first, last = model.head[0], model.head[-1]
    assert (first.in_features, first.out_features, last.out_features) == (2560, 512, 128)
    assert isinstance(model.head[1], torch.nn.BatchNorm1d)
    assert tuple(emb.shape) == (2, 128) and emb.device.type == "meta"
    assert tuple(logits.shape) == (2, 2)


def test_metric_embeddings_are_unit_norm_and_feature_dims_come_from_backbones() -> None:
    model = _build(TINY, 32).eval()
    emb = model(torch.randn(3, 3, 32, 32))
    assert emb.shape == (3, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    backbone = model.backbone
    assert backbone.num_features == backbone.convnext.num_features + backbone.vit.num_features
    assert model.head[0].in_features == backbone.num_features


def test_partial_freezing_and_param_groups() -> None:
    cfg = ModelConfig(**{**TINY.__dict__, "train_convnext_stages": 1, "train_vit_blocks": 2})
    model = _build(cfg, 32)
    conv, vit = model.backbone.convnext, model.backbone.vit
    assert all(p.requires_grad for p in conv.stages[-1].parameters())
    assert not any(p.requires_grad for p in conv.stages[0].parameters())
    assert not any(p.requires_grad for p in conv.stem.parameters())
    assert all(p.requires_grad for p in conv.head.parameters())  # final norm
    assert all(p.requires_grad for b in vit.blocks[-2:] for p in b.parameters())
    assert not any(p.requires_grad for p in vit.blocks[0].parameters())
    assert not vit.pos_embed.requires_grad and vit.norm.weight.requires_grad
    groups = model.param_groups(5e-6, 1e-3)
    assert [g["lr"] for g in groups] == [5e-6, 1e-3]
    trainable = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert {id(p) for p in groups[0]["params"]} == trainable
    assert len(groups[1]["params"]) == len(list(model.head.parameters()))


def test_per_backbone_weights_with_pos_embed_resampling(tmp_path) -> None:
    source = DualBackbone("test_convnext", "test_vit", img_size=32)  # 2 x 2 token grid
    torch.save(source.convnext.state_dict(), tmp_path / "convnext.pt")
    export_safetensors(source.vit.state_dict(), tmp_path / "vit.safetensors")
    cfg = ModelConfig(
        **{
            **TINY.__dict__,
            "pretrained": True,
            "convnext_weights": str(tmp_path / "convnext.pt"),
            "vit_weights": str(tmp_path / "vit.safetensors"),
        }
    )
    model = _build(cfg, 64)  # 4 x 4 token grid
    for name, value in source.convnext.state_dict().items():
        torch.testing.assert_close(model.backbone.convnext.state_dict()[name], value)
    expected = resample_abs_pos_embed(
        source.vit.pos_embed.detach(), new_size=(4, 4), num_prefix_tokens=1
    )
    torch.testing.assert_close(model.backbone.vit.pos_embed.detach(), expected)
    torch.testing.assert_close(
        model.backbone.vit.blocks[0].attn.qkv.weight, source.vit.blocks[0].attn.qkv.weight
    )


def test_combined_weights_file(tmp_path) -> None:
    source = _build(TINY, 32)
    export_safetensors(
        source.state_dict(), tmp_path / "model.safetensors"
    )  # backbone.* and head.* keys
    cfg = ModelConfig(
        **{
            **TINY.__dict__,
            "pretrained": True,
            "pretrained_weights": str(tmp_path / "model.safetensors"),
        }
    )
    model = _build(cfg, 32)
    torch.testing.assert_close(model.backbone.vit.cls_token, source.backbone.vit.cls_token)
    torch.testing.assert_close(
        model.backbone.convnext.stem[0].weight, source.backbone.convnext.stem[0].weight
    )


def test_pretrained_without_files_is_a_clear_error() -> None:
    cfg = ModelConfig(**{**TINY.__dict__, "pretrained": True})
    with pytest.raises(UserError, match="--pretrained-weights"):
        _build(cfg, 32)
