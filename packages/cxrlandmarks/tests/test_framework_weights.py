"""ResNet-18 trunk weights as training frameworks save them (medcore.testing.SAVE_AS): DDP,
torch.compile, Lightning and Fabric files load through ``--pretrained-weights``; a deeper
ResNet (whose file holds every ResNet-18 tensor) is one error line, not a silent load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18, resnet34

from cxrlandmarks.cli import train
from cxrlandmarks.model import ResNetLandmarkRegressor
from medcore.testing import call_main, error_line, save_weights_as
from medcore.weights.checkpoint import load_checkpoint

TINY = ["--smoke", "--set", "data.image_size=32", "--device", "cpu", "--config", "default"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo data, generated once for this module's runs."""
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def _reference() -> torch.nn.Module:
    torch.manual_seed(0)
    net = resnet18(weights=None)
    for m in net.modules():  # non-default statistics, so that a skipped buffer shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    return net


@pytest.mark.parametrize(
    ("how", "prefix"),
    [
        ("ddp", "module."),
        ("compile", "_orig_mod."),
        ("data_parallel_of_compiled", "module._orig_mod."),
        ("lightning_net", "net."),
        ("fabric", ""),
        ("model_state_dict", ""),
    ],
)
def test_trunk_takes_every_tensor_of_framework_files(how, prefix, tmp_path: Path) -> None:
    reference = _reference()
    path = save_weights_as(how, reference, tmp_path / "resnet18.ckpt")
    model = ResNetLandmarkRegressor()
    report = model.load_pretrained_trunk(path)
    assert report.matched == report.total == len(model.backbone.state_dict())
    assert report.prefix == prefix and not report.missing
    expected = reference.state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_lightning_checkpoint_trains_and_a_deeper_resnet_is_one_error_line(
    tmp_path: Path, capsys
) -> None:
    reference = _reference()
    ckpt = save_weights_as("lightning_model", reference, tmp_path / "epoch=2-step=120.ckpt")
    run = tmp_path / "run"
    argv = [*TINY, "--phase", "1", "--output-dir", str(run), "--pretrained-weights", str(ckpt)]
    code, out, err = call_main(train, argv, capsys)
    assert code == 0, err
    n = len(reference.state_dict()) - 2  # every tensor but the classifier's
    assert (
        f"(from entry 'state_dict', stripped prefix 'model.', 1 tensor outside it left out): "
        f"{n}/{n} tensors matched" in out
    )
    # Phase 1 freezes the trunk: it is the Lightning file's, tensor for tensor.
    state = load_checkpoint(run / "checkpoints" / "phase1_best.pt")
    assert torch.equal(state["model"]["backbone.conv1.weight"], reference.conv1.weight)
    assert torch.equal(
        state["model"]["backbone.layer4.1.bn2.weight"], reference.layer4[1].bn2.weight
    )

    deeper = resnet34(weights=None).state_dict()
    torch.save(deeper, tmp_path / "resnet34.pth")
    extra = [k for k in deeper if k not in reference.state_dict()]
    argv = [*TINY, "--phase", "1", "--output-dir", str(tmp_path / "r34")]
    code, _, err = call_main(
        train, [*argv, "--pretrained-weights", str(tmp_path / "resnet34.pth")], capsys
    )
    assert code == 2
    line = error_line(err)
    assert line.startswith(
        f"error: {tmp_path / 'resnet34.pth'}: wrong architecture: the file looks like a ResNet-34 "
        f"(basic blocks 3-4-6-3); {n} of the ResNet-18 trunk's {n} tensors match, the file has "
        f"{len(extra)} tensors of blocks it lacks (layer1.2."
    ), line
