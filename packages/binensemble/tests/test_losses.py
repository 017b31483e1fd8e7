from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss

from binensemble.losses import BatchHardTripletLoss, batch_hard_triplet_loss, cross_entropy_loss


def brute_force(
    emb: torch.Tensor, labels: torch.Tensor, margin: float
) -> tuple[float, dict[str, float]]:
    """Loop over every anchor, every positive and every negative: the loss and its terms."""
    losses, hardest_pos, hardest_neg = [], [], []
    for a in range(len(labels)):
        pos = [
            torch.dist(emb[a], emb[p]).item()
            for p in range(len(labels))
            if p != a and labels[p] == labels[a]
        ]
        neg = [
            torch.dist(emb[a], emb[n]).item() for n in range(len(labels)) if labels[n] != labels[a]
        ]
        if pos and neg:
            losses.append(max(0.0, max(pos) - min(neg) + margin))
            hardest_pos.append(max(pos))
            hardest_neg.append(min(neg))
    n = len(losses)
    terms = {
        "active": sum(v > 0 for v in losses) / n,
        "d_pos": sum(hardest_pos) / n,
        "d_neg": sum(hardest_neg) / n,
    }
    return sum(losses) / n, terms


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_hard_matches_brute_force(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(12, 8, generator=gen), dim=1)
    emb.requires_grad_(True)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 0, 1, 3])  # class 3 has no positive
    loss, terms = batch_hard_triplet_loss(emb, labels, margin=0.5)
    expected, expected_terms = brute_force(emb.detach(), labels, 0.5)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert {k: v.item() for k, v in terms.items()} == pytest.approx(expected_terms, abs=1e-5)
    assert all(not v.requires_grad for v in terms.values())
    loss.backward()  # the anchor without a positive adds nothing, not inf or NaN
    assert torch.isfinite(emb.grad).all() and emb.grad[11].abs().sum() > 0


def test_the_hardest_pair_is_the_one_penalised() -> None:
    # 1-D embeddings: anchor 0 at 0; positives at 0.1 and 0.9; negatives at 0.5 and 2.0.
    emb = torch.tensor([[0.0], [0.1], [0.9], [0.5], [2.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1])
    loss, _ = batch_hard_triplet_loss(emb, labels, margin=0.2)
    # Anchor 0: 0.9 - 0.5 + 0.2 = 0.6; anchor 1: 0.8 - 0.4 + 0.2 = 0.6; anchor 2: 0.9 - 0.4 + 0.2 = 0.7;
    # anchor 3 (pos 1.5, neg 0.4): 1.3; anchor 4 (pos 1.5, neg 1.1): 0.6.
    assert loss.item() == pytest.approx((0.6 + 0.6 + 0.7 + 1.3 + 0.6) / 5, abs=1e-5)
    loss.backward()
    assert torch.isfinite(emb.grad).all()


def test_duplicates_and_missing_negatives_keep_gradients_finite() -> None:
    emb = torch.ones(4, 3, requires_grad=True)
    loss, _ = batch_hard_triplet_loss(emb, torch.tensor([0, 0, 1, 1]), margin=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.5, abs=1e-4) and torch.isfinite(emb.grad).all()
    emb2 = torch.randn(4, 3, requires_grad=True)
    loss2, stats = batch_hard_triplet_loss(emb2, torch.zeros(4, dtype=torch.long))
    loss2.backward()
    assert loss2.item() == 0.0 and stats["active"] == 0.0


def test_module_equals_function_in_one_process() -> None:
    emb = torch.randn(6, 4)
    labels = torch.tensor(list(itertools.islice(itertools.cycle([0, 1]), 6)))
    module = BatchHardTripletLoss(margin=0.3)
    torch.testing.assert_close(module(emb, labels)[0], batch_hard_triplet_loss(emb, labels, 0.3)[0])


def test_losses_never_wait_for_the_device() -> None:
    """On the meta device a value has no host copy: a loss that branched on one (``if
    valid.any()``, boolean indexing, ``.item()``) would raise here instead of a host sync per
    micro-batch in training."""
    emb = torch.empty(8, 16, device="meta")
    labels = torch.tensor([0, 0, 1, 1, 0, 1, 2, 2], device="meta")
    loss, terms = batch_hard_triplet_loss(emb, labels, 0.5)
    assert loss.device.type == "meta" and {t.device.type for t in terms.values()} == {"meta"}
    loss, terms = cross_entropy_loss(torch.empty(8, 2, device="meta"), labels.clamp(max=1), 0.1)
    assert loss.device.type == "meta" and terms["accuracy"].device.type == "meta"


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_against_sklearn(smoothing: float) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 2, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1])
    loss, terms = cross_entropy_loss(logits, labels, smoothing)
    probs = logits.detach().softmax(1).numpy()
    y = labels.numpy()
    # Smoothing mixes the one-hot target with a uniform one: (1 - e) CE + e mean_c(-log p_c).
    uniform = -np.log(probs).mean(1).mean()
    expected = (1 - smoothing) * log_loss(y, probs, labels=[0, 1]) + smoothing * uniform
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert terms["accuracy"].item() == pytest.approx((probs.argmax(1) == y).mean())
    assert not terms["accuracy"].requires_grad and loss.requires_grad
