"""torch.hub-layout DINOv2 weights under the prefixes training frameworks add (DDP ``module.``,
a DINO teacher's ``backbone.``, a LightningModule's ``model.``) load exactly as the bare file:
medcore strips the prefix before timm's filter converts the layout and resamples positions."""

from __future__ import annotations

import pytest
import torch

from ctclip.config import CTClipConfig
from ctclip.model import build_model, create_backbone

NAME = "dinov2_vits14_reg"
OVERRIDES = {"depth": 1, "embed_dim": 32, "num_heads": 2}


def _hub_layout(source: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm DINOv2-with-registers weights as facebookresearch/dinov2 ships them: mask_token,
    register_tokens, and a class position inside pos_embed (folded into cls_token by timm)."""
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    state["register_tokens"] = state.pop("reg_token")
    cls_pos = torch.randn(1, 1, state["cls_token"].shape[-1])
    state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    state["cls_token"] = state["cls_token"] - cls_pos[:, 0]
    return state


def _wrapped(how: str, hub: dict[str, torch.Tensor]) -> dict:
    if how == "ddp":
        return {f"module.{k}": v for k, v in hub.items()}
    if how == "dino_teacher":  # DINO's checkpoint: teacher and student, each backbone + head
        teacher = {f"backbone.{k}": v for k, v in hub.items()}
        teacher["head.last_layer.weight_g"] = torch.ones(64, 1)
        return {"teacher": teacher, "student": dict(teacher), "epoch": 100}
    lightning = {f"model.{k}": v for k, v in hub.items()}
    return {"state_dict": lightning, "epoch": 3, "global_step": 90, "hparams_name": "kwargs"}


@pytest.mark.parametrize("how", ["ddp", "dino_teacher", "lightning"])
def test_prefixed_hub_weights_load_like_the_bare_file(how, tmp_path, tiny_cfg, capsys) -> None:
    torch.manual_seed(0)
    source = create_backbone(
        tiny_cfg(dinov2_model_name=NAME, backbone_overrides=OVERRIDES, image_size=42)
    )
    hub = _hub_layout(source)
    torch.save(hub, tmp_path / "bare.pth")
    torch.save(_wrapped(how, hub), tmp_path / "wrapped.pth")
    loaded = [
        build_model(
            CTClipConfig(
                model=tiny_cfg(
                    dinov2_model_name=NAME,
                    backbone_overrides=OVERRIDES,
                    image_size=28,  # 3 x 3 -> 2 x 2 position grid: timm's filter resamples
                    pretrained_weights=str(tmp_path / name),
                )
            )
        ).visual.backbone.state_dict()
        for name in ("bare.pth", "wrapped.pth")
    ]
    assert loaded[0].keys() == loaded[1].keys()
    for key in loaded[0]:
        assert torch.equal(loaded[0][key], loaded[1][key]), key
    torch.testing.assert_close(
        loaded[1]["blocks.0.attn.qkv.weight"], hub["blocks.0.attn.qkv.weight"]
    )
    prefix = {"ddp": "module.", "dino_teacher": "backbone.", "lightning": "model."}[how]
    assert f"stripped prefix {prefix!r}" in capsys.readouterr().out
