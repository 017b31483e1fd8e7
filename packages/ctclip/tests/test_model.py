"""The model: backbone names, per-slice encoding, chunking/checkpointing, DINOv2 weight loading."""

from __future__ import annotations

import pytest
import timm
import torch

from ctclip.config import CTClipConfig
from ctclip.model import (
    BACKBONES,
    build_model,
    convert_dinov2_state,
    create_backbone,
    timm_backbone_name,
)
from medcore.errors import CheckpointError, ConfigError, UserError
from medcore.testing import hub_snapshot


def test_backbone_names_map_to_timm_dinov2():
    assert timm_backbone_name("dinov2_vitb14") == "vit_base_patch14_dinov2"
    assert timm_backbone_name("dinov2_vitl14_reg") == "vit_large_patch14_reg4_dinov2"
    assert timm_backbone_name("vit_small_patch14_dinov2") == "vit_small_patch14_dinov2"
    assert set(BACKBONES.values()) <= set(timm.list_models("*dinov2*"))
    with pytest.raises(ConfigError) as err:
        timm_backbone_name("dinov3_vitb16")
    assert "dinov2_vitg14_reg" in err.value.why


def test_full_size_backbone_has_dinov2_architecture(tiny_cfg):
    backbone = create_backbone(
        tiny_cfg(dinov2_model_name="dinov2_vits14_reg", backbone_overrides={}, image_size=56)
    )
    assert backbone.num_features == 384 and len(backbone.blocks) == 12
    assert backbone.reg_token.shape == (1, 4, 384) and backbone.patch_embed.grid_size == (4, 4)


def test_forward_shapes_and_normalised_features(tiny_cfg):
    model = build_model(CTClipConfig(model=tiny_cfg())).eval()
    volume = torch.randint(0, 256, (2, 5, 28, 28), dtype=torch.uint8)
    tokens = torch.randint(1, 1000, (2, 32))
    image, text, scale = model(volume, tokens)
    assert image.shape == (2, 16) and text.shape == (2, 16)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(2))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-4)


