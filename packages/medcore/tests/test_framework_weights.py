"""Weights saved by training frameworks load through the one prefix resolution of medcore.weights.pretrained.

Every file here is written the way the framework writes it (:data:`medcore.testing.SAVE_AS`):
``state_dict()`` of a real DataParallel / DistributedDataParallel / ``torch.compile`` wrapper,
Lightning Fabric's own ``fabric.save``, and the dict of Lightning's
``_CheckpointConnector.dump_checkpoint`` (Lightning itself is not a dependency: the layout is
rebuilt from its source, with real optimizer and scheduler states), saved with ``torch.save``
as Lightning's ``_atomic_save`` does.
"""

from __future__ import annotations

import argparse
import enum
import os
import pathlib
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from medcore.cli.command import run_cli
from medcore.errors import CheckpointError
from medcore.testing import (
    LIGHTNING_VERSION,
    SAVE_AS,
    LightningLike,
    lightning_checkpoint,
    save_weights_as,
)
from medcore.weights.checkpoint import save_checkpoint
from medcore.weights.keys import best_prefix, describe, extra_blocks
from medcore.weights.pretrained import load_pretrained, read_state_dict


def _torchvision_resnet18() -> nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    for m in net.modules():  # non-default statistics, so that a skipped buffer shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    return net


def _timm_resnet18() -> nn.Module:
    torch.manual_seed(1)
    net = timm.create_model("resnet18", pretrained=False)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    return net


def _trunk() -> nn.Module:
    """The target: timm's ResNet-18 without a classifier, as the packages build it."""
    return timm.create_model("resnet18", pretrained=False, num_classes=0)


def _medcore_checkpoint(net: nn.Module, path: Path) -> None:
    """A medcore training checkpoint of a task model whose trunk is its ``backbone``."""
    model = nn.ModuleDict({"backbone": net, "head": nn.Linear(2, 2)})
    save_checkpoint({"model": model.state_dict()}, path, kind="demo.Model")


# how the file is written -> (the container entries and the key prefix the load must report)
EXPECTED: dict[str, tuple[tuple[str, ...], str]] = {
    "plain": ((), ""),
    "data_parallel": ((), "module."),
    "ddp": ((), "module."),
    "compile": ((), "_orig_mod."),
    "data_parallel_of_compiled": ((), "module._orig_mod."),
    "compiled_data_parallel": ((), "_orig_mod.module."),
    "lightning_model": (("state_dict",), "model."),
    "lightning_net": (("state_dict",), "net."),
    "lightning_compiled_attribute": (("state_dict",), "encoder._orig_mod."),
    "fabric": (("model",), ""),
    "model_of_data_parallel": (("model",), "module."),
    "state_dict": (("state_dict",), ""),
    "model_state_dict": (("model_state_dict",), ""),
    "net": (("net",), ""),
    "medcore_checkpoint": (("model",), "backbone."),
}


def _save(how: str, net: nn.Module, path: Path) -> Path:
    if how == "medcore_checkpoint":
        _medcore_checkpoint(net, path)
        return path
    return save_weights_as(how, net, path)


def _assert_loaded(target: nn.Module, source: nn.Module) -> None:
    """Every tensor of ``target`` equals the source's tensor of the same name."""
    reference = source.state_dict()
    for key, value in target.state_dict().items():
        assert torch.equal(value, reference[key]), key


@pytest.mark.parametrize("writer", [*SAVE_AS, "medcore_checkpoint"])
def test_torchvision_resnet18_as_every_framework_saves_it(writer, tmp_path, capsys) -> None:
    container, prefix = EXPECTED[writer]
    source = _torchvision_resnet18()
    suffix = ".ckpt" if writer.startswith(("lightning", "fabric")) else ".pth"
    path = _save(writer, source, tmp_path / f"resnet18{suffix}")
    trunk = _trunk()
    report = load_pretrained(trunk, path, what="ResNet-18 trunk")
    assert report.matched == report.total == len(trunk.state_dict())
    assert (report.container, report.prefix, report.unread) == (container, prefix, ())
    assert report.unexpected == ["fc.bias", "fc.weight"] and not report.missing
    _assert_loaded(trunk, source)
    line = capsys.readouterr().out
    assert f"{report.total}/{report.total} tensors matched" in line
    assert (f"stripped prefix {prefix!r}" in line) == bool(prefix)
    # The loss' class weights of a LightningModule are outside the prefix: counted, not loaded.
    if writer.startswith("lightning"):
        assert report.outside == 1 and "1 tensor outside it left out" in line


@pytest.mark.parametrize("writer", ["plain", "data_parallel", "compile", "lightning_model"])
def test_timm_resnet18_into_a_torchvision_resnet18(writer, tmp_path) -> None:
    source = _timm_resnet18()
    save_weights_as(writer, source, tmp_path / "w.pth")
    prefix = EXPECTED[writer][1]
    target = torchvision.models.resnet18(weights=None)
    report = load_pretrained(target, tmp_path / "w.pth", what="model")
    assert report.matched == report.total == len(target.state_dict()) and not report.unexpected
    assert report.prefix == prefix
    _assert_loaded(target, source)


