"""ResNet-18 trunk weights as training frameworks save them (medcore.testing.SAVE_AS): DDP,
torch.compile, Lightning and Fabric files load through ``--pretrained-weights``; a file of
another architecture is one error line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torchvision

from ctretrieval.cli import train
from ctretrieval.config import CTRetrievalConfig, ModelConfig
from ctretrieval.model import build_model, resnet18_trunk
from medcore.testing import call_main, error_line, save_weights_as

TINY = dict(
    num_slices=6, image_size=(32, 32), embedding_size=8, reduce_channels=(8, 8, 4), fc_hidden=8
)
CHILDREN = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
SETS = [
    "model.num_slices=6",
    "model.image_size=[32,32]",
    "model.embedding_size=16",
    "model.reduce_channels=[8,8,4]",
    "model.fc_hidden=16",
    "trainer.num_workers=0",
    "trainer.batch_size=4",
    "eval.ks=[1,3]",
]


def _reference() -> torchvision.models.ResNet:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    for m in net.modules():  # non-default statistics, so that a skipped buffer shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    return net


@pytest.mark.parametrize(
    ("how", "prefix"),
    [
        ("data_parallel", "module."),
        ("compiled_data_parallel", "_orig_mod.module."),
        ("lightning_model", "model."),
        ("fabric", ""),
    ],
)
def test_trunk_takes_every_tensor_of_framework_files(how, prefix, tmp_path: Path) -> None:
    reference = _reference()
    path = save_weights_as(how, reference, tmp_path / "resnet18.ckpt")
    cfg = ModelConfig(**TINY, pretrained_weights=str(path))
    model = build_model(
        CTRetrievalConfig(model=dataclasses.replace(cfg, pretrained_weights=None, pretrained=False))
    )
    report = model.load_trunk_weights(cfg)
    assert report.matched == report.total == len(model.trunk.state_dict())
    assert report.prefix == prefix and not report.missing
    for i, name in enumerate(CHILDREN):
        for key, value in getattr(reference, name).state_dict().items():
            assert torch.equal(model.trunk[i].state_dict()[key], value), (name, key)


def _argv(data: Path, run: Path, weights: Path) -> list[str]:
    argv = ["--config", "microf1", "--data-dir", str(data), "--output-dir", str(run)]
    argv += ["--smoke", "--device", "cpu", "--pretrained-weights", str(weights)]
    return argv + [a for s in SETS for a in ("--set", s)]


def test_ddp_file_trains_and_another_architecture_is_one_error_line(
    small_dataset: Path, tmp_path: Path, capsys
) -> None:
    ddp = save_weights_as("ddp", _reference(), tmp_path / "resnet18_ddp.pth")
    code, out, err = call_main(train, _argv(small_dataset, tmp_path / "r", ddp), capsys)
    assert code == 0, err
    n = len(resnet18_trunk().state_dict())
    assert f"(stripped prefix 'module.'): {n}/{n} tensors matched" in out
    r50 = torchvision.models.resnet50(weights=None)
    resnet50 = save_weights_as("data_parallel", r50, tmp_path / "resnet50.pth")
    r18, r50_state = _reference().state_dict(), r50.state_dict()
    trunk = [k for k in r18 if not k.startswith("fc.")]
    other = sum(1 for k in trunk if r50_state[k].shape != r18[k].shape)  # every name is in both
    code, _, err = call_main(train, _argv(small_dataset, tmp_path / "r50", resnet50), capsys)
    assert code == 2
    line = error_line(err)
    assert line.startswith(
        f"error: {resnet50}: wrong architecture: the file looks like a ResNet-50 (bottleneck "
        "blocks 3-4-6-3); "
    ), line
    assert (
        f"{len(trunk) - other} of the ResNet-18 trunk's {len(trunk)} tensors match, {other} have "
        "another shape (4.0.conv1.weight" in line  # layer1.0.conv1 under the trunk's indices
    )
