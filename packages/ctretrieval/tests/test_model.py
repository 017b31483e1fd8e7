from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from ctretrieval.config import CTRetrievalConfig, ModelConfig
from ctretrieval.model import (
    KIND,
    KINDS,
    MODELS,
    Proximity100x100,
    Proximity300x300,
    build_model,
    model_kind,
    stored_config,
)
from medcore.config import to_dict
from medcore.errors import UserError


def _out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _expected_flat(n_slices: int, hw: int, channels=(8, 8, 4)) -> int:
    """Arithmetic: ResNet-18 (/2 conv, /2 pool, three /2 stages), then the reduction convs."""
    h = _out(_out(hw, 7, 2, 3), 3, 2, 1)
    for _ in range(3):
        h = _out(h, 3, 2, 1)
    f = _out(_out(_out(512, 3, 3, 0), 3, 3, 0), 3, 3, 0)
    h = _out(h, 2, 2, 1)  # the first two reduction convs keep the size (3x3, padding 1)
    return channels[2] * f * h * h


def tiny(num_classes: int = 4, **kw) -> Proximity100x100:
    return Proximity100x100(
        num_slices=6,
        image_size=(32, 32),
        embedding_size=16,
        num_classes=num_classes,
        reduce_channels=(8, 8, 4),
        fc_hidden=16,
        **kw,
    )


@pytest.mark.parametrize(("slices", "hw"), [(6, 32), (9, 48), (12, 64), (3, 100)])
def test_flattened_size_follows_input_size(slices: int, hw: int) -> None:
    model = Proximity100x100(slices, (hw, hw), 8, 0, (8, 8, 4), 8)
    assert model.flattened_size == _expected_flat(slices, hw)
    out = model(torch.randint(0, 256, (2, slices, 1, hw, hw), dtype=torch.uint8))
    assert out["embedding"].shape == (2, 8)


def test_legacy_model_constant() -> None:
    assert _expected_flat(300, 300, (64, 32, 16)) == Proximity300x300.FLATTENED_SIZE


def test_forward_shapes_norm_and_resize() -> None:
    model = tiny()
    x = torch.rand(3, 12, 40, 40)  # other slice count and size: resized inside
    out = model(x)
    assert out["embedding"].shape == (3, 16) and out["logits"].shape == (3, 4)
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(3))
    out["logits"].sum().backward()
    assert model.trunk[0].weight.grad is not None


def test_get_embeddings_no_grad_and_probs() -> None:
    model = tiny()
    res = model.get_embeddings(torch.randint(0, 256, (2, 6, 32, 32), dtype=torch.uint8))
    assert not res["embedding"].requires_grad
    assert res["probs"].shape == (2, 4) and ((res["probs"] > 0) & (res["probs"] < 1)).all()
    assert "probs" not in tiny(num_classes=0).get_embeddings(torch.rand(1, 6, 32, 32))


def test_pretrained_weights_from_local_file(tmp_path: Path) -> None:
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "resnet18.pt")
    cfg = ModelConfig(
        num_slices=6,
        image_size=(32, 32),
        embedding_size=8,
        reduce_channels=(8, 8, 4),
        fc_hidden=8,
        pretrained_weights=str(tmp_path / "resnet18.pt"),
    )
    model = build_model(CTRetrievalConfig(model=cfg))
    torch.testing.assert_close(model.trunk[0].weight, ref.conv1.weight)
    torch.testing.assert_close(model.trunk[7][1].conv2.weight, ref.layer4[1].conv2.weight)


def test_pretrained_without_file_is_a_user_error() -> None:
    cfg = ModelConfig(
        num_slices=6,
        image_size=(32, 32),
        embedding_size=8,
        reduce_channels=(8, 8, 4),
        fc_hidden=8,
        pretrained=True,
    )
    with pytest.raises(UserError, match="--pretrained-weights"):
        build_model(CTRetrievalConfig(model=cfg))


def test_bad_slice_count() -> None:
    with pytest.raises(ValueError, match="multiple of 3"):
        Proximity100x100(num_slices=10, image_size=(32, 32))


def test_a_checkpoint_is_rebuilt_by_build_model_from_its_stored_section() -> None:
    # The resolved section a run stores: a head sized for microf1 mode, the weights' mean/std.
    section = ModelConfig(
        num_slices=6,
        image_size=(32, 32),
        embedding_size=8,
        reduce_channels=(8, 8, 4),
        fc_hidden=8,
        num_classes=4,
        pretrained=False,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )
    torch.manual_seed(0)
    trained = build_model(CTRetrievalConfig(model=section))
    state = {
        "model_config": {**to_dict(section), "pretrained_weights": "gone.pth", "pretrained": True},
        "model": trained.state_dict(),
    }
    rebuilt = build_model(stored_config(state))  # the weights named at training are not read
    rebuilt.load_state_dict(state["model"])  # strict: the same tensors, head included
    x = torch.randint(0, 256, (2, 6, 32, 32), dtype=torch.uint8)
    trained.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x)["logits"], trained(x)["logits"])
    assert rebuilt.mean.flatten().tolist() == [0.5, 0.5, 0.5]


def test_checkpoint_kinds_name_the_architecture() -> None:
    assert KINDS == ("ctretrieval.Proximity100x100", "ctretrieval.Proximity300x300")
    assert all(kind.startswith(KIND) for kind in KINDS)
    for name in MODELS:
        model = ModelConfig(name=name, num_slices=300, image_size=(300, 300))
        assert model_kind(CTRetrievalConfig(model=model)) == f"ctretrieval.{name}"
