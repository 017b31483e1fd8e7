"""Every packaged config: it resolves, builds the named architecture, trains a step, dry-runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import timm
import torch

from histommnet.cli import train
from histommnet.config import HistoConfig
from histommnet.data import input_size
from histommnet.model import build_model, dry_run_config, resolve_normalization
from medcore.cli.dry_run import build_on_meta, count_parameters
from medcore.config import load_config, packaged_config_path
from medcore.testing import call_main, error_line

CONFIGS = {"default": "test_efficientnet", "breakhis": "efficientnet_b1"}


def _config(name: str) -> HistoConfig:
    return load_config(HistoConfig, packaged_config_path("histommnet", name))


def _timm_trunk_parameters(name: str) -> int:
    """The timm architecture as the model uses it (no classifier, no pooling), built on meta."""
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    return sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_builds_the_named_backbone(name: str) -> None:
    cfg = _config(name)
    assert cfg.model.backbone == CONFIGS[name]
    model = build_on_meta(lambda: build_model(dry_run_config(cfg)))
    trunks = model.encoder.trunks
    assert len(trunks) == len(cfg.data.magnifications) == 4  # one trunk per magnification
    expected = _timm_trunk_parameters(CONFIGS[name])
    assert [count_parameters(t)["total"] for t in trunks] == [expected] * 4
    if name == "breakhis":  # the research config: pretrained, real sizes, the seed's settings
        assert cfg.model.pretrained and expected > 6_000_000
        assert input_size(cfg.data) == (224, 341)
        assert (cfg.trainer.lr, cfg.trainer.epochs, cfg.trainer.early_stopping_patience) == (
            5e-5,
            25,
            7,
        )
        assert (cfg.loss.focal_alpha, cfg.loss.focal_alpha_class) == (0.7, "minority")
    else:  # the demo preset trains from scratch on CPU
        assert not cfg.model.pretrained


@pytest.mark.parametrize("name", list(CONFIGS))
def test_normalisation_comes_from_the_backbone(name: str) -> None:
    """Not hard-coded ImageNet constants: timm's current efficientnet_b1 tag expects 0.5."""
    cfg = _config(name)
    data = resolve_normalization(cfg.model, cfg.data)
    reference = timm.create_model(CONFIGS[name], pretrained=False).pretrained_cfg
    assert data.mean == pytest.approx(reference["mean"]) and data.std == pytest.approx(
        reference["std"]
    )
    assert data.interpolation == reference["interpolation"] == "bicubic"
    if name == "breakhis":
        assert data.mean == (0.5, 0.5, 0.5)
    explicit = dataclasses.replace(
        cfg.data, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0), interpolation="bilinear"
    )
    assert resolve_normalization(cfg.model, explicit) == explicit  # set in the config: kept


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_training_step_at_real_width(name: str) -> None:
    """The real model (real channel and token widths) on a few pixels: forward and backward.

    One trunk shared by the magnifications (same widths, a quarter of the CPU time); the four
    separate trunks are counted on meta above.
    """
    cfg = _config(name)
    torch.manual_seed(0)
    dry = dry_run_config(cfg)
    model = build_model(
        dataclasses.replace(dry, model=dataclasses.replace(dry.model, shared_backbone=True))
    ).train()
    images = torch.randn(2, 4, 3, 32, 48)  # 1x2 feature maps after EfficientNet's stride 32
    out = model(images)
    assert out["logits"].shape == (2, 2) and out["subtype_logits"].shape == (2, 8)
    assert out["embedding"].shape == (2, cfg.model.embed_dim)
    (out["logits"].sum() + out["subtype_logits"].sum()).backward()
    for trunk in model.encoder.trunks:
        assert trunk.conv_stem.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dry_run_reports_the_real_size(name: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "dry"
    argv = ["--dry-run", "--output-dir", str(out)]
    argv += ["--config", f"{name}.yaml"] if name != "default" else []
    code, stdout, err = call_main(train, argv, capsys)  # no weights, no data needed
    assert code == 0, err
    summary = json.loads((out / "model_summary.json").read_text())
    trunk = _timm_trunk_parameters(CONFIGS[name])
    params = summary["parameters"]
    assert params["encoder"] == 4 * trunk
    assert params["total"] == sum(v for k, v in params.items() if k not in ("total", "trainable"))
    assert params["total"] > params["encoder"] and summary["backbone"] == CONFIGS[name]
    assert (out / "config.yaml").is_file() and "dry run" in stdout
    assert not (out / "splits.json").exists() and not list(out.glob("fold_*"))


def test_research_config_refuses_to_start_without_weights(
    tiny_tree: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    argv = ["--config", "breakhis.yaml", "--data-dir", str(tiny_tree), "--output-dir", str(out)]
    code, _, err = call_main(train, argv, capsys)
    assert code == 2
    line = error_line(err)
    assert "--pretrained-weights" in line and "--from-scratch" in line and "hf-hub:" in line
    assert not out.exists()  # refused before anything was written
    small = [
        "model.backbone=test_efficientnet",
        "data.image_size=32",
        "trainer.num_workers=0",
        "cv.folds=2",
    ]
    sets = [arg for item in small for arg in ("--set", item)]
    code, _, err = call_main(train, [*argv, "--from-scratch", "--smoke", *sets], capsys)
    assert code == 0, err
    assert "test_efficientnet init: random (from scratch)" in err
    saved = load_config(HistoConfig, out / "config.yaml")
    assert not saved.model.pretrained and saved.cv.stratify_subtype  # the research settings
    assert dataclasses.asdict(saved.loss) == dataclasses.asdict(HistoConfig().loss)
