"""Pretrained trunk weights the way users have them (medcore.weights.pretrained), the normalisation they
bring, and a two-rank CPU run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from ctretrieval.cli import train
from ctretrieval.config import CTRetrievalConfig, ModelConfig
from ctretrieval.model import build_model, with_weights_normalisation
from ctretrieval.predict import load_model
from medcore.testing import call_main, hub_snapshot
from medcore.weights.normalization import IMAGENET_MEAN

REV = "0123456789abcdef0123456789abcdef01234567"
TINY = dict(
    num_slices=6, image_size=(32, 32), embedding_size=8, reduce_channels=(8, 8, 4), fc_hidden=8
)


def _reference() -> torchvision.models.ResNet:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None)


def _fake_timm_hub(home: Path, reference: torch.nn.Module, mean: list[float]) -> Path:
    """``models--timm--resnet18.a1_in1k`` in the hub cache layout (blobs, snapshot links, refs)."""
    tmp = home / "w.safetensors"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp))
    pretrained_cfg = {
        "input_size": [3, 224, 224],
        "interpolation": "bicubic",
        "crop_pct": 0.95,
        "mean": mean,
        "std": [0.5, 0.5, 0.5],
    }
    config = {"architecture": "resnet18", "pretrained_cfg": pretrained_cfg}
    files = {"model.safetensors": tmp.read_bytes(), "config.json": json.dumps(config).encode()}
    return hub_snapshot(home, "timm/resnet18.a1_in1k", files, REV)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_timm_hub(home, _reference(), [0.4, 0.45, 0.5])
    return home


def test_torchvision_state_dict_loads_every_trunk_tensor(tmp_path: Path, capsys) -> None:
    ref = _reference()
    torch.save(ref.state_dict(), tmp_path / "resnet18.pth")
    cfg = ModelConfig(**TINY, pretrained_weights=str(tmp_path / "resnet18.pth"))
    model = build_model(
        CTRetrievalConfig(model=dataclasses.replace(cfg, pretrained_weights=None, pretrained=False))
    )
    report = model.load_trunk_weights(cfg)
    assert report.matched == report.total == len(model.trunk.state_dict())
    assert not report.missing and report.unexpected == ["fc.bias", "fc.weight"]
    for i, name in enumerate(
        ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    ):
        for key, value in getattr(ref, name).state_dict().items():
            torch.testing.assert_close(model.trunk[i].state_dict()[key], value)
    assert f"{report.total}/{report.total} tensors matched" in capsys.readouterr().out
    # No config beside a bare torchvision file: ImageNet's statistics, said out loud.
    assert with_weights_normalisation(cfg).mean == IMAGENET_MEAN
    assert "ImageNet mean/std" in capsys.readouterr().out


def test_hub_weights_bring_their_normalisation_into_the_checkpoint(
    hub: Path, tmp_path: Path, small_dataset: Path, capsys
) -> None:
    argv = [
        "--config",
        "microf1",
        "--data-dir",
        str(small_dataset),
        "--output-dir",
        str(tmp_path / "r"),
        "--smoke",
        "--device",
        "cpu",
        "--pretrained-weights",
        "hf-hub:timm/resnet18.a1_in1k",
    ]
    sets = [
        "model.num_slices=6",
        "model.image_size=[32,32]",
        "model.embedding_size=16",
        "model.reduce_channels=[8,8,4]",
        "model.fc_hidden=16",
        "trainer.num_workers=0",
        "trainer.batch_size=4",
        "eval.ks=[1,3]",
    ]
    code, out, err = call_main(train, [*argv, *[a for s in sets for a in ("--set", s)]], capsys)
    assert code == 0, err
    assert "from hf-hub:timm/resnet18.a1_in1k" in out and "init: ResNet-18 trunk pretrained" in out
    state = torch.load(tmp_path / "r" / "checkpoints" / "final.pt", weights_only=True)
    assert state["model_config"]["mean"] == pytest.approx([0.4, 0.45, 0.5])
    assert state["model_config"]["std"] == pytest.approx([0.5, 0.5, 0.5])
    model, _ = load_model(tmp_path / "r" / "checkpoints" / "final.pt", torch.device("cpu"))
    torch.testing.assert_close(model.mean.flatten(), torch.tensor([0.4, 0.45, 0.5]))


def test_two_cpu_ranks_record_world_size_two(
    small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "r"
    sets = [
        "model.num_slices=6",
        "model.image_size=[32,32]",
        "model.embedding_size=16",
        "model.reduce_channels=[8,8,4]",
        "model.fc_hidden=16",
        "trainer.num_workers=0",
        "trainer.batch_size=4",
        "eval.ks=[1,3]",
        "num_threads=1",
    ]
    argv = [
        "--smoke",
        "--devices",
        "2",
        "--device",
        "cpu",
        "--data-dir",
        str(small_dataset),
        "--output-dir",
        str(run),
        *[a for s in sets for a in ("--set", s)],
    ]
    assert train(argv) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    assert start["world_size"] == 2
    assert json.loads((run / "metrics.json").read_text())["n_test"] > 0