def test_per_slice_min_max_normalisation_matches_a_loop(tiny_cfg):
    model = build_model(CTClipConfig(model=tiny_cfg()))
    slices = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    slices[2] = 7  # a uniform slice
    out = model.visual.normalize_slices(slices)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    for i, s in enumerate(slices.float()):
        scaled = (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else torch.zeros_like(s)
        torch.testing.assert_close(out[i], (scaled.expand(3, -1, -1) - mean) / std)


def test_chunking_and_checkpointing_do_not_change_results(tiny_cfg):
    torch.manual_seed(0)
    ref = build_model(CTClipConfig(model=tiny_cfg(slice_chunk_size=1000)))
    chunked = build_model(CTClipConfig(model=tiny_cfg(slice_chunk_size=3, grad_checkpointing=True)))
    chunked.load_state_dict(ref.state_dict())
    volume = torch.randint(0, 256, (2, 7, 28, 28), dtype=torch.uint8)
    grads = []
    for model in (ref, chunked):
        model.train()
        out = model.encode_volume(volume)
        out.sum().backward()
        grads.append(model.visual.backbone.patch_embed.proj.weight.grad.clone())
        assert out.shape == (2, 16)
    torch.testing.assert_close(ref.encode_volume(volume), chunked.encode_volume(volume))
    torch.testing.assert_close(grads[0], grads[1])


def _hub_layout(model: torch.nn.Module, registers: bool) -> dict[str, torch.Tensor]:
    """A timm DINOv2 state dict written back in the torch.hub layout (what facebookresearch ships)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dim = state["cls_token"].shape[-1]
    state["mask_token"] = torch.zeros(1, dim)
    if registers:
        state["register_tokens"] = state.pop("reg_token")
        # the hub keeps a position for the CLS token; timm folds it into cls_token
        cls_pos = torch.randn(1, 1, dim)
        state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
        state["cls_token"] = state["cls_token"] - cls_pos[:, 0]
    return state


@pytest.mark.parametrize("registers", [False, True])
def test_hub_layout_weights_load_with_position_interpolation(tmp_path, registers, tiny_cfg):
    name = "dinov2_vits14_reg" if registers else "dinov2_vits14"
    overrides = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    source = create_backbone(
        tiny_cfg(dinov2_model_name=name, backbone_overrides=overrides, image_size=42)
    )
    path = tmp_path / "hub.pth"
    torch.save(_hub_layout(source, registers), path)
    model = build_model(
        CTClipConfig(
            model=tiny_cfg(
                dinov2_model_name=name,
                backbone_overrides=overrides,
                image_size=28,
                pretrained_weights=str(path),
            )
        )
    )
    backbone = model.visual.backbone
    torch.testing.assert_close(backbone.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(backbone.blocks[0].ls1.gamma, source.blocks[0].ls1.gamma)
    torch.testing.assert_close(backbone.cls_token, source.cls_token)
    assert backbone.pos_embed.shape[1] == source.pos_embed.shape[1] - 5  # 3x3 grid -> 2x2 grid
    # timm layout at the same size loads exactly
    timm_path = tmp_path / "timm.pth"
    torch.save({"state_dict": source.state_dict()}, timm_path)
    same = create_backbone(
        tiny_cfg(dinov2_model_name=name, backbone_overrides=overrides, image_size=42)
    )
    same.load_state_dict(convert_dinov2_state(torch.load(timm_path)["state_dict"], same))
    torch.testing.assert_close(same.pos_embed, source.pos_embed)


def test_weights_of_another_architecture_are_refused(tmp_path, tiny_cfg):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(CheckpointError, match="tensors match"):
        build_model(CTClipConfig(model=tiny_cfg(pretrained_weights=str(path))))


def test_frozen_backbone_without_weights_is_an_error_and_with_weights_has_no_grad(
    tmp_path, tiny_cfg
):
    with pytest.raises(UserError, match="--pretrained-weights"):
        build_model(CTClipConfig(model=tiny_cfg(freeze_dinov2=True)))
    path = tmp_path / "w.pth"
    torch.save(create_backbone(tiny_cfg()).state_dict(), path)
    model = build_model(
        CTClipConfig(model=tiny_cfg(freeze_dinov2=True, pretrained_weights=str(path)))
    )
    assert not any(p.requires_grad for p in model.visual.backbone.parameters())
    names = {g["name"] for g in model.param_groups(1e-3, 0.1, 0.05)}
    assert not any(n.startswith("backbone") for n in names)


def test_param_groups_lower_backbone_lr_and_no_decay_on_gains(tiny_cfg):
    model = build_model(CTClipConfig(model=tiny_cfg()))
    groups = {g["name"]: g for g in model.param_groups(1e-3, 0.1, 0.05)}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["head"][
        "lr"
    ] == pytest.approx(1e-3)
    no_decay = {id(p) for p in groups["head_no_decay"]["params"]}
    assert id(model.logit_scale) in no_decay and groups["head_no_decay"]["weight_decay"] == 0.0
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len([p for p in model.parameters() if p.requires_grad])


def test_pretrained_config_without_weights_says_how_to_supply_them(tiny_cfg):
    with pytest.raises(UserError) as err:
        build_model(CTClipConfig(model=tiny_cfg(pretrained=True)))
    assert "--pretrained-weights" in err.value.why and "--from-scratch" in err.value.why
    assert "hf-hub:timm/vit_small_patch14_dinov2" in err.value.why
    # building without loading (dry run, eval) needs no weights
    build_model(CTClipConfig(model=tiny_cfg(pretrained=True)), load_weights=False)


def test_init_line_tells_the_source(tiny_cfg):
    from ctclip.model import init_line

    assert init_line(tiny_cfg()) == (
        "init: backbone vit_small_patch14_dinov2 scratch (random init); "
        "text tower scratch (random init)"
    )
    line = init_line(tiny_cfg(pretrained_weights="w.pth", freeze_dinov2=True, text_weights="c"))
    assert "pretrained from w.pth, frozen; text tower from c" in line


def test_normalisation_from_the_backbone_config_unless_the_config_sets_it(tiny_cfg):
    with torch.device("meta"):
        expected = timm.create_model("vit_small_patch14_dinov2", pretrained=False).pretrained_cfg
    model = build_model(CTClipConfig(model=tiny_cfg()))
    norm = model.visual.normalization()
    assert norm["mean"] == pytest.approx(expected["mean"]) and norm["std"] == pytest.approx(
        expected["std"]
    )
    half = build_model(CTClipConfig(model=tiny_cfg(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])))
    slices = torch.tensor([[[0, 255], [255, 0]]], dtype=torch.uint8)
    out = half.visual.normalize_slices(slices)
    torch.testing.assert_close(out[0, :, 0, 1], torch.full((3,), 2.0))  # (1 - 0.5) / 0.25
    with pytest.raises(ConfigError, match="both"):
        build_model(CTClipConfig(model=tiny_cfg(mean=[0.5, 0.5, 0.5])))


def _fake_hub_cache(home, repo: str, files: dict[str, bytes]) -> None:
    hub_snapshot(home, repo, files)


def _tiny_open_clip():
    """A locally built open_clip CLIP whose text tower has the tiny config's widths."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(1)
    return CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, patch_size=14, image_size=28, head_width=16),
        text_cfg=CLIPTextCfg(context_length=32, vocab_size=49408, width=32, heads=2, layers=1),
    )


