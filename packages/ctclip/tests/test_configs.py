"""Every packaged config: it resolves on its own, builds the named DINOv2 on the meta device, its
dry run reports the real size, and one training step runs at the real widths."""

from __future__ import annotations

import json
import resource
from importlib import resources
from pathlib import Path

import pytest
import timm
import torch
import yaml

from ctclip import cli
from ctclip.config import CTClipConfig, ModelConfig
from ctclip.losses import ClipLoss
from ctclip.model import CTCLIP, build_model
from medcore.cli.dry_run import build_on_meta, count_parameters
from medcore.config import load_config, packaged_config_path

# Packaged config -> the timm architecture its backbone must be (DINOv2 ViT-B/14, ViT-L/14).
RESEARCH = {
    "ctrate_vitb14": "vit_base_patch14_dinov2",
    "ctrate_vitl14_frozen": "vit_large_patch14_dinov2",
}


def test_every_packaged_config_is_covered():
    names = {p.name[:-5] for p in resources.files("ctclip").joinpath("configs").iterdir()}
    assert names == {*RESEARCH, "default"}


def _timm_backbone_count(name: str, image_size: int) -> int:
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, img_size=image_size, num_classes=0)
    return count_parameters(model)["total"]


@pytest.mark.parametrize("name", RESEARCH)
def test_research_config_stands_alone_on_the_defaults(name):
    cfg = load_config(CTClipConfig, packaged_config_path("ctclip", name))
    demo = yaml.safe_load(packaged_config_path("ctclip", "default").read_text())
    # nothing of the demo preset leaks in
    assert cfg.model.backbone_overrides == {} and demo["model"]["backbone_overrides"]
    assert cfg.trainer.warmup_steps == 0 and demo["trainer"]["warmup_steps"] == 10
    assert not cfg.data.sentence_sampling and demo["data"]["sentence_sampling"]
    assert cfg.model.image_size == 224 and cfg.model.pretrained
    assert cfg.trainer.epochs == 40 and cfg.trainer.monitor == ["val/mean_auc"]
    assert cfg.backbone_lr_scale == 0.1 and cfg.model.embed_dim == 512


@pytest.mark.parametrize("name", RESEARCH)
def test_dry_run_reports_the_real_dinov2(name, tmp_path, capsys):
    out = tmp_path / "dry"
    assert cli.train(["--config", name, "--dry-run", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "model_summary.json").read_text())
    expected = _timm_backbone_count(RESEARCH[name], 224)
    assert summary["backbone"] == RESEARCH[name]
    assert summary["components"]["visual.backbone"] == expected
    assert 85e6 < expected < 88e6 if "vitb" in name else 300e6 < expected < 306e6
    params = summary["parameters"]
    assert params["total"] == params["visual"] + params["text"] + 1  # + logit_scale
    frozen = name.endswith("_frozen")
    assert params["trainable"] == params["total"] - (expected if frozen else 0)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["backbone_overrides"] == {}
    assert not (out / "checkpoints").exists()
    assert "dry run" in capsys.readouterr().out


def test_demo_preset_builds_the_small_backbone():
    cfg = load_config(CTClipConfig, packaged_config_path("ctclip", "default"))
    model = build_on_meta(lambda: build_model(cfg, load_weights=False))
    assert not cfg.model.pretrained
    assert model.visual.backbone.num_features == 64 and len(model.visual.backbone.blocks) == 2


@pytest.mark.parametrize("name", RESEARCH)
def test_research_config_without_weights_is_refused_before_anything_is_written(
    name, tmp_path, capsys
):
    out = tmp_path / "run"
    code = cli.train(["--config", name, "--data-dir", str(tmp_path), "--output-dir", str(out)])
    assert code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1
    assert "--pretrained-weights" in lines[0] and "hf-hub:" in lines[0]
    assert ("--from-scratch" in lines[0]) != name.endswith("_frozen")  # frozen needs weights
    assert not out.exists()


def test_from_scratch_and_weights_together_are_refused(tmp_path, capsys):
    argv = ["--config", "ctrate_vitb14", "--from-scratch", "--pretrained-weights", "w.pth"]
    assert cli.train([*argv, "--output-dir", str(tmp_path / "r")]) == 2
    assert "choose one" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def _real_width_step(model_cfg: ModelConfig) -> CTCLIP:
    """Forward + backward of 2 volumes of 2 slices of 28x28 px (2x2 patches) at the real widths."""
    torch.manual_seed(0)
    model = build_model(CTClipConfig(model=model_cfg), load_weights=False)
    volume = torch.randint(0, 256, (2, 2, 28, 28), dtype=torch.uint8)
    tokens = torch.randint(1, 49000, (2, model_cfg.context_length))
    loss, _ = ClipLoss()(*model(volume, tokens))
    loss.backward()
    assert torch.isfinite(loss)
    return model


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


@pytest.mark.parametrize("name", RESEARCH)
def test_one_step_at_the_real_width(name):
    cfg = load_config(
        CTClipConfig, packaged_config_path("ctclip", name), overrides=["model.image_size=28"]
    )
    model = _real_width_step(cfg.model)
    backbone = model.visual.backbone
    assert backbone.num_features == (768 if "vitb" in name else 1024)
    assert model.text.transformer.width == 512 and model.visual.proj.out_features == 512
    grads = [p.grad for p in backbone.parameters()]
    if name.endswith("_frozen"):
        assert all(g is None for g in grads)
    else:
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.text.token_embedding.weight.grad.abs().sum() > 0
    assert _peak_rss_gib() < 4.0


def test_resolved_dataclass_defaults_are_the_vitb14_research_setting():
    assert load_config(CTClipConfig) == load_config(
        CTClipConfig, packaged_config_path("ctclip", "ctrate_vitb14")
    )


@pytest.fixture(autouse=True)
def _no_run_dirs_here(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing may land in runs/ of the source tree
    yield
    assert not Path("runs").exists()
