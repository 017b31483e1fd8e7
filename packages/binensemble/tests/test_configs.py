"""Every packaged config: resolves on its own, builds the named architectures, trains a step."""

from __future__ import annotations

import dataclasses
import json
from importlib.resources import files
from pathlib import Path

import pytest
import timm
import torch

from binensemble.cli import train
from binensemble.config import BinEnsembleConfig
from binensemble.model import build_model
from binensemble.train import make_step_fn
from medcore.cli.dry_run import build_on_meta, count_parameters
from medcore.config import load_config, packaged_config_path
from medcore.testing import call_main

CONFIGS = sorted(p.stem for p in files("binensemble").joinpath("configs").iterdir())


def _resolve(name: str) -> BinEnsembleConfig:
    """As ``--config NAME`` resolves it: the file alone on the dataclass defaults."""
    return load_config(BinEnsembleConfig, packaged_config_path("binensemble", name))


def _timm_branches(cfg: BinEnsembleConfig, img_size: int | None = None) -> tuple:
    """The two branches built by timm itself on the meta device (no classifier)."""
    m = cfg.model
    with torch.device("meta"):
        cnn = timm.create_model(m.convnext_name, pretrained=False, num_classes=0)
        vit = timm.create_model(
            m.vit_name, pretrained=False, num_classes=0, img_size=img_size or cfg.data.img_size
        )
    return cnn, vit


def _timm_counts(cfg: BinEnsembleConfig) -> tuple[int, int]:
    cnn, vit = _timm_branches(cfg)
    return count_parameters(cnn)["total"], count_parameters(vit)["total"]


