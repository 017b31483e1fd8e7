"""Every packaged config: resolves, stands alone, builds the real ResNet-18 trunk, trains a step,
dry-runs; the paper config refuses to start without pretrained weights."""

import json
from dataclasses import replace

import pytest
import timm
import torch
import torchvision

from cxrlandmarks.cli import train
from cxrlandmarks.config import CxrConfig
from cxrlandmarks.losses import build_loss
from cxrlandmarks.model import build_model
from cxrlandmarks.train import build_phase_model, check_pretrained
from medcore.cli.dry_run import build_on_meta, count_parameters
from medcore.config import load_config, packaged_config_path, to_dict
from medcore.errors import UserError
from medcore.testing import call_main

CONFIGS = ["default", "paper"]


def reference_trunk_parameters() -> dict[str, int]:
    """ResNet-18 without its classifier, built independently on meta by torchvision and timm."""
    with torch.device("meta"):
        tv = torchvision.models.resnet18(weights=None)
        tm = timm.create_model("resnet18", pretrained=False, num_classes=0)
    tv_count = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    return {"torchvision": tv_count, "timm": sum(p.numel() for p in tm.parameters())}


def packaged(name: str) -> CxrConfig:
    return load_config(CxrConfig, packaged_config_path("cxrlandmarks", name))


def test_paper_config_is_the_dataclass_defaults():
    """A research config stands alone on the defaults, which are the spec's values."""
    cfg = packaged("paper")
    assert to_dict(cfg) == to_dict(CxrConfig())
    assert cfg.model.pretrained and cfg.data.image_size == 224 and not cfg.data.cache_images
    p = cfg.phases
    assert (p.phase1.epochs, p.phase2.epochs, p.phase3.epochs, p.phase4.epochs) == (15, 55, 50, 40)
    assert p.phase1.freeze_trunk and (p.phase2.trunk_lr, p.phase2.head_lr) == (2e-5, 2e-4)
    assert (p.phase2.batch_size, p.phase2.weight_decay) == (8, 5e-5)
    assert [getattr(p, f"phase{i}").loss for i in range(1, 5)] == [
        "wing", "wing", "symmetry", "complete"
    ]  # fmt: skip
    assert cfg.loss.symmetry_reference == "prior"
    assert (cfg.augment.hflip_p, cfg.augment.rotation_deg) == (0.7, 15.0)


def test_demo_preset_is_complete_and_scratch():
    cfg = packaged("default")
    assert not cfg.model.pretrained and cfg.data.image_size == 64 and cfg.data.cache_images


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_the_real_resnet18_trunk_on_meta(name):
    cfg = packaged(name)
    model = build_on_meta(lambda: build_model(cfg))
    counts = count_parameters(model)
    ref = reference_trunk_parameters()
    assert counts["backbone"] == ref["torchvision"] == ref["timm"] == 11_176_512
    # The spec's head: 512*512+512 + 512*256+256 + 256*30+30.
    assert counts["head"] == 401_694
    assert counts["total"] == counts["backbone"] + counts["head"]


@pytest.mark.parametrize("name", CONFIGS)
def test_one_training_step_at_the_real_width(name):
    """Real channels (3 in, 512 features, 30 out), a tiny image: forward + backward + step."""
    torch.manual_seed(0)
    cfg = packaged(name)
    model = build_model(cfg).train()
    phase = cfg.phases.phase4
    criterion = build_loss(phase.loss, cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=phase.head_lr)
    before = model.head[7].weight.detach().clone()
    loss, terms = criterion(model(torch.randn(2, 3, 32, 32)), torch.rand(2, 30))
    assert set(terms) == {"wing", "symmetry", "distance"}
    loss.backward()
    assert model.embed(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, model.head[7].weight)


@pytest.mark.parametrize("name", CONFIGS)
def test_dry_run_reports_the_real_size_without_data_or_weights(name, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = call_main(
        train, ["--config", name, "--dry-run", "--output-dir", str(out)], capsys
    )
    assert code == 0, err
    summary = json.loads((out / "model_summary.json").read_text())
    assert summary["parameters"]["backbone"] == reference_trunk_parameters()["timm"]
    assert summary["parameters"]["total"] == 11_578_206
    assert (out / "config.yaml").is_file() and "backbone" in stdout
    assert not (out / "checkpoints").exists()


def test_paper_refuses_without_pretrained_weights_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    data = tmp_path / "data"
    data.mkdir()
    code, _, err = call_main(
        train, ["--config", "paper", "--data-dir", str(data), "--output-dir", str(out)], capsys
    )
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: model.pretrained:")
    assert "--pretrained-weights FILE|DIR|hf-hub:ORG/NAME" in line and "--from-scratch" in line
    assert not out.exists()
    # --data-dir alone means the paper config too.
    code, _, err = call_main(train, ["--data-dir", str(data), "--output-dir", str(out)], capsys)
    assert code == 2 and "error: model.pretrained:" in err and not out.exists()


def test_pretrained_check_rules():
    cfg = CxrConfig()
    with pytest.raises(UserError, match="--from-scratch"):
        check_pretrained(cfg, from_scratch=False, needs_trunk=True)
    check_pretrained(cfg, from_scratch=False, needs_trunk=False)  # starts from a checkpoint
    scratch = replace(cfg, model=replace(cfg.model, pretrained=False))
    check_pretrained(scratch, from_scratch=True, needs_trunk=True)
    both = replace(cfg, model=replace(cfg.model, pretrained=False, pretrained_weights="w.pth"))
    with pytest.raises(UserError, match="contradicts --pretrained-weights"):
        check_pretrained(both, from_scratch=True, needs_trunk=True)


def test_init_line_tells_where_the_weights_came_from(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    cfg = CxrConfig()
    with_weights = replace(cfg, model=replace(cfg.model, pretrained_weights=str(path)))
    model, init = build_phase_model(with_weights, cfg.phases.phase1, None)
    n = len(reference.state_dict()) - 2  # all but fc.weight and fc.bias
    assert init.startswith(f"pretrained trunk from {path} ({n}/{n} tensors; 2 unexpected)")
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    scratch = replace(cfg, model=replace(cfg.model, pretrained=False))
    assert build_phase_model(scratch, cfg.phases.phase1, None)[1].startswith("scratch")