def test_lightning_directory_and_weights_only(tmp_path) -> None:
    """A Lightning run's checkpoints folder holding one .ckpt; the file needs no unsafe global."""
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    source = _torchvision_resnet18()
    path = folder / "epoch=2-step=120.ckpt"
    save_weights_as("lightning_model", source, path)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # torch's safe loader accepts it
    assert raw["pytorch-lightning_version"] == LIGHTNING_VERSION
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    weights = read_state_dict(folder)
    assert weights.container == ("state_dict",) and weights.unread == ()
    assert weights.metadata["hparams_name"] == "kwargs"
    trunk = _trunk()
    assert load_pretrained(trunk, folder).prefix == "model."
    _assert_loaded(trunk, source)


class _Stage(enum.Enum):
    FIT = "fit"


class _Config(dict):
    """A dict subclass, as an AttributeDict of hyper-parameters is."""


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def test_hyper_parameters_torch_will_not_rebuild_are_placeholders(tmp_path, capsys) -> None:
    """Namespace, Path, enum values in ``hyper_parameters`` (save_hyperparameters of CLI args)
    are read as inert placeholders; the weights load, and the line names what was not read."""
    source = _torchvision_resnet18()
    hparams = {
        "args": argparse.Namespace(lr=0.1, data=pathlib.PurePosixPath("/data/cxr")),
        "root": pathlib.PosixPath("/runs"),
        "stage": _Stage.FIT,
    }
    path = tmp_path / "last.ckpt"
    torch.save(lightning_checkpoint(LightningLike(source), hparams), path)
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(path, weights_only=True)  # what the plain safe loader does with it
    trunk = _trunk()
    report = load_pretrained(trunk, path)
    classes = sorted(
        ["argparse.Namespace", "pathlib.PosixPath", "pathlib.PurePosixPath", _qualified(_Stage)]
    )
    assert report.unread == tuple(classes)
    _assert_loaded(trunk, source)
    assert f"not read: {', '.join(classes[:3])}, ... 1 more (objects torch cannot load" in (
        capsys.readouterr().out
    )
    # A dict subclass with items cannot be stood in for: refused, with the classes named.
    torch.save(lightning_checkpoint(LightningLike(source), {"cfg": _Config(lr=0.1)}), path)
    refused = (
        rf"refused: contains pickled objects that could run code on load \({_qualified(_Config)};"
    )
    with pytest.raises(CheckpointError, match=refused):
        load_pretrained(_trunk(), path)


class _RunsCode:
    def __init__(self, call: Callable, arg: str) -> None:
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


