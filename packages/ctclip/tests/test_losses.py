"""The contrastive loss: a hand computation, and a 2-process gloo DDP step equal to one process."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ctclip.config import CTClipConfig
from ctclip.losses import ClipLoss
from ctclip.model import build_model
from ctclip.train import make_step_fn
from medcore.testing import run_gloo


def test_clip_loss_by_hand():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(4, 8), dim=-1)
    txt = F.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(5.0)
    sim = (scale * img @ txt.T).tolist()
    image_to_text = text_to_image = 0.0
    for i in range(4):
        row = torch.tensor(sim[i])
        col = torch.tensor([sim[j][i] for j in range(4)])
        image_to_text -= float(row[i] - row.logsumexp(0)) / 4
        text_to_image -= float(col[i] - col.logsumexp(0)) / 4
    total, terms = ClipLoss()(img, txt, scale)
    assert total.item() == pytest.approx((image_to_text + text_to_image) / 2, rel=1e-5)
    assert terms["image_to_text"].item() == pytest.approx(image_to_text, rel=1e-5)
    assert terms["text_to_image"].item() == pytest.approx(text_to_image, rel=1e-5)


def test_clip_loss_terms_are_detached_and_total_carries_the_gradient():
    img = F.normalize(torch.randn(3, 8), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(3, 8), dim=-1)
    total, terms = ClipLoss()(img, txt, torch.tensor(10.0))
    assert total.requires_grad
    assert set(terms) == {"image_to_text", "text_to_image"}
    assert not any(t.requires_grad for t in terms.values())


@pytest.mark.parametrize("chunk_size", [0, 2])
def test_step_returns_loss_and_terms_without_reading_the_device(tiny_cfg, monkeypatch, chunk_size):
    """The step's loss and logged terms stay tensors: a float(), .item(), .tolist() or .cpu()
    in the step would cost a host sync per micro-batch (with and without the gradient cache)."""
    torch.manual_seed(0)
    model = build_model(CTClipConfig(model=tiny_cfg()))
    batch = {
        "volume": torch.randint(0, 256, (4, 4, 28, 28), dtype=torch.uint8),
        "tokens": torch.randint(1, 1000, (4, 32)),
    }
    step = make_step_fn(model, chunk_size)

    def host_read(*args, **kwargs):
        raise AssertionError("the step read a tensor on the host")

    for name in ("item", "tolist", "cpu", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    loss, terms = step(model, batch)
    loss.backward()
    monkeypatch.undo()
    assert set(terms) == {"image_to_text", "text_to_image", "logit_scale"}
    assert all(isinstance(t, torch.Tensor) and not t.requires_grad for t in terms.values())
    expected = (terms["image_to_text"] + terms["text_to_image"]) / 2
    torch.testing.assert_close(loss.detach(), expected)


class _Towers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = torch.nn.Linear(6, 5)
        self.text = torch.nn.Linear(3, 5)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x, t):
        return (
            F.normalize(self.image(x), dim=-1),
            F.normalize(self.text(t), dim=-1),
            self.logit_scale.exp(),
        )


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)


def _ddp_worker(rank: int, world_size: int, out_dir: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(_Towers())
    x, t = _batch()
    per_rank = x.shape[0] // world_size
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    loss, _ = ClipLoss()(*model(x[part], t[part]))
    loss.backward()  # DDP averages the gradients over ranks
    grads = {n: p.grad.tolist() for n, p in model.module.named_parameters()}
    mean_loss = loss.detach().clone()
    torch.distributed.all_reduce(mean_loss)
    with open(f"{out_dir}/rank{rank}.json", "w") as fh:
        json.dump({"loss": mean_loss.item() / world_size, "grads": grads}, fh)


def test_ddp_loss_and_gradients_equal_single_process(tmp_path):
    run_gloo(_ddp_worker, 2, str(tmp_path))
    torch.manual_seed(0)
    model = _Towers()
    x, t = _batch()
    loss, _ = ClipLoss()(*model(x, t))
    loss.backward()
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
        for name, param in model.named_parameters():
            torch.testing.assert_close(
                torch.tensor(got["grads"][name]), param.grad, rtol=1e-4, atol=1e-6
            )
