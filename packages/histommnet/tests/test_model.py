from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import timm
import torch

from histommnet.attention import (
    ClinicalChannelAttention,
    ClinicalCrossMagFusion,
    HierarchicalMagnificationAttention,
    MultiScaleAttentionPool,
)
from histommnet.config import ModelConfig
from histommnet.model import (
    ConcatNet,
    MMNet,
    SingleMagNet,
    build_model,
    checkpoint_kind,
    load_model,
)
from medcore.config import to_dict
from medcore.errors import CheckpointError, ConfigError, UserError
from medcore.weights.checkpoint import save_checkpoint

MAGS = ["40X", "100X", "200X", "400X"]


def test_channel_attention_matches_avg_max_gate() -> None:
    torch.manual_seed(0)
    att = ClinicalChannelAttention(32, reduction=4)
    x = torch.randn(2, 32, 5, 5)
    y = att(x)
    assert y.shape == x.shape

    # independent reference: sigmoid(mlp(avg) + mlp(max)) scales every channel
    def mlp(v):
        return att.fc2(att.act(att.fc1(v)))

    gate = torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    torch.testing.assert_close(y, x * gate)


def test_multiscale_pool_shapes_and_weights() -> None:
    pool = MultiScaleAttentionPool(16, scales=(1, 3, 5))
    x = torch.randn(3, 16, 6, 7, requires_grad=True)
    maps = pool.attention_maps(x)
    assert maps.shape == (3, 3, 6, 7)
    torch.testing.assert_close(maps.sum((2, 3)), torch.ones(3, 3))
    out = pool(x)
    assert out.shape == (3, 16)
    out.sum().backward()
    assert (
        x.grad is not None
        and pool.scale_logits.grad is not None
        and pool.scale_logits.grad.abs().sum() > 0
    )
    # With constant features every attention map pools to the same vector.
    const = torch.ones(1, 16, 4, 4) * torch.arange(16.0).view(1, 16, 1, 1)
    torch.testing.assert_close(pool.eval()(const), torch.arange(16.0).view(1, 16))


def test_hierarchical_attention_lets_higher_mags_attend_to_lower_only() -> None:
    torch.manual_seed(0)
    hma = HierarchicalMagnificationAttention(
        16, num_magnifications=4, num_heads=2, dropout=0.0
    ).eval()
    tokens = torch.randn(2, 4, 16, requires_grad=True)
    out, weights = hma(tokens)
    assert out.shape == (2, 4, 16) and weights.shape == (2, 4, 4)
    assert torch.all(weights.triu(diagonal=1) == 0)  # nobody attends to a higher magnification
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4))
    (grad_40x,) = torch.autograd.grad(out[:, 0].sum(), tokens, retain_graph=True)
    assert grad_40x[:, 1:].abs().max() == 0  # 40X sees only itself
    (grad_400x,) = torch.autograd.grad(out[:, 3].sum(), tokens, retain_graph=True)
    assert all(grad_400x[:, j].abs().sum() > 0 for j in range(4))  # 400X sees every lower one
    out.sum().backward()
    assert hma.mag_embed.grad is not None and hma.mag_embed.grad.abs().sum() > 0