def test_code_in_a_checkpoint_never_runs(tmp_path) -> None:
    marker = tmp_path / "ran"
    state = {"state_dict": _torchvision_resnet18().state_dict()}
    # eval(...) is stood in for (the file still loads, the expression is never evaluated) ...
    state["hyper_parameters"] = {"x": _RunsCode(eval, f"open({str(marker)!r}, 'w')")}
    torch.save(state, tmp_path / "eval.ckpt")
    report = load_pretrained(_trunk(), tmp_path / "eval.ckpt")
    assert report.unread == ("builtins.eval",) and not marker.exists()
    # ... and os.system is refused outright by torch's loader (its module is blocked).
    state["hyper_parameters"] = {"x": _RunsCode(os.system, f"touch {marker}")}
    torch.save(state, tmp_path / "system.ckpt")
    refused = rf"could run code on load \({os.system.__module__}\.system; .* is blocked"
    with pytest.raises(CheckpointError, match=refused):
        load_pretrained(_trunk(), tmp_path / "system.ckpt")
    assert not marker.exists()
    # A whole pickled model is not a state dict.
    torch.save(_torchvision_resnet18(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"not a dict of weights: save model\.state_dict"):
        load_pretrained(_trunk(), tmp_path / "model.pt")


def _mismatches(file: dict, target: dict) -> tuple[int, int, int]:
    """(matched, other shape, missing) of ``target``'s weights, counted directly."""
    keys = [k for k in target if not k.endswith("num_batches_tracked")]
    matched = sum(1 for k in keys if k in file and file[k].shape == target[k].shape)
    other = sum(1 for k in keys if k in file and file[k].shape != target[k].shape)
    return matched, other, len(keys) - matched - other


def test_another_architecture_is_refused_with_what_it_looks_like(tmp_path, capsys) -> None:
    trunk = _trunk()
    target = trunk.state_dict()
    before = {k: v.clone() for k, v in target.items()}

    r50 = torchvision.models.resnet50(weights=None).state_dict()
    torch.save({f"module.{k}": v for k, v in r50.items()}, tmp_path / "resnet50.pth")
    matched, other, _ = _mismatches(r50, target)
    matched += sum(1 for k in target if k.endswith("num_batches_tracked"))  # present in both
    with pytest.raises(CheckpointError) as e:
        load_pretrained(trunk, tmp_path / "resnet50.pth", what="ResNet-18 trunk")
    why = e.value.why
    assert why.startswith(
        "wrong architecture: the file looks like a ResNet-50 (bottleneck blocks 3-4-6-3); "
        f"{matched} of the ResNet-18 trunk's {len(target)} tensors match, {other} have another "
        "shape (layer1.0.conv1.weight, "
    ), why
    assert "layer1.0.conv1.weight: file (64, 64, 1, 1), ResNet-18 trunk (64, 64, 3, 3)" in why

    # A ResNet-34 has every ResNet-18 tensor, with the same shapes, and more blocks.
    r34 = torchvision.models.resnet34(weights=None).state_dict()
    torch.save(r34, tmp_path / "resnet34.pth")
    deeper = sorted(k for k in r34 if k not in target and not k.startswith("fc."))
    with pytest.raises(
        CheckpointError,
        match=rf"looks like a ResNet-34 \(basic blocks 3-4-6-3\); {len(target)} of the backbone's "
        rf"{len(target)} tensors match, the file has {len(deeper)} tensors of blocks it lacks "
        r"\(layer1\.2\.bn1\.bias",
    ):
        load_pretrained(trunk, tmp_path / "resnet34.pth")

    vit = timm.create_model(
        "vit_small_patch16_224", pretrained=False, depth=2, img_size=32, num_classes=0
    )
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in vit.state_dict().items()}},
        tmp_path / "vit.ckpt",
    )
    n = sum(1 for k in target if not k.endswith("num_batches_tracked"))
    with pytest.raises(
        CheckpointError,
        match=rf"looks like a ViT \(depth 2, width 384\); 0 of the backbone's {n} tensors match, "
        rf"{n} are missing",
    ):
        load_pretrained(trunk, tmp_path / "vit.ckpt")
    # Nothing was loaded, and a command says it in one line with exit code 2.
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, before[key]), key
    for name in ("resnet50.pth", "resnet34.pth", "vit.ckpt"):
        assert run_cli(lambda name=name: load_pretrained(trunk, tmp_path / name)) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith(f"error: {tmp_path / name}: wrong architecture: ")
            and err.count("\n") == 1
        )


CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def _trunk_indices(state: dict) -> dict:
    """torchvision names -> the indices of a Sequential of ResNet children (a package layout)."""
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in CHILDREN:
            out[f"{CHILDREN.index(head)}.{rest}"] = value
    return out


def test_prefix_is_found_through_a_package_conversion(tmp_path) -> None:
    """The prefix is matched after the package's conversion: a Sequential-of-children trunk
    (keys ``0.weight``, ``4.0.conv1.weight``) takes DDP, compiled and Lightning files."""
    source = _torchvision_resnet18()
    for writer in ("data_parallel", "compiled_data_parallel", "lightning_model"):
        path = tmp_path / f"{writer}.pth"
        save_weights_as(writer, source, path)
        state = read_state_dict(path).tensors
        net = torchvision.models.resnet18(weights=None)
        trunk = nn.Sequential(*(getattr(net, name) for name in CHILDREN))
        target = trunk.state_dict()
        assert best_prefix(state, target, _trunk_indices) == EXPECTED[writer][1]
        with pytest.raises(CheckpointError, match="wrong architecture"):
            load_pretrained(trunk, path)  # without the conversion nothing matches
        report = load_pretrained(trunk, path, _trunk_indices)
        assert report.matched == report.total == len(target)
        for i, name in enumerate(CHILDREN):
            for key, value in getattr(source, name).state_dict().items():
                assert torch.equal(trunk[i].state_dict()[key], value), (writer, name, key)


def test_describe_and_extra_blocks() -> None:
    with torch.device("meta"):
        nets = {
            "resnet101": torchvision.models.resnet101(),
            "resnet10t": timm.create_model("resnet10t"),
            "convnext_tiny": timm.create_model("convnext_tiny"),
        }
    states = {k: v.state_dict() for k, v in nets.items()}
    assert describe(states["resnet101"]) == "a ResNet-101 (bottleneck blocks 3-4-23-3)"
    assert describe(states["resnet10t"]) == "a ResNet (basic blocks 1-1-1-1)"
    assert describe(states["convnext_tiny"]) == "a ConvNeXt (blocks 3-3-9-3)"
    assert describe({"a": torch.zeros(1), "b.c": torch.zeros(1)}) == "2 tensors (a, b.c)"
    target = {"blocks.0.attn.qkv.weight": torch.zeros(1), "head.weight": torch.zeros(1)}
    assert extra_blocks(["blocks.3.attn.qkv.weight", "fc.weight", "head.bias"], target) == [
        "blocks.3.attn.qkv.weight"
    ]
