from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from histommnet.losses import FocalLoss, HistoLoss, mixup, soft_targets


def test_focal_loss_hand_computed() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([1, 1])
    loss = FocalLoss(alpha=0.7, gamma=2.0, label_smoothing=0.0)(logits, target)
    p1 = 1 / (1 + math.exp(2.0))  # P(malignant) of sample 0
    q1 = 1 / (1 + math.exp(-1.0))  # P(malignant) of sample 1
    expected = (-0.7 * (1 - p1) ** 2 * math.log(p1) - 0.7 * (1 - q1) ** 2 * math.log(q1)) / 2
    assert abs(float(loss) - expected) < 1e-6
    benign = FocalLoss(alpha=0.7, gamma=2.0, label_smoothing=0.0)(logits[:1], torch.tensor([0]))
    p0 = 1 - p1
    assert abs(float(benign) - (-0.3 * (1 - p0) ** 2 * math.log(p0))) < 1e-6


def test_focal_with_gamma0_is_weighted_smoothed_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 2)
    target = torch.tensor([0, 1, 1, 0, 1, 0])
    loss = FocalLoss(alpha=0.5, gamma=0.0, label_smoothing=0.2)(logits, target)
    reference = 0.5 * F.cross_entropy(logits, target, label_smoothing=0.2)
    torch.testing.assert_close(loss, reference)


def test_soft_targets_and_mixup() -> None:
    q = soft_targets(torch.tensor([0, 1]), 2, smoothing=0.2)
    torch.testing.assert_close(q, torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    torch.manual_seed(0)
    images = torch.randn(4, 4, 3, 8, 8)
    mixed, perm, lam = mixup(images, alpha=0.2)
    assert 0.0 <= lam <= 1.0 and sorted(perm.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images[perm])


def test_objective_returns_total_and_detached_terms() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 2, requires_grad=True)
    sub_logits = torch.randn(4, 8, requires_grad=True)
    target = soft_targets(torch.tensor([0, 1, 1, 0]), 2, 0.1)
    sub_target = soft_targets(torch.tensor([0, 5, 7, 2]), 8, 0.1)
    focal = FocalLoss(alpha=0.6, gamma=2.0, label_smoothing=0.1)
    total, terms = HistoLoss(focal, subtype_weight=0.3)(
        {"logits": logits, "subtype_logits": sub_logits}, target, sub_target
    )
    # independent reference: torch's cross-entropy on probability targets
    reference = focal(logits, target) + 0.3 * F.cross_entropy(sub_logits, sub_target)
    torch.testing.assert_close(total, reference)
    assert set(terms) == {"focal", "subtype_ce"}
    assert all(isinstance(t, torch.Tensor) and not t.requires_grad for t in terms.values())
    torch.testing.assert_close(terms["subtype_ce"], F.cross_entropy(sub_logits, sub_target))
    total.backward()
    assert logits.grad is not None and sub_logits.grad is not None
    # no subtype head, or a zero weight: the focal loss alone
    for out, weight in (
        ({"logits": logits}, 0.3),
        ({"logits": logits, "subtype_logits": sub_logits}, 0.0),
    ):
        total, terms = HistoLoss(focal, subtype_weight=weight)(out, target, sub_target)
        assert set(terms) == {"focal"}
        torch.testing.assert_close(total, focal(logits, target))