def test_text_tower_starts_from_an_open_clip_checkpoint(tmp_path, tiny_cfg, monkeypatch, capsys):
    from safetensors.torch import save_file

    clip = _tiny_open_clip()
    state = clip.state_dict()
    torch.save(state, tmp_path / "clip.pt")
    folder = tmp_path / "snapshot"
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors")
    )
    # what a hub repository keeps beside it: the HF-transformers copy, which must not be taken
    save_file({"text_model.embeddings.x": torch.zeros(1)}, str(folder / "model.safetensors"))
    home = tmp_path / "hf"
    _fake_hub_cache(home, "org/tiny-clip", {
        n: (folder / n).read_bytes() for n in ("open_clip_model.safetensors", "model.safetensors")
    })  # fmt: skip
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokens = torch.randint(1, 1000, (2, 32))
    expected = clip.encode_text(tokens)
    for spec in (tmp_path / "clip.pt", folder, "hf-hub:org/tiny-clip"):
        # No open_clip_config.json beside these weights: the config says their activation
        # (tests/test_text_activation.py covers the ways the weights say it themselves).
        model = build_model(
            CTClipConfig(model=tiny_cfg(text_weights=str(spec), text_quick_gelu=False))
        )
        torch.testing.assert_close(model.text(tokens), expected)
        line = capsys.readouterr().out
        assert f"loaded CLIP text tower weights from {spec}" in line
        assert f"{len(model.text.state_dict())}/{len(model.text.state_dict())} tensors" in line
    with pytest.raises(CheckpointError, match="missing"):
        build_model(
            CTClipConfig(
                model=tiny_cfg(text_weights=str(folder), text_layers=2, text_quick_gelu=False)
            )
        )


def test_hf_transformers_dinov2_directory_loads_with_its_normalisation(tmp_path, tiny_cfg, capsys):
    """A ``facebook/dinov2-*`` style folder (HF-transformers keys, preprocessor_config.json)."""
    import json

    from safetensors.torch import save_file

    from medcore.weights.keys import timm_to_hf_dinov2

    overrides = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    source = create_backbone(tiny_cfg(backbone_overrides=overrides, image_size=28))
    folder = tmp_path / "dinov2-tiny"
    folder.mkdir()
    hf = timm_to_hf_dinov2(source.state_dict())
    save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / "model.safetensors"))
    pre = {"image_mean": [0.4, 0.4, 0.4], "image_std": [0.2, 0.2, 0.2], "resample": 3}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    model = build_model(CTClipConfig(model=tiny_cfg(pretrained_weights=str(folder))))
    backbone = model.visual.backbone
    torch.testing.assert_close(backbone.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(backbone.pos_embed, source.pos_embed)
    assert model.visual.normalization()["mean"] == pytest.approx([0.4] * 3)
    assert model.visual.normalization()["std"] == pytest.approx([0.2] * 3)
    assert "0 missing" in capsys.readouterr().out
