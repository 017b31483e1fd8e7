"""Balanced batches and triplet mining, against brute-force references."""

import itertools

import numpy as np
import pytest
import timm.data
import torch

from medcore.data.samplers import BalancedBatchSampler
from medcore.errors import DataError
from medcore.losses.triplet_mining import (
    batch_hard,
    mine_negatives,
    mine_triplets,
    pairwise_distances,
    triplet_masks,
)
from medcore.weights.normalization import IMAGENET_MEAN, IMAGENET_STD


def test_imagenet_constants_agree_with_timm() -> None:
    assert tuple(timm.data.IMAGENET_DEFAULT_MEAN) == IMAGENET_MEAN
    assert tuple(timm.data.IMAGENET_DEFAULT_STD) == IMAGENET_STD


def _multilabel():
    patterns = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    ids = np.repeat(np.arange(5), [6, 5, 4, 2, 7])
    return patterns[ids], ids


def test_compatible_classes_and_counts() -> None:
    y, ids = _multilabel()
    sampler = BalancedBatchSampler(ids, n_samples=3, n_classes=2, labels=y, seed=1)
    assert len(sampler) == 4  # ceil(24 / 6)
    for batch in sampler:
        uniques, counts = np.unique(ids[batch], return_counts=True)
        assert len(uniques) == 2 and counts.tolist() == [3, 3]
        a, b = uniques
        assert not (y[ids == a][0] & y[ids == b][0]).any()


def test_every_class_in_every_batch_from_reshuffled_streams() -> None:
    labels = np.array([0] * 30 + [1] * 7)
    sampler = BalancedBatchSampler(labels, n_samples=4, seed=1)
    batches = list(sampler)
    assert len(batches) == 5
    minority = [i for b in batches for i in b if labels[i] == 1]
    # 20 draws from a 7-member stream: every member before any repeats, at most 3 times each.
    assert sorted(set(minority[:7])) == list(range(30, 37))
    assert max(np.bincount(minority)) == 3
    majority = [i for b in batches for i in b if labels[i] == 0]
    assert len(set(majority)) == 20  # 20 of the 30, none twice within the first pass
    assert batches == list(BalancedBatchSampler(labels, n_samples=4, seed=1))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    ranks = [list(BalancedBatchSampler(labels, 4, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert ranks[0][0] == batches[0] and ranks[1][0] == batches[1]


def test_sampler_refuses_what_cannot_be_balanced() -> None:
    with pytest.raises(DataError, match="fewer than n_classes"):
        BalancedBatchSampler(np.zeros(4, dtype=int), n_samples=2, n_classes=2)
    with pytest.raises(DataError, match="2 or more classes"):
        BalancedBatchSampler(np.zeros(4, dtype=int), n_samples=2)


def test_batch_hard_and_mining_against_brute_force() -> None:
    torch.manual_seed(0)
    emb = torch.randn(10, 4)
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2])
    dist = pairwise_distances(emb)
    ref = torch.cdist(emb, emb)
    torch.testing.assert_close(dist, ref, atol=1e-4, rtol=1e-4)
    pos, neg = triplet_masks(ids)
    hp, hn, valid = batch_hard(dist, pos, neg)
    for a in range(10):
        same = [j for j in range(10) if ids[j] == ids[a] and j != a]
        other = [j for j in range(10) if ids[j] != ids[a]]
        assert valid[a] and hp[a] == dist[a, same].max() and hn[a] == dist[a, other].min()
    triplets = mine_triplets(dist, pos, neg, "hardest")
    expected = {
        (a, p, min((j for j in range(10) if ids[j] != ids[a]), key=lambda j: dist[a, j]))
        for a, p in itertools.permutations(range(10), 2)
        if ids[a] == ids[p]
    }
    assert {tuple(t) for t in triplets.tolist()} == expected
    semi = mine_triplets(dist, pos, neg, "semihard", margin=0.5)
    for a, p, n in semi.tolist():
        assert ids[a] == ids[p] != ids[n] and dist[a, p] < dist[a, n] < dist[a, p] + 0.5


def test_multilabel_negatives_share_no_positive() -> None:
    labels = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 0]])
    ids = torch.tensor([0, 1, 2, 0])
    pos, neg = triplet_masks(ids, labels)
    assert pos[0, 3] and not pos[0, 0]
    assert neg[0, 2] and not neg[0, 1]  # 1 shares the first finding with 0


@pytest.mark.parametrize("mining", ["hardest", "semihard", "random_hard"])
def test_mine_negatives_is_mine_triplets_without_a_host_read(mining: str) -> None:
    torch.manual_seed(3)
    emb = torch.randn(12, 5)
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2, 3, 3])
    dist = pairwise_distances(emb, squared=True)
    pos, neg = triplet_masks(ids)
    torch.manual_seed(7)
    chosen, has = mine_negatives(dist, pos, neg, mining, margin=1.0)
    torch.manual_seed(7)  # the same draws: the same negatives
    triplets = mine_triplets(dist, pos, neg, mining, margin=1.0)
    assert chosen.shape == has.shape == (12, 12)
    assert {(a, p, chosen[a, p].item()) for a, p in has.nonzero().tolist()} == {
        tuple(t) for t in triplets.tolist()
    }
    assert not (has & ~pos).any()
    # On the meta device any read of a value (nonzero, item, a data-dependent shape) raises.
    meta = [x.to("meta") for x in (dist, pos, neg)]
    chosen_m, has_m = mine_negatives(*meta, mining, margin=1.0)
    assert chosen_m.shape == has_m.shape == (12, 12)
    with pytest.raises((NotImplementedError, RuntimeError)):
        mine_triplets(*meta, mining, margin=1.0)
