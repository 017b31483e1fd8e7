"""Every packaged config: it resolves on its own, builds the real architecture, trains one step,
dry-runs, and (research configs) refuses to start without the pretrained weights it assumes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torchvision

from ctretrieval.cli import train
from ctretrieval.config import CTRetrievalConfig
from ctretrieval.model import Proximity100x100, build_model
from ctretrieval.train import make_step_fn, model_config
from medcore.cli.dry_run import build_on_meta, count_parameters
from medcore.config import load_config, packaged_config_path
from medcore.errors import ConfigError
from medcore.testing import call_main

CONFIGS = ["default", "microf1", "triplet"]
RESEARCH = ["microf1", "triplet"]


def _resolve(name: str) -> CTRetrievalConfig:
    return load_config(CTRetrievalConfig, packaged_config_path("ctretrieval", name))


def _resnet18_trunk_parameters() -> int:
    """torchvision's ResNet-18 without its classifier, built here on the meta device."""
    with torch.device("meta"):
        ref = torchvision.models.resnet18(weights=None)
    return sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("fc."))


def _scratch(cfg: CTRetrievalConfig) -> CTRetrievalConfig:
    model = dataclasses.replace(model_config(cfg), pretrained=False, pretrained_weights=None)
    return dataclasses.replace(cfg, model=model)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_the_real_trunk_on_meta(name: str) -> None:
    cfg = _resolve(name)
    model = build_on_meta(lambda: build_model(_scratch(cfg)))
    counts = count_parameters(model)
    assert counts["trunk"] == _resnet18_trunk_parameters() == 11_176_512
    assert set(counts) >= {"trunk", "reduce", "fc"} and counts["total"] == counts["trainable"]
    assert model.embedding_size == cfg.model.embedding_size
    assert ("head" in counts) == (cfg.mode == "microf1")


def test_research_configs_stand_alone_on_the_originals_defaults() -> None:
    micro, trip = _resolve("microf1"), _resolve("triplet")
    for cfg in (micro, trip):
        t = cfg.trainer  # nothing of the demo preset (warmup, workers, lr 1e-3) leaks in
        assert (t.optimizer, t.lr, t.weight_decay, t.scheduler, t.step_size, t.gamma) == (
            "adam",
            1e-5,
            1e-4,
            "step",
            50,
            0.1,
        )
        assert t.warmup_steps == 0 and t.num_workers is None and t.epochs == 50
        assert cfg.model.pretrained and cfg.model.pretrained_weights is None
        assert cfg.model.embedding_size == 1024 and cfg.model.dropout == 0.5
        assert cfg.data.train_eval_frac == 0.1 and cfg.preprocess.target_shape == (300, 270, 270)
        assert cfg.loss.f1_average == "micro" and cfg.loss.targets == "binary"
    assert (
        micro.mode == "microf1" and micro.model.num_slices == 300 and micro.trainer.batch_size == 8
    )
    assert (micro.model.name, micro.model.image_size) == ("Proximity100x100", (270, 270))
    assert (trip.mode, trip.model.name, trip.sampler.n_classes, trip.sampler.n_samples) == (
        "triplet",
        "Proximity300x300",
        2,
        3,
    )
    demo = _resolve("default")
    assert not demo.model.pretrained and demo.trainer.optimizer == "adamw"


def test_contradicting_or_unknown_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="Proximity300x300 takes 300 slices"):
        load_config(CTRetrievalConfig, overrides=["model.name=Proximity300x300"])
    with pytest.raises(ConfigError, match=r"loss\.targets"):
        load_config(CTRetrievalConfig, overrides=["loss.targets=soft"])


@pytest.mark.parametrize("name", CONFIGS)
def test_one_training_step_at_the_real_width(name: str) -> None:
    cfg = _resolve(name)
    mcfg = _scratch(cfg).model
    # Real channel and embedding widths and the real slice count (the reduction's input
    # channels); few pixels. Proximity300x300 resizes every input to 300 x 300 x 300, which
    # does not fit this machine (100 ResNet-18 images of 300 x 300 per study), so the triplet
    # config trains its widths on the adaptive model: only the fc input size differs.
    side = min(32, mcfg.image_size[0])
    torch.manual_seed(0)
    model = Proximity100x100(
        mcfg.num_slices,
        (side, side),
        mcfg.embedding_size,
        mcfg.num_classes,
        mcfg.reduce_channels,
        mcfg.fc_hidden,
        mcfg.dropout,
    )
    labels = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0]]).float()
    batch = {
        "volume": torch.randint(0, 256, (4, mcfg.num_slices, side, side), dtype=torch.uint8),
        "labels": labels,
        "label_id": torch.tensor([1, 1, 6, 6]),
    }
    loss, extras = make_step_fn(cfg, augment=None)(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert cfg.mode == "microf1" or extras["triplets"] > 0
    assert (
        torch.isfinite(model.trunk[0].weight.grad).all()
        and model.trunk[0].weight.grad.abs().sum() > 0
    )


@pytest.mark.parametrize("name", [None, *RESEARCH])
def test_dry_run_reports_the_real_size_without_data_or_weights(
    name: str | None, tmp_path: Path, capsys
) -> None:
    argv = ["--dry-run", "--output-dir", str(tmp_path / "r"), "--data-dir", str(tmp_path / "none")]
    code, out, _ = call_main(train, [*argv, *(["--config", name] if name else [])], capsys)
    assert code == 0 and "meta device" in out
    summary = json.loads((tmp_path / "r" / "model_summary.json").read_text())
    cfg = _resolve(name or "default")
    expected = count_parameters(build_on_meta(lambda: build_model(_scratch(cfg))))
    assert summary["parameters"] == expected
    assert summary["parameters"]["trunk"] == _resnet18_trunk_parameters()
    assert (tmp_path / "r" / "config.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if p.name != ".lock") == [
        "config.yaml",
        "model_summary.json",
    ]


@pytest.mark.parametrize("name", RESEARCH)
def test_research_config_refuses_to_start_without_pretrained_weights(
    name: str, tmp_path: Path, capsys
) -> None:
    # The data directory does not exist: the refusal comes before any data is touched.
    argv = [
        "--config",
        name,
        "--data-dir",
        str(tmp_path / "none"),
        "--output-dir",
        str(tmp_path / "r"),
    ]
    code, _, err = call_main(train, argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "--pretrained-weights" in lines[0] and "--from-scratch" in lines[0]
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert not (tmp_path / "r").exists()  # refused by its checks: no run directory
    # --from-scratch passes the check; the next error is the missing data directory.
    argv[-1] = str(tmp_path / "r2")
    code, _, err = call_main(train, [*argv, "--from-scratch"], capsys)
    assert code == 2 and "pretrained" not in err and str(tmp_path / "none") in err
