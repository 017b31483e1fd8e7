from __future__ import annotations

import itertools
import math

import pytest
import torch
from sklearn.metrics import f1_score

from ctretrieval.losses import GradedMicroF1Loss, OnlineTripletLoss, graded_targets
from medcore.losses.triplet_mining import pairwise_distances, triplet_masks


def pairwise_sq_dist(emb: torch.Tensor) -> torch.Tensor:
    return pairwise_distances(emb, squared=True)


def _f1(p, t):
    tp = sum(a * b for a, b in zip(p, t, strict=True))
    fp = sum(a * (1 - b) for a, b in zip(p, t, strict=True))
    fn = sum((1 - a) * b for a, b in zip(p, t, strict=True))
    return 2 * tp / (2 * tp + fp + fn)


def test_f1_loss_hand_computed() -> None:
    probs = torch.tensor([[0.9, 0.2, 0.6], [0.3, 0.8, 0.1]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.5, 0.0]])  # graded target in row 2
    logits = torch.logit(probs)
    # Row 1: tp = 1.5, fp = 0.2, fn = 0.5 -> F1 = 3 / 3.7; row 2: tp = 0.4, fp = 0.8, fn = 0.1 -> 0.8 / 1.7.
    sample = 1 - (3 / 3.7 + 0.8 / 1.7) / 2
    micro = 1 - 2 * 1.9 / (2 * 1.9 + 1.0 + 0.6)
    assert GradedMicroF1Loss("sample")(logits, targets)[0].item() == pytest.approx(sample, rel=1e-5)
    assert GradedMicroF1Loss("micro")(logits, targets)[0].item() == pytest.approx(micro, rel=1e-5)
    assert 1 - _f1(probs.flatten().tolist(), targets.flatten().tolist()) == pytest.approx(
        micro, rel=1e-5
    )


def test_hybrid_adds_weighted_bce() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bce = (
        -sum(
            t * math.log(1 / (1 + math.exp(-z))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-z)))
            for z, t in zip(logits.flatten().tolist(), targets.flatten().tolist(), strict=True)
        )
        / 4
    )
    plain, plain_terms = GradedMicroF1Loss("sample")(logits, targets)
    total, terms = GradedMicroF1Loss("sample", bce_weight=0.3)(logits, targets)
    assert total.item() == pytest.approx(plain.item() + 0.3 * bce, rel=1e-5)
    # The terms: the soft F1 (1 - the plain loss) and, in the hybrid only, the BCE; detached.
    assert set(plain_terms) == {"soft_f1"} and set(terms) == {"soft_f1", "bce"}
    assert terms["bce"].item() == pytest.approx(bce, rel=1e-5)
    assert terms["soft_f1"].item() == pytest.approx(1 - plain.item(), rel=1e-5)


def test_f1_loss_is_low_for_confident_correct_predictions() -> None:
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    good, _ = GradedMicroF1Loss()((targets * 2 - 1) * 20, targets)
    bad, _ = GradedMicroF1Loss()((1 - targets * 2) * 20, targets)
    assert good.item() < 1e-6 and bad.item() > 1 - 1e-6


def _brute_force(dist, labels, label_ids, margin, mining):
    """Per (anchor, positive): the set of admissible negatives and the hardest one, with plain loops."""
    b = len(label_ids)
    out = {}
    for a, p in itertools.product(range(b), range(b)):
        if a == p or label_ids[a] != label_ids[p]:
            continue
        negs = []
        for n in range(b):
            shares = any(labels[a][c] > 0 and labels[n][c] > 0 for c in range(len(labels[a])))
            if shares:
                continue
            dap, dan = dist[a][p], dist[a][n]
            if mining == "semihard" and not dap < dan < dap + margin:
                continue
            if mining == "random_hard" and not dan < dap + margin:
                continue
            negs.append(n)
        if negs:
            out[(a, p)] = negs
    return out


def _batch(seed: int, b: int = 10, c: int = 4):
    g = torch.Generator().manual_seed(seed)
    patterns = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    pick = torch.randint(0, len(patterns), (b,), generator=g)
    labels = patterns[pick].float()
    emb = torch.nn.functional.normalize(torch.randn(b, 6, generator=g), dim=1)
    return emb, labels, pick


@pytest.mark.parametrize("mining", ["hardest", "semihard", "random_hard"])
@pytest.mark.parametrize("seed", range(6))
def test_miner_matches_brute_force(mining: str, seed: int) -> None:
    emb, labels, label_ids = _batch(seed)
    loss = OnlineTripletLoss(margin=0.4, mining=mining)
    dist = pairwise_sq_dist(emb)
    torch.manual_seed(seed)
    triplets = loss.mine(dist, labels, label_ids).tolist()
    ref = _brute_force(dist.tolist(), labels.tolist(), label_ids.tolist(), 0.4, mining)
    assert {(a, p) for a, p, _ in triplets} == set(ref)
    for a, p, n in triplets:
        assert n in ref[(a, p)]
        if mining == "hardest":
            assert dist[a, n] == min(dist[a, m] for m in ref[(a, p)])