def _size(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def test_the_packaged_configs_are_the_demo_and_the_research_one() -> None:
    assert CONFIGS == ["default", "full"]


def test_full_stands_alone_on_the_research_defaults() -> None:
    cfg = _resolve("full")
    assert cfg == BinEnsembleConfig()  # full.yaml only names the defaults
    # Nothing of the demo preset leaks in: hue jitter, no warmup, clipping, the real sizes.
    assert cfg.data.color_jitter == [0.2, 0.2, 0.1, 0.02] and cfg.trainer.warmup_ratio == 0.0
    assert (cfg.data.img_size, cfg.trainer.batch_size, cfg.trainer.epochs) == (448, 24, 25)
    assert (cfg.optim.backbone_lr, cfg.optim.head_lr, cfg.loss.margin) == (5e-6, 1e-3, 0.5)
    assert cfg.model.pretrained and cfg.model.grad_checkpointing
    assert cfg.trainer.grad_clip == 1.0 and cfg.trainer.num_workers == 8
    demo = _resolve("default")
    assert not demo.model.pretrained and demo.trainer.grad_clip is None


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_the_named_architectures_on_meta(name: str) -> None:
    cfg = _resolve(name)
    model = build_on_meta(lambda: build_model(cfg, load_weights=False))
    cnn, vit = _timm_counts(cfg)
    assert count_parameters(model.backbone.convnext)["total"] == cnn
    assert count_parameters(model.backbone.vit)["total"] == vit
    if name == "full":
        assert cfg.model.convnext_name == "convnext_large" and cnn == 196_230_336
        # ViT-L/16 at 448: 24 blocks of width 1024, 28 x 28 patches + the class token.
        v = model.backbone.vit
        assert (len(v.blocks), v.embed_dim, v.patch_embed.patch_size) == (24, 1024, (16, 16))
        assert tuple(v.pos_embed.shape) == (1, 785, 1024)
        assert model.backbone.num_features == 1536 + 1024


@pytest.mark.parametrize("name", CONFIGS)
def test_dry_run_writes_the_real_size(name: str, tmp_path: Path, capsys) -> None:
    run = tmp_path / "dry"
    code, out, err = call_main(
        train, ["--config", name, "--dry-run", "--output-dir", str(run)], capsys
    )
    assert code == 0, err  # full needs no weights for a dry run
    summary = json.loads((run / "model_summary.json").read_text())
    cfg = _resolve(name)
    cnn_model, vit_model = _timm_branches(cfg)
    cnn, vit = _size(cnn_model), _size(vit_model)
    feats, h, e = cnn_model.num_features + vit_model.num_features, cfg.model.hidden_dim, 128
    assert cfg.model.embed_dim == e
    head = feats * h + h + 2 * h + h * e + e  # Linear, BatchNorm1d (weight, bias), Linear
    params = summary["parameters"]
    assert params["backbone"] == cnn + vit and params["head"] == head
    assert params["total"] == cnn + vit + head
    assert summary["branches"] == {cfg.model.convnext_name: cnn, cfg.model.vit_name: vit}
    assert summary["baseline_parameters"]["head"] == feats * h + 3 * h + h * 2 + 2
    assert (run / "config.yaml").is_file() and "dry run" in out
    assert not (run / "checkpoints").exists()


def test_full_refuses_to_start_without_weights(tmp_path: Path, capsys) -> None:
    run = tmp_path / "full"
    code, _, err = call_main(train, ["--config", "full", "--output-dir", str(run)], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1
    assert "--pretrained-weights" in lines[0] and "--from-scratch" in lines[0]
    assert not run.exists()  # refused before the run directory was made


@pytest.mark.parametrize("name", CONFIGS)
def test_one_training_step_at_the_real_width(name: str) -> None:
    """The config's backbones at their real widths, frozen and checkpointed as configured.

    For ``full`` (ConvNeXt-L + ViT-L/16) a fp32 AdamW step of the ~500 M parameters needs about
    8 GB; this is forward and backward only (2 GB of weights + 1.2 GB of gradients for the
    ~294 M trainable ones) on 4 images of 32 px (the ViT built for 32 px: 2 x 2 patches), which
    is what a test on a laptop can afford.
    """
    cfg = _resolve(name)
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, drop_path_rate=0.0),
        data=dataclasses.replace(cfg.data, img_size=32),
    )
    model = build_on_meta(lambda: build_model(cfg, load_weights=False))
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # quicker than timm's init; any finite values will do
            p.normal_(0.0, 0.02, generator=gen)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.reset_running_stats()
    model.backbone.set_normalisation(model.backbone.normalisation())  # buffers after to_empty
    model.train()
    # step_fn crops 32 px from the store's uint8 working-size images, as in training.
    size = round(32 * cfg.data.resize_scale)
    pixels = torch.randint(0, 256, (4, 3, size, size), generator=gen, dtype=torch.uint8)
    loss, _ = make_step_fn(cfg)(model, {"image": pixels, "label": torch.tensor([0, 0, 1, 1])})
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    cnn, vit = _timm_branches(cfg, img_size=32)
    if name == "full":
        # The last 2 ConvNeXt stages + final norm, the last 8 ViT blocks + final norm.
        assert (cfg.model.train_convnext_stages, cfg.model.train_vit_blocks) == (2, 8)
        expected = _size(*cnn.stages[-2:], cnn.head, *vit.blocks[-8:], vit.norm, model.head)
    else:  # the demo trains everything
        expected = _size(cnn, vit, model.head)
    assert sum(p.numel() for p in trainable) == expected
    # Checkpointed blocks behind frozen ones still get their gradients.
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def _saved_activation_bytes(cfg: BinEnsembleConfig, checkpointing: bool) -> int:
    """Bytes autograd keeps for the backward pass of one image, counted on the meta device."""
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, grad_checkpointing=checkpointing),
        data=dataclasses.replace(cfg.data, img_size=224),
    )
    model = build_on_meta(lambda: build_model(cfg, load_weights=False)).train()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t)] = t.numel() * t.element_size()
        return t

    with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.empty(2, 3, 224, 224))
    return sum(saved.values())


def test_activation_checkpointing_cuts_the_saved_activations_of_full() -> None:
    """The switch reaches both timm backbones: a step keeps a fraction of the activations.

    At 448 px and batch 24 (bf16) the count is about 22 GiB without checkpointing and 2.3 GiB
    with it (README); 224 px and 2 images keep this test quick.
    """
    cfg = _resolve("full")
    without, with_ = (_saved_activation_bytes(cfg, flag) for flag in (False, True))
    assert with_ * 5 < without