def test_fusion_blends_global_and_concat_views() -> None:
    torch.manual_seed(0)
    fusion = ClinicalCrossMagFusion(8, num_magnifications=4, dropout=0.0).eval()
    tokens = torch.randn(5, 4, 8, requires_grad=True)
    fused, weights = fusion(tokens)
    assert fused.shape == (5, 8) and weights.shape == (5, 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    fused.pow(2).sum().backward()
    assert fusion.blend.grad is not None and fusion.blend.grad.abs() > 0
    assert tokens.grad.abs().sum() > 0
    # blend -> +inf keeps only the attention-weighted view
    with torch.no_grad():
        fusion.blend.fill_(50.0)
        fused, weights = fusion(tokens)
        expected = fusion.norm(torch.einsum("bm,bmd->bd", weights, tokens))
    torch.testing.assert_close(fused, expected)


@pytest.mark.parametrize(
    ("name", "cls"), [("mmnet", MMNet), ("single", SingleMagNet), ("concat", ConcatNet)]
)
def test_models_forward_and_gradients(
    name: str, cls: type, tiny_model_cfg: ModelConfig, histo_config
) -> None:
    cfg = dataclasses.replace(tiny_model_cfg, name=name)
    model = build_model(histo_config(cfg, MAGS))
    assert isinstance(model, cls) and checkpoint_kind(model) == f"histommnet.{cls.__name__}"
    x = torch.randn(3, 4, 3, 32, 32)
    out = model(x)
    assert out["logits"].shape == (3, 2) and out["subtype_logits"].shape == (3, 8)
    assert model.embed(x).shape[0] == 3
    (out["logits"].sum() + out["subtype_logits"].sum()).backward()
    trunks = model.encoder.trunks
    assert len(trunks) == (1 if name == "single" else 4)
    for trunk in trunks:  # every magnification's trunk learns
        assert (
            trunk.conv_stem.weight.grad is not None and trunk.conv_stem.weight.grad.abs().sum() > 0
        )


def test_single_uses_only_its_magnification(tiny_model_cfg: ModelConfig, histo_config) -> None:
    model = build_model(
        histo_config(
            dataclasses.replace(tiny_model_cfg, name="single", single_magnification="200X"), MAGS
        )
    ).eval()
    x = torch.randn(2, 4, 3, 32, 32)
    y = x.clone()
    y[:, [0, 1, 3]] = torch.randn(2, 3, 3, 32, 32)
    torch.testing.assert_close(model(x)["logits"], model(y)["logits"])
    with pytest.raises(ConfigError):
        build_model(
            histo_config(
                dataclasses.replace(tiny_model_cfg, name="single", single_magnification="40X"),
                ["100X"],
            )
        )


def test_shared_backbone_and_no_subtype_head(tiny_model_cfg: ModelConfig) -> None:
    cfg = dataclasses.replace(tiny_model_cfg, shared_backbone=True, subtype_head=False)
    model = MMNet(cfg, MAGS)
    assert len(model.encoder.trunks) == 1
    out = model(torch.randn(2, 4, 3, 32, 32))
    assert out["logits"].shape == (2, 2) and "subtype_logits" not in out


def test_pretrained_weights_from_local_file_only(
    tiny_model_cfg: ModelConfig, tmp_path: Path, histo_config
) -> None:
    with pytest.raises(UserError, match="--pretrained-weights"):
        build_model(histo_config(dataclasses.replace(tiny_model_cfg, pretrained=True), MAGS))
    source = timm.create_model("test_efficientnet", pretrained=False, num_classes=0, global_pool="")
    path = tmp_path / "trunk.pth"
    torch.save(source.state_dict(), path)
    model = build_model(
        histo_config(dataclasses.replace(tiny_model_cfg, pretrained_weights=str(path)), MAGS)
    )
    for trunk in model.encoder.trunks:
        torch.testing.assert_close(trunk.conv_stem.weight, source.conv_stem.weight)
    with pytest.raises(ConfigError, match=r"model\.backbone"):
        build_model(histo_config(dataclasses.replace(tiny_model_cfg, backbone="no_such_net"), MAGS))


def test_load_model_rebuilds_from_checkpoint(
    tiny_model_cfg: ModelConfig, tmp_path: Path, histo_config
) -> None:
    model = build_model(histo_config(tiny_model_cfg, MAGS)).eval()
    path = save_checkpoint(
        {
            "model": model.state_dict(),
            "model_config": to_dict(tiny_model_cfg),
            "magnifications": MAGS,
        },
        tmp_path / "m.pt",
        kind=checkpoint_kind(model),
    )
    rebuilt, _ = load_model(path)
    x = torch.randn(1, 4, 3, 32, 32)
    torch.testing.assert_close(rebuilt.eval()(x)["logits"], model(x)["logits"])
    other = save_checkpoint({"model": {}}, tmp_path / "o.pt", kind="ctclip.CTCLIP")
    with pytest.raises(CheckpointError, match="not histommnet"):
        load_model(other)