def test_random_mining_uses_more_than_one_negative() -> None:
    emb, labels, label_ids = _batch(0, b=16)
    loss = OnlineTripletLoss(margin=2.0, mining="random_hard")  # margin 2: every negative is hard
    dist = pairwise_sq_dist(emb)
    torch.manual_seed(0)
    picks = {tuple(t) for _ in range(20) for t in loss.mine(dist, labels, label_ids).tolist()}
    anchors_pairs = {(a, p) for a, p, _ in picks}
    assert len(picks) > len(anchors_pairs)


def test_triplet_loss_value_and_gradient() -> None:
    emb, labels, label_ids = _batch(2)
    emb.requires_grad_(True)
    loss_fn = OnlineTripletLoss(margin=0.2, mining="hardest")
    loss, terms = loss_fn(emb, labels, label_ids)
    dist = pairwise_sq_dist(emb.detach())
    ref = _brute_force(dist.tolist(), labels.tolist(), label_ids.tolist(), 0.2, "hardest")
    values = [
        max(0.0, dist[a, p].item() - min(dist[a, m].item() for m in negs) + 0.2)
        for (a, p), negs in ref.items()
    ]
    assert terms["triplets"].item() == len(ref) and not terms["triplets"].requires_grad
    assert loss.item() == pytest.approx(sum(values) / len(values), rel=1e-4, abs=1e-6)
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


def test_compatible_negatives_share_no_finding() -> None:
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]]).float()
    positive, negative = triplet_masks(torch.tensor([0, 1, 2, 3]), labels)
    assert not positive.any()
    assert negative.tolist() == [
        [False, False, True, True],
        [False, False, False, True],
        [True, False, False, True],
        [True, True, True, False],
    ]


@pytest.mark.parametrize("mining", ["hardest", "semihard", "random_hard"])
def test_triplet_loss_reads_nothing_back_from_the_device(mining: str) -> None:
    # On the meta device a value read (nonzero, item, boolean indexing) raises: the loss and
    # its count stay on the device, so a training step never waits for it.
    emb, labels, label_ids = _batch(1)
    loss, terms = OnlineTripletLoss(mining=mining)(
        emb.to("meta"), labels.to("meta"), label_ids.to("meta")
    )
    assert loss.device.type == terms["triplets"].device.type == "meta" and loss.shape == ()


def test_no_triplet_gives_zero_attached_loss() -> None:
    emb = torch.randn(3, 4, requires_grad=True)
    loss, terms = OnlineTripletLoss()(emb, torch.ones(3, 2), torch.tensor([0, 1, 2]))
    assert terms["triplets"].item() == 0 and loss.item() == 0.0
    loss.backward()


def test_default_loss_is_the_batch_micro_f1_of_sklearn() -> None:
    # A hand-made batch with confident logits: the soft counts are the hard counts, so
    # 1 - loss is the batch's micro-F1 as sklearn computes it (per-study F1 would differ).
    targets = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0]])
    predicted = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 1, 0]])
    logits = (predicted * 2 - 1).float() * 40
    expected = f1_score(targets.numpy(), predicted.numpy(), average="micro")
    per_study = f1_score(targets.numpy(), predicted.numpy(), average="samples")
    assert abs(expected - per_study) > 0.01  # the batch tells the two apart
    loss, _ = GradedMicroF1Loss()(logits, targets.float())
    assert 1 - loss.item() == pytest.approx(expected, abs=1e-5)


def test_graded_targets_are_jaccard_of_the_finding_set() -> None:
    labels = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    graded = graded_targets(labels)
    sets = [{c for c, v in enumerate(row) if v} for row in labels.tolist()]
    for i, found in enumerate(sets):
        for c in range(4):
            jaccard = len(found & {c}) / len(found | {c})
            assert graded[i, c].item() == pytest.approx(jaccard if c in found else 0.0)
    assert graded[1].tolist() == pytest.approx([0, 0.5, 0.5, 0])


def test_graded_targets_reach_the_loss_from_the_config() -> None:
    from ctretrieval.config import CTRetrievalConfig
    from ctretrieval.train import make_step_fn
    from medcore.config import load_config

    labels = torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 0]])
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [-1.0, 0.3, 1.2, -2.0]])

    class Head(torch.nn.Module):
        def forward(self, x):
            return {"logits": logits + 0 * x.sum()}

    batch = {"volume": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "labels": labels}
    for targets, expected in (("binary", labels), ("jaccard", graded_targets(labels))):
        cfg = load_config(CTRetrievalConfig, overrides=[f"loss.targets={targets}"])
        loss, terms = make_step_fn(cfg, None)(Head(), batch)
        assert loss.item() == pytest.approx(GradedMicroF1Loss()(logits, expected)[0].item())
        # The step hands the loss's terms to the trainer as device tensors, detached.
        assert set(terms) == {"soft_f1"} and not terms["soft_f1"].requires_grad
    assert graded_targets(labels)[1, 1] == 0.5
