import pytest
import timm
import torch
from torch import nn

from medcore.engine.grad_checkpointing import set_grad_checkpointing
from medcore.errors import UserError


class TwoBackbones(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        kw = {"pretrained": False, "num_classes": 0}
        self.a = timm.create_model("resnet18", **kw)
        self.b = timm.create_model("vit_tiny_patch16_224", img_size=32, **kw)
        self.head = nn.Linear(512 + 192, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


def test_switches_every_timm_backbone_and_keeps_the_numbers() -> None:
    torch.manual_seed(0)
    model = TwoBackbones().train()
    x = torch.randn(2, 3, 32, 32)
    for m in model.modules():  # dropout-free comparison: BN in eval mode
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert set_grad_checkpointing(model, True) == 2
    assert model.a.grad_checkpointing and model.b.grad_checkpointing
    model(x).sum().backward()
    for g, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
    assert set_grad_checkpointing(model, False) == 2 and not model.b.grad_checkpointing


def test_a_model_without_a_backbone_is_an_error() -> None:
    with pytest.raises(UserError, match="activation checkpointing"):
        set_grad_checkpointing(nn.Linear(2, 2), True)
    assert set_grad_checkpointing(nn.Linear(2, 2), False) == 0
