"""ResNet-18 trunk weights as training frameworks save them (medcore.testing.SAVE_AS): DDP,
torch.compile and Lightning files load into every magnification's trunk through
``--pretrained-weights``; a ViT file is one error line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from histommnet.cli import train
from histommnet.config import ModelConfig
from histommnet.model import build_model
from medcore.testing import call_main, error_line, save_weights_as

MAGS = ["40X", "100X", "200X", "400X"]


def _reference() -> torch.nn.Module:
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
        ("lightning_compiled_attribute", "encoder._orig_mod."),
        ("state_dict", ""),
    ],
)
def test_every_trunk_takes_every_tensor_of_framework_files(
    how, prefix, tiny_model_cfg: ModelConfig, histo_config, tmp_path: Path, capsys
) -> None:
    reference = _reference()
    path = save_weights_as(how, reference, tmp_path / "resnet18.ckpt")
    cfg = dataclasses.replace(tiny_model_cfg, backbone="resnet18", pretrained_weights=str(path))
    model = build_model(histo_config(cfg, MAGS))
    expected = reference.state_dict()
    for trunk in model.encoder.trunks:
        for key, value in trunk.state_dict().items():
            assert torch.equal(value, expected[key]), key
    n = len(model.encoder.trunks[0].state_dict())
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("loaded"))
    assert f"{n}/{n} tensors matched, 0 new, 0 missing" in line
    assert (f"stripped prefix {prefix!r}" in line) == bool(prefix)


def test_ddp_file_trains_and_a_vit_file_is_one_error_line(
    tiny_args, tiny_tree: Path, tmp_path: Path, capsys
) -> None:
    ddp = save_weights_as("ddp", _reference(), tmp_path / "resnet18_ddp.pth")
    argv = ["--data-dir", str(tiny_tree), "--fold", "0", *tiny_args("model.backbone=resnet18")]
    code, out, err = call_main(
        train,
        [*argv, "--output-dir", str(tmp_path / "r"), "--pretrained-weights", str(ddp)],
        capsys,
    )
    assert code == 0, err
    n = len(timm.create_model("resnet18", num_classes=0, global_pool="").state_dict())
    assert f"(stripped prefix 'module.'): {n}/{n} tensors matched" in out

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=0)
    path = save_weights_as("lightning_model", vit, tmp_path / "vit.ckpt")
    code, _, err = call_main(
        train,
        [*argv, "--output-dir", str(tmp_path / "v"), "--pretrained-weights", str(path)],
        capsys,
    )
    assert code == 2
    line = error_line(err)
    weights = sum(1 for k in timm.create_model("resnet18").state_dict() if "num_batches" not in k)
    assert line.startswith(
        f"error: {path}: wrong architecture: the file looks like a ViT (depth 2, width 192); "
        f"0 of the resnet18 (copied into 4 trunks)'s {weights - 2} tensors match"
    ), line
